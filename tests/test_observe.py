"""Observability end to end: promtool on the live exposition, the dashboard's and the rules'
PromQL against promtool and against the metrics the proxy really exports, and a real
Prometheus scraping a real proxy.

promtool and prometheus come from the Debian package ``prometheus`` (``.ci/run`` and
``make observe`` install it); the tests that need them skip only when they are not on PATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics
from proxy.router import Router

from .conftest import Harness, RedisServer, build_config, free_port, start_proxy

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config" / "grafana" / "jalur.json"
PROMETHEUS_CONFIG = ROOT / "config" / "prometheus.yml"
RULES = ROOT / "config" / "prometheus-rules.yml"
DEMO = ROOT / "proxy" / "demo" / "demo.yaml"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not on PATH; CI installs it (Debian package 'prometheus')",
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus is not on PATH; CI installs it (Debian package 'prometheus')",
)

# Grafana's variables, replaced by values a plain PromQL parser accepts.
GRAFANA_VARS = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "30m",
    "route": ".*",
    "instance": ".*",
}
GRAFANA_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
# A jalur_ metric name; not part of a recording rule name like route:jalur_requests:rate5m.
METRIC = re.compile(r"(?<![\w:])(jalur_\w+)(?![\w:])")
SELECTOR = re.compile(r"(?<![\w:])(jalur_\w+)(?![\w:])\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"instance", "job"})
TYPE_LINE = re.compile(r"^# TYPE (\S+) (\w+)$", re.M)
SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", re.M)

# Known traffic and the requests_total series it must leave behind:
# (route, category, cluster, method, code) -> count.
EXPECTED = {
    ("feed", "promotion", "feed", "GET", "200"): 3,
    ("payment", "payment", "pay", "POST", "200"): 2,
    ("orders", "user-data", "gone", "GET", "502"): 1,
}

T = TypeVar("T")


# -- the proxy under observation -----------------------------------------------------------


async def observed_proxy(h: Harness) -> tuple[int, int]:
    """A social and a commerce back end plus a cluster whose only endpoint refuses
    connections; returns (data port, admin port)."""
    feed = await h.backend("feed", "tiktok")
    pay = await h.backend("pay", "tokopedia")
    p = await h.proxy(
        {
            "clusters": {
                "feed": {"system": "tiktok", "endpoints": [feed.url]},
                "pay": {"system": "tokopedia", "endpoints": [pay.url]},
                "gone": {"system": "tokopedia", "endpoints": [f"http://127.0.0.1:{free_port()}"]},
            },
            "routes": [
                {
                    "name": "feed",
                    "match": {"prefix": "/api/feed"},
                    "category": "promotion",
                    "to": "feed",
                },
                {
                    "name": "payment",
                    "match": {"prefix": "/api/payment"},
                    "category": "payment",
                    "to": "pay",
                },
                {
                    "name": "orders",
                    "match": {"prefix": "/api/orders"},
                    "category": "user-data",
                    "to": "gone",
                },
            ],
        }
    )
    return p.data_port, p.admin_port


async def send_traffic(port: int) -> None:
    """Exactly the requests EXPECTED counts, plus one request no route matches."""
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(f"{base}/api/feed") as r:
                assert r.status == 200
        for _ in range(2):
            headers = {"Cookie": "tt_session=social-only"}
            async with s.post(f"{base}/api/payment/charge", data=b"{}", headers=headers) as r:
                assert r.status == 200
        async with s.get(f"{base}/api/orders/42") as r:
            assert r.status == 502
        async with s.get(f"{base}/api/nothing-here") as r:
            assert r.status == 404


async def scrape(admin_port: int) -> str:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{admin_port}/metrics", headers={"Accept": "text/plain"}) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


def exposed_names(text: str) -> set[str]:
    """Every series name the text exposition has or can have: sample names plus, for each
    declared family, its name and (histograms) the _bucket/_count/_sum series."""
    names = set(SAMPLE_LINE.findall(text))
    for name, kind in TYPE_LINE.findall(text):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        elif kind == "summary":
            names |= {f"{name}_count", f"{name}_sum"}
    return names


async def run(*argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- the dashboard and the rules -------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target of the dashboard."""
    out = []
    for panel in panels(dashboard()):
        for target in panel.get("targets", []):
            out.append(
                (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
            )
    return out


def variable_queries() -> list[str]:
    return [v["definition"] for v in dashboard()["templating"]["list"] if v.get("type") == "query"]


def rule_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [
        (f"rule {rule.get('record') or rule.get('alert')}", rule["expr"])
        for group in groups
        for rule in group["rules"]
    ]


def substitute(expr: str, **values: str) -> str:
    """``expr`` with Grafana's variables replaced (``values`` override ``GRAFANA_VARS``)."""
    known = {**GRAFANA_VARS, **values}

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in known, f"unhandled Grafana variable ${name} in {expr!r}"
        return known[name]

    return GRAFANA_VAR.sub(value, expr)


def test_dashboard_shape() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] >= 39
    assert dash["uid"] == "jalur-proxy"
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"
    # The route list exists from the start (a gauge per configured route), not only once a
    # route has answered; the pod picker lists every scraped Jalur (plain or PodMonitor).
    assert variables["route"]["definition"] == (
        'label_values(jalur_requests_in_flight{instance=~"$instance"}, route)'
    )
    assert variables["route"]["datasource"]["uid"] == "${datasource}"
    assert variables["instance"]["definition"] == "label_values(jalur_build_info, instance)"
    assert variables["instance"]["includeAll"]
    assert variables["instance"]["allValue"] == ".*"
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names.index("instance") < names.index("route")  # route depends on instance
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels(dash):
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            for name, matchers in SELECTOR.findall(target["expr"]):
                assert 'instance=~"$instance"' in matchers, f"{panel['title']}: {name}"
    # The panels the brief asks for, by the metric each one reads.
    used = {m for _, e in dashboard_exprs() for m in METRIC.findall(e)}
    assert used >= {
        "jalur_requests_total",
        "jalur_request_duration_seconds_bucket",
        "jalur_upstream_response_seconds_bucket",
        "jalur_requests_in_flight",
        "jalur_migration_requests_total",
        "jalur_compliance_blocked_total",
        "jalur_boundary_stripped_total",
        "jalur_consent_total",
        "jalur_upstream_errors_total",
        "jalur_config_reloads_total",
        "jalur_config_last_reload_success_timestamp_seconds",
        "jalur_requests_rejected_total",
        "jalur_idempotency_total",
        "jalur_migration_weights_held",
        "jalur_migration_category_weight",
    }
    exprs = " ".join(e for _, e in dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (route, le)" in exprs
        assert f"histogram_quantile({q}, sum by (cluster, le)" in exprs


def test_scrape_config_targets_the_demo_admin_listener() -> None:
    prom = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = prom["scrape_configs"]
    assert job["job_name"] == "jalur"
    assert job["metrics_path"] == "/metrics"
    assert prom["global"]["scrape_interval"] == "5s"
    demo = yaml.safe_load(DEMO.read_text())
    target = f"{demo['admin']['host']}:{demo['admin']['port']}"
    assert target == "127.0.0.1:9901"
    assert [t for sc in job["static_configs"] for t in sc["targets"]] == [target]


@needs_promtool
async def test_promtool_checks_the_scrape_config_and_rules() -> None:
    assert PROMTOOL is not None
    code, out, err = await run(PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG))
    assert code == 0, out + err
    assert "1 rule files found" in out + err
    code, out, err = await run(PROMTOOL, "check", "rules", str(RULES))
    assert code == 0, out + err


@needs_promtool
async def test_the_fleet_migration_rules_pass_their_promtool_unit_tests() -> None:
    """Two pods at 90 % and 50 % give the pooled 70 %, and the weighted all-figure; no
    traffic gives no figure (config/prometheus-rules.test.yml)."""
    assert PROMTOOL is not None
    code, out, err = await run(
        PROMTOOL, "test", "rules", str(RULES.parent / "prometheus-rules.test.yml")
    )
    assert code == 0, out + err
    assert "SUCCESS" in out + err


ALERT_TESTS = RULES.parent / "prometheus-alerts.test.yml"


def alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_every_alert_has_a_firing_and_a_silent_promtool_case_and_a_runbook() -> None:
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    assert set(cases) <= set(alerts()), "tests of alerts that do not exist"
    for name, rule in alerts().items():
        assert cases.get(name) == {True, False}, f"{name}: needs a firing and a silent case"
        anchor = name.lower()
        assert rule["annotations"]["runbook"] == f"docs/observability.md#{anchor}"
        doc = (ROOT / "docs" / "observability.md").read_text()
        assert f"\n### {name}\n" in doc, f"docs/observability.md has no section for {name}"


@needs_promtool
async def test_every_alert_passes_its_promtool_unit_tests() -> None:
    """config/prometheus-alerts.test.yml: each alert firing and not firing, JalurDown on a
    plain `jalur` job and on a PodMonitor's `<namespace>/jalur` target."""
    assert PROMTOOL is not None
    code, out, err = await run(PROMTOOL, "test", "rules", str(ALERT_TESTS))
    assert code == 0, out + err
    assert "SUCCESS" in out + err


def test_jalur_down_matches_the_job_names_jalur_ships() -> None:
    """The plain scrape config's job and the PodMonitor's operator job label
    (`<namespace>/<name>`) both match JalurDown's job regex; another job does not."""
    (pattern,) = re.findall(r'up\{job=~"([^"]+)"\}', alerts()["JalurDown"]["expr"])
    assert re.findall(r'up\{job=~"([^"]+)"\}', alerts()["JalurTargetsMissing"]["expr"]) == [pattern]
    (job,) = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    monitor = yaml.safe_load((ROOT / "config" / "k8s" / "podmonitor.yaml").read_text())
    for name in (job["job_name"], f"shop/{monitor['metadata']['name']}", "a-b/jalur"):
        assert re.fullmatch(pattern, name), name
    for name in ("node", "jalur-canary", "shop/jalur-canary", "shop/jalurx", "/jalur"):
        assert not re.fullmatch(pattern, name), name


@needs_promtool
async def test_every_dashboard_expression_passes_promtool_check_rules(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    exprs = dashboard_exprs()
    assert len(exprs) >= 12
    rules = [
        {"record": f"jalur:dashboard:expr_{i}", "expr": substitute(expr)}
        for i, (_, expr) in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    code, out, err = await run(PROMTOOL, "check", "rules", str(path))
    assert code == 0, out + err
    assert f"SUCCESS: {len(rules)} rules found" in out


async def test_dashboard_and_rules_use_only_metrics_the_proxy_exports(harness: Harness) -> None:
    port, admin = await observed_proxy(harness)
    await send_traffic(port)
    exposed = exposed_names(await scrape(admin))
    sources = [*dashboard_exprs(), *rule_exprs(), *(("variable", q) for q in variable_queries())]
    used = {(where, m) for where, expr in sources for m in METRIC.findall(expr)}
    assert used
    missing = sorted((where, m) for where, m in used if m not in exposed)
    assert not missing, f"not in /metrics: {missing}"


def test_dashboard_and_rules_use_only_labels_the_metrics_have() -> None:
    labels = labels_by_series()
    for where, expr in [*dashboard_exprs(), *rule_exprs()]:
        in_expr: set[str] = set()
        for name, matchers in SELECTOR.findall(expr):
            assert name in labels, f"{where}: unknown series {name}"
            for label in MATCHER.findall(matchers):
                assert label in labels[name] | TARGET_LABELS, f"{where}: {name} has no {label!r}"
            in_expr |= labels[name] | TARGET_LABELS
        if not in_expr:
            continue  # only recording-rule outputs or non-jalur series
        for group in GROUPING.findall(expr):
            for label in filter(None, (s.strip() for s in group.split(","))):
                assert label in in_expr, f"{where}: no series in {expr!r} has label {label!r}"


def labels_by_series() -> dict[str, set[str]]:
    """Sample name -> label names, from a registry where every family has samples."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    config = build_config(
        {
            "clusters": {
                "feed": {"system": "tiktok", "endpoints": ["http://127.0.0.1:9001"]},
                "pay": {"system": "tokopedia", "endpoints": ["http://127.0.0.1:9003"]},
            },
            "routes": [
                {"name": "feed", "match": {"prefix": "/f"}, "category": "promotion", "to": "feed"},
                {"name": "payment", "match": {"prefix": "/p"}, "category": "payment", "to": "pay"},
            ],
        }
    )
    bound = metrics.bind(Router(config.routes), config)
    route = bound.routes["payment"]
    route.enter()
    route.observe("pay", "POST", 200, 0.01, 2, 3)
    route.exit()
    route.retry()
    route.blocked("social-after-deadline")
    route.shadow("match")
    route.idempotency("replayed")
    route.rate_limited("user")
    bound.clusters["pay"].upstream_response(0.01)
    bound.clusters["pay"].error("timeout")
    bound.clusters["pay"].set_circuit_open(False)
    metrics.rejected("no_route")
    metrics.stripped("tokopedia", "cookie")
    metrics.consent("valid")
    metrics.set_migration_progress({"payment": 1.0, "all": 0.6})
    metrics.set_migration_config({"payment": 0.6}, {"checkout": False})
    metrics.migration_child("payment", "commerce").inc()
    metrics.config_reload(True)
    metrics.tls_reload(True)
    metrics.tls_expiry("listen.tls", "cert", "/etc/jalur/tls.crt", 1.8e9)
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render(None)[0].decode()):
        assert family.samples, f"{family.name} has no samples; populate it above"
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def test_the_docs_list_every_metric_with_its_type() -> None:
    text = (ROOT / "docs" / "observability.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    listed = dict(re.findall(r"^\| `(jalur_\w+)` \| (\w+) \|", section, re.M))
    registry = CollectorRegistry()
    Metrics(registry)
    defined = {
        f"{family.name}_total" if family.type == "counter" else family.name: family.type
        for family in registry.collect()
    }
    assert listed == defined


# -- promtool on the live exposition ---------------------------------------------------------


@needs_promtool
async def test_promtool_check_metrics_on_the_live_exposition(harness: Harness) -> None:
    assert PROMTOOL is not None
    port, admin = await observed_proxy(harness)
    await send_traffic(port)
    text = await scrape(admin)
    for (route, category, cluster, method, status), n in EXPECTED.items():
        line = (
            f'jalur_requests_total{{category="{category}",cluster="{cluster}",code="{status}",'
            f'method="{method}",route="{route}"}} {float(n)}'
        )
        assert line in text.splitlines(), line
    assert 'jalur_requests_rejected_total{reason="no_route"} 1.0' in text
    assert 'jalur_upstream_errors_total{cluster="gone",kind="connect"} 1.0' in text
    code, out, err = await run(PROMTOOL, "check", "metrics", stdin=text.encode())
    assert code == 0, out + err
    assert (out + err).strip() == "", out + err


# -- a real Prometheus -----------------------------------------------------------------------


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


async def until(
    deadline: float, probe: Callable[[], Awaitable[T | None]], what: str, log: Path
) -> T:
    """Poll ``probe`` until it returns a value, failing at ``deadline`` (monotonic)."""
    while True:
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; prometheus log:\n{tail(log)}")
        await asyncio.sleep(0.2)


class Prometheus:
    """A real ``prometheus`` scraping ``targets`` every second (job ``jalur``)."""

    def __init__(self, session: aiohttp.ClientSession, api: str, log: Path) -> None:
        self.session = session
        self.api = api
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def query(self, q: str) -> list[dict[str, Any]]:
        assert self.proc is not None
        assert self.proc.returncode is None, tail(self.log)
        async with self.session.get(f"{self.api}/api/v1/query", params={"query": q}) as r:
            body = await r.json()
        assert body["status"] == "success", (q, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, targets: list[str]) -> AsyncIterator[Prometheus]:
    assert PROMETHEUS is not None
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "jalur",
                        "metrics_path": "/metrics",
                        "static_configs": [{"targets": targets}],
                    }
                ],
            }
        )
    )
    web = f"127.0.0.1:{free_port()}"
    log = tmp_path / "prometheus.log"
    with log.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={web}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        async with aiohttp.ClientSession() as s:
            prom = Prometheus(s, f"http://{web}", log)
            prom.proc = proc

            async def ready() -> bool | None:
                assert proc.returncode is None, tail(log)
                try:
                    async with s.get(f"{prom.api}/-/ready") as r:
                        return True if r.status == 200 else None
                except aiohttp.ClientConnectionError:
                    return None

            await until(time.monotonic() + 60, ready, "prometheus to be ready", log)
            yield prom
    finally:
        if proc.returncode is None:
            proc.terminate()  # SIGTERM to this PID only
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, tail(log)


@pytest.mark.slow
@needs_prometheus
async def test_prometheus_scrapes_the_proxy(harness: Harness, tmp_path: Path) -> None:
    port, admin = await observed_proxy(harness)
    deadline = time.monotonic() + 60
    async with prometheus(tmp_path, [f"127.0.0.1:{admin}"]) as prom:
        query, log = prom.query, prom.log

        async def requests_total() -> dict[tuple[str, ...], float] | None:
            got = {
                tuple(
                    r["metric"][k] for k in ("route", "category", "cluster", "method", "code")
                ): float(r["value"][1])
                for r in await query('jalur_requests_total{job="jalur"}')
            }
            return got if got == EXPECTED else None

        await send_traffic(port)
        got = await until(deadline, requests_total, "the per-route series", log)
        assert got == EXPECTED

        (up,) = await query('up{job="jalur"}')
        assert up["value"][1] == "1"
        assert up["metric"]["instance"] == f"127.0.0.1:{admin}"
        rejected = await query("jalur_requests_rejected_total")
        counted = [(r["metric"]["reason"], r["value"][1]) for r in rejected]
        assert [c for c in counted if c[1] != "0"] == [("no_route", "1")]
        per_route = await query("sum by (route) (jalur_request_duration_seconds_count)")
        assert {r["metric"]["route"]: r["value"][1] for r in per_route} == {
            "feed": "3",
            "payment": "2",
            "orders": "1",
        }
        # Every dashboard and rule expression evaluates against real data without error.
        for _, expr in [*dashboard_exprs(), *rule_exprs()]:
            await query(substitute(expr))


# Panels that may be empty on a proxy that has not answered a request yet, and why; every
# other panel must show a value (0 counts) from the first scrapes on.
EMPTY_UNTIL_TRAFFIC = {
    "Error ratio (5xx / all) by route": "a ratio of no requests is undefined, not 0",
    "Requests/s by route and status code": "no status code has been answered yet",
    "Migration progress by category": "a share of no requests is no figure, not 0 or 1",
}


def idle_config(social: str, commerce: str, redis: RedisServer, audit: Path) -> dict[str, Any]:
    """The demo's routes (shadow, split, migration weights, payments deduplicated) on two
    back ends, sharing ``redis`` as the fleet store; listeners on free ports."""
    conf: dict[str, Any] = yaml.safe_load(DEMO.read_text())
    for spec in conf["clusters"].values():
        spec["endpoints"] = [social if spec["system"] == "tiktok" else commerce]
    del conf["listen"], conf["admin"]
    conf["compliance"]["audit"] = {"path": str(audit)}
    conf["access_log"] = {"enabled": False}
    conf["store"] = {"kind": "redis", "url": redis.url}
    return conf


@pytest.mark.slow
@needs_prometheus
async def test_every_panel_shows_a_value_on_an_idle_proxy_single_and_workers(
    harness: Harness, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A real Prometheus scrapes a fresh one-process proxy and a fresh ``--workers 2`` proxy
    (multiprocess exposition); every panel, per instance, returns a series (0, not "No
    data") except the two EMPTY_UNTIL_TRAFFIC names; the instance variable lists both."""
    social = await harness.backend("feed", "tiktok")
    commerce = await harness.backend("pay", "tokopedia")
    one, _, admin_one = await start_proxy(
        tmp_path, idle_config(social.url, commerce.url, redis_server, tmp_path / "one.log")
    )
    two, _, admin_two = await start_proxy(
        tmp_path,
        idle_config(social.url, commerce.url, redis_server, tmp_path / "two.log"),
        "--workers",
        "2",
    )
    instances = [a.removeprefix("http://") for a in (admin_one, admin_two)]
    panel_exprs = [
        (panel["title"], target["expr"])
        for panel in panels(dashboard())
        for target in panel.get("targets", [])
    ]
    try:
        async with prometheus(tmp_path, instances) as prom:

            async def empty_panels() -> list[tuple[str, str]] | None:
                empty = [
                    (instance, title)
                    for instance in instances
                    for title, expr in panel_exprs
                    if title not in EMPTY_UNTIL_TRAFFIC
                    and not await prom.query(substitute(expr, instance=instance))
                ]
                return empty or None

            deadline = time.monotonic() + 20
            empty: list[tuple[str, str]] | None = []
            while empty is not None and time.monotonic() < deadline:
                empty = await empty_panels()
                if empty:
                    await asyncio.sleep(0.5)
            assert empty is None, f"panels with no data on an idle proxy: {empty}"
            listed = await prom.query("count by (instance) (jalur_build_info)")
            assert sorted(r["metric"]["instance"] for r in listed) == sorted(instances)
    finally:
        for proc in (one, two):
            if proc.returncode is None:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 30)
