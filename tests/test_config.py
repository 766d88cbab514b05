"""Config loading: every error with its field path and line, env overrides, the CLI."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from proxy import cli
from proxy import config as cfg

DEMO = Path(__file__).parent.parent / "config" / "demo.yaml"

GOOD = """\
systems:
  tiktok: {kind: social}
  tokopedia: {kind: commerce}
clusters:
  feed: {system: tiktok, endpoints: [http://127.0.0.1:9001]}
  pay: {system: tokopedia, endpoints: [http://127.0.0.1:9003]}
routes:
  - name: feed
    match: {prefix: /api/feed}
    category: promotion
    to: feed
  - name: payment
    match: {prefix: /api/payment}
    category: payment
    to: pay
"""


def errors_of(text: str, **kw: object) -> list[cfg.FieldError]:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(text, **kw)  # type: ignore[arg-type]
    return info.value.errors


def paths_of(text: str, **kw: object) -> set[str]:
    return {e.path for e in errors_of(text, **kw)}


def test_good_config_and_demo_config_load() -> None:
    c = cfg.parse(GOOD)
    assert [r.name for r in c.routes] == ["feed", "payment"]
    assert c.clusters["pay"].timeouts.connect == 2.0
    demo = cfg.load(DEMO)
    assert {r.name for r in demo.routes} >= {"feed", "live", "products", "payment", "cart"}


@pytest.mark.parametrize(
    ("mutation", "path"),
    [
        (("to: pay", "to: nowhere"), "$.routes[1].to"),
        (("system: tokopedia,", "system: nobody,"), "$.clusters.pay.system"),
        (("prefix: /api/feed", "prefix: api/feed"), "$.routes[0].match.prefix"),
        (("prefix: /api/feed}", "prefix: /api/feed, colour: red}"), "$.routes[0].match.colour"),
        (("kind: social", "kind: bank"), "$.systems.tiktok.kind"),
        (("http://127.0.0.1:9001", "ftp://127.0.0.1:9001"), "$.clusters.feed.endpoints[0]"),
        (("http://127.0.0.1:9001", "http://127.0.0.1"), "$.clusters.feed.endpoints[0]"),
        (("name: payment", "name: feed"), "$.routes[1].name"),
        (("category: promotion", "category: 'bad name'"), "$.routes[0].category"),
    ],
)
def test_each_error_names_its_field_path(mutation: tuple[str, str], path: str) -> None:
    old, new = mutation
    assert old in GOOD
    assert path in paths_of(GOOD.replace(old, new, 1))


def test_listen_host_must_be_an_ip_address() -> None:
    for host in ("0.0.0.0", "::", "127.0.0.1", "::1"):
        assert cfg.parse(f"listen: {{host: '{host}'}}\n" + GOOD).listen.host == host
    errors = errors_of("listen: {host: localhost}\n" + GOOD)
    assert [e.path for e in errors] == ["$.listen"]
    assert "must be an IP address" in errors[0].message


def test_every_error_is_reported_not_just_the_first() -> None:
    text = GOOD.replace("kind: social", "kind: bank").replace(
        "prefix: /api/feed}", "prefix: /api/feed, colour: red}"
    )
    text += "listen: {port: 99999}\nbogus: 1\n"
    assert paths_of(text) >= {
        "$.systems.tiktok.kind",
        "$.routes[0].match.colour",
        "$.listen.port",
        "$.bogus",
    }


def test_errors_carry_the_yaml_line() -> None:
    errors = errors_of(GOOD.replace("to: pay", "to: nowhere"))
    (err,) = errors
    assert err.line == GOOD.splitlines().index("    to: pay") + 1
    assert f"(line {err.line})" in str(err)


def test_route_needs_exactly_one_of_to_and_split() -> None:
    text = GOOD.replace("    to: pay\n", "")
    assert "$.routes[1]" in paths_of(text)


def test_env_overrides_set_scalars_and_name_their_variable() -> None:
    c = cfg.parse(
        GOOD,
        env={
            "JALUR_LISTEN__PORT": "8081",
            "JALUR_ADMIN__TOKEN": "s3cret",
            "JALUR_CLUSTERS__PAY__TIMEOUTS__CONNECT": "0.5",
            "OTHER": "ignored",
        },
    )
    assert c.listen.port == 8081
    assert c.admin.token == "s3cret"
    assert c.clusters["pay"].timeouts.connect == 0.5
    (err,) = errors_of(GOOD, env={"JALUR_LISTEN__PORT": "eighty"})
    assert err.path == "$.listen.port"
    assert "JALUR_LISTEN__PORT" in err.message


def test_env_override_reaches_hyphenated_names() -> None:
    text = GOOD.replace("pay:", "tokopedia-pay:").replace("to: pay", "to: tokopedia-pay")
    c = cfg.parse(text, env={"JALUR_CLUSTERS__TOKOPEDIA_PAY__MAX_CONNECTIONS": "7"})
    assert c.clusters["tokopedia-pay"].max_connections == 7


def test_config_objects_are_frozen() -> None:
    c = cfg.parse(GOOD)
    with pytest.raises(AttributeError):
        c.listen.port = 1  # type: ignore[misc]


def test_invalid_yaml_is_reported_with_line() -> None:
    (err,) = errors_of("routes: [\n  {name: x\n")
    assert err.path == "$"
    assert err.line is not None


def test_check_cli_ok_summary_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    out, err = io.StringIO(), io.StringIO()
    assert cli.check(str(good), out, err) == 0
    text = out.getvalue()
    assert "OK" in text
    assert "payment (transaction)" in text
    assert "tokopedia" in text

    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("to: pay", "to: nowhere").replace("kind: social", "kind: x"))
    out, err = io.StringIO(), io.StringIO()
    assert cli.check(str(bad), out, err) == 1
    assert "$.systems.tiktok.kind" in err.getvalue()
    assert out.getvalue() == ""


def test_check_cli_exit_codes_through_main(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("to: pay", "to: nowhere"))
    assert cli.main(["check", str(bad)]) == 1
    assert "$.routes[1].to" in capsys.readouterr().err
    assert cli.main(["check", str(DEMO)]) == 0


def test_routes_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["routes", "-c", str(DEMO)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["#", "ROUTE", "METHODS"]
    payment = next(line for line in out if line.split()[1:2] == ["payment"])
    assert "tokopedia-pay" in payment
    assert "(tokopedia)" in payment


# -- environment: only config paths are overrides (issue #19) -----------------------------

# What a Kubernetes Service named `jalur` injects into every pod of its namespace (service
# links), and the load test's own variables as they were named before.
SERVICE_LINKS = {
    "JALUR_PORT": "tcp://10.96.0.12:8080",
    "JALUR_PORT_8080_TCP": "tcp://10.96.0.12:8080",
    "JALUR_PORT_8080_TCP_PROTO": "tcp",
    "JALUR_PORT_8080_TCP_PORT": "8080",
    "JALUR_PORT_8080_TCP_ADDR": "10.96.0.12",
    "JALUR_SERVICE_HOST": "10.96.0.12",
    "JALUR_SERVICE_PORT": "8080",
    "JALUR_SERVICE_PORT_HTTP": "8080",
    "JALUR_STRICT": "1",
    "JALUR_ADMIN_URL": "http://127.0.0.1:9901",
    "JALUR_LOADTEST_ADMIN_URL": "http://127.0.0.1:9901",
}


def test_variables_that_name_no_config_path_are_ignored() -> None:
    c = cfg.parse(GOOD, env={**SERVICE_LINKS, "JALUR_LISTEN__PORT": "8081"})
    assert c.listen.port == 8081
    assert c == cfg.parse(GOOD, env={"JALUR_LISTEN__PORT": "8081"})


def test_an_unknown_field_under_a_known_section_is_still_an_error() -> None:
    (err,) = errors_of(GOOD, env={"JALUR_LISTEN__PROT": "8081"})
    assert err.path == "$.listen.prot"
    assert "JALUR_LISTEN__PROT" in err.message


def test_near_misses_are_named_once_and_service_links_are_not() -> None:
    env = {**SERVICE_LINKS, "JALUR_LISTEN_PORT": "1", "JALUR_LISTN__PORT": "1", "HOME": "/"}
    assert cfg.env_near_misses(env) == ["JALUR_ADMIN_URL", "JALUR_LISTEN_PORT", "JALUR_LISTN__PORT"]


def test_jalur_check_with_service_links_passes_and_warns_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in SERVICE_LINKS.items():
        monkeypatch.setenv(name, value)
    out, err = io.StringIO(), io.StringIO()
    assert cli.check(str(DEMO), out, err) == 0, err.getvalue()
    (line,) = err.getvalue().splitlines()
    assert line.startswith("warning: ignored JALUR_ADMIN_URL:")


async def test_jalur_run_serves_in_a_pod_with_service_links(tmp_path: Path) -> None:
    """As deployed: a `jalur run` process whose environment holds a Service's links."""
    import asyncio
    import os
    import signal
    import sys

    import yaml

    from .conftest import SERVING

    data = yaml.safe_load(GOOD)
    data["listen"] = {"host": "127.0.0.1", "port": 0}
    data["admin"] = {"host": "127.0.0.1", "port": 0}
    data["compliance"] = {"audit": {"path": str(tmp_path / "audit.log")}}
    path = tmp_path / "jalur.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", str(path),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        env={**os.environ, **SERVICE_LINKS, "PYTHONUNBUFFERED": "1"}, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(20):
            while not SERVING.search(line := (await proc.stderr.readline()).decode()):
                assert line, "jalur exited before serving"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.wait()


def test_manifests_turn_service_links_off() -> None:
    import yaml

    k8s = Path(__file__).parent.parent / "config" / "k8s"
    pods = []
    for f in sorted(k8s.glob("deployment*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") == "Deployment":
                pods.append((f.name, doc["spec"]["template"]["spec"]))
    assert pods
    for name, pod in pods:
        assert pod.get("enableServiceLinks") is False, name


# -- a config that would serve nothing, or not what it says (issue #19) -------------------


@pytest.mark.parametrize("text", ["", "\n", "# truncated\n", "---\n"])
def test_an_empty_file_is_an_error(text: str) -> None:
    (err,) = errors_of(text)
    assert "empty" in err.message


def test_a_config_file_without_routes_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "jalur.yaml"
    for text in (GOOD[: GOOD.index("routes:")], GOOD[: GOOD.index("routes:")] + "routes: []\n"):
        f.write_text(text)
        with pytest.raises(cfg.ConfigError) as info:
            cfg.load(f)
        assert [e.path for e in info.value.errors] == ["$.routes"]


def test_duplicate_keys_are_errors_with_both_lines() -> None:
    text = GOOD.replace("    to: pay\n", "    to: pay\n    to: feed\n")
    errors = [e for e in errors_of(text) if "duplicate" in e.message]
    (err,) = errors
    assert err.path == "$.routes[1].to"
    assert err.line == len(text.splitlines())  # the second `to`, the file's last line
    top = GOOD + "clusters: {}\n"
    assert "$.clusters" in {e.path for e in errors_of(top) if "duplicate" in e.message}


def test_jalur_check_refuses_an_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("")
    out, err = io.StringIO(), io.StringIO()
    assert cli.check(str(f), out, err) == 1
    assert "empty" in err.getvalue()
