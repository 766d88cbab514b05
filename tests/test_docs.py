"""The README and docs/ as a new user reads them: a short README whose map reaches every
page, links and anchors that resolve, the four questions the map must answer at once, and
every error `reason` Jalur can answer explained in docs/troubleshooting.md."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from proxy import compliance, errors, paths

from .conftest import demo_on_port_base, free_port
from .test_loadtests import run as run_command

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(h) for h in HEADING.findall(text)}


def links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text()))


def test_readme_is_short_and_names_the_two_setup_commands() -> None:
    text = README.read_text()
    assert text.count("\n") <= 250
    assert "make demo" in text
    assert "make test" in text
    assert "## What Jalur does not do" in text


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_link_and_anchor_resolves(page: Path) -> None:
    for link in links(page):
        if re.match(r"^(https?|mailto):", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link} does not exist"
        if anchor:
            assert path.suffix == ".md", f"{page.name}: {link}"
            assert anchor in anchors(path), f"{page.name}: no heading #{anchor} in {path.name}"


def test_the_readme_map_reaches_every_page() -> None:
    mapped = {
        (README.parent / link.partition("#")[0]).resolve()
        for link in links(README)
        if link.startswith("docs/")
    }
    assert set(PAGES) <= mapped, sorted(p.name for p in set(PAGES) - mapped)


# (what a new user looks for, words of the README's map row, what the linked page must show)
FOUND_AT_ONCE = [
    ("deploy as a sidecar", "deploy Jalur as a sidecar", ["deployment-native-sidecar.yaml"]),
    ("ramp a migration", "ramp a migration", ["jalur migration ramp", "jalur migration rollback"]),
    ("what an alert means", "what an alert means", ["### JalurDown", "### JalurHighErrorRatio"]),
    ("run locust distributed", "run Locust", ["--master", "--worker --master-host"]),
]


@pytest.mark.parametrize(("task", "row", "shown"), FOUND_AT_ONCE, ids=[t[0] for t in FOUND_AT_ONCE])
def test_a_new_user_finds_it_from_the_map(task: str, row: str, shown: list[str]) -> None:
    (line,) = [line for line in README.read_text().splitlines() if row in line]
    (link,) = [x for x in LINK.findall(line) if x.startswith("docs/")][:1]
    target, _, anchor = link.partition("#")
    text = (README.parent / target).read_text()
    if anchor:  # the answer is in the linked section, not somewhere on the page
        sections = re.split(r"^(?=#{2,3} )", text, flags=re.M)
        text = "".join(s for s in sections if slug(s.split("\n", 1)[0].lstrip("# ")) == anchor)
        if anchor == "alerts":
            text = text + "".join(s for s in sections if s.startswith("### Jalur"))
    for words in shown:
        assert words in text, f"{task}: {link} does not show {words!r}"


# -- every reason in docs/troubleshooting.md -------------------------------------------------


def refusal_reasons() -> set[str]:
    """Every `reason` slug Jalur answers with: the path checker's, the error tree's, the
    compliance guard's, the boundary's, and each literal passed as a reason to
    ``answers.reject`` / ``gate_refusal``."""
    out = set(paths._MESSAGES)
    todo: list[type[errors.ProxyError]] = [errors.ProxyError]
    while todo:
        cls = todo.pop()
        out.add(cls.kind)
        todo.extend(cls.__subclasses__())
    out -= {"internal"}  # a bug, answered 500 without a reason to act on
    out |= {
        compliance.SOCIAL_AFTER_DEADLINE,
        compliance.SOCIAL_NOT_ALLOWED,
        compliance.UNKNOWN_CLUSTER,
        compliance.TRANSACTION_VARIANT,
        compliance.AMBIGUOUS_VARIANT,
    }
    boundary = ast.parse((ROOT / "proxy" / "boundary.py").read_text())
    for fn in ast.walk(boundary):
        if isinstance(fn, ast.FunctionDef) and fn.name == "check_names":
            for node in ast.walk(fn):
                if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
                    first = node.value.elts[0]
                    assert isinstance(first, ast.Constant)
                    assert isinstance(first.value, str)
                    out.add(first.value)
    for module in sorted((ROOT / "proxy").glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in {"reject", "gate_refusal"}  # (ex, status, message, reason)
            ):
                last = node.args[-1]
                if isinstance(last, ast.Constant) and isinstance(last.value, str):
                    out.add(last.value)
    return out


def test_troubleshooting_explains_every_reason() -> None:
    reasons = refusal_reasons()
    assert {"no_route", "encoded-slash", "social-after-deadline", "outcome_unknown"} <= reasons
    assert {"underscore_header", "header_name", "idempotency_store_unavailable"} <= reasons
    rows = [
        line for line in (DOCS / "troubleshooting.md").read_text().splitlines() if line[:1] == "|"
    ]
    explained = {slug for row in rows for slug in re.findall(r"`([\w-]+)`", row.split("|")[1])}
    missing = sorted(reasons - explained)
    assert not missing, f"docs/troubleshooting.md has no row for {missing}"


# -- the walkthroughs run as written ---------------------------------------------------------


def sh_blocks(text: str, after: str) -> list[str]:
    """The ```sh blocks of ``text`` after the heading ``after``, continuation lines joined."""
    section = text.split(after, 1)[1]
    return [b.replace("\\\n", " ") for b in re.findall(r"^```sh\n(.*?)^```", section, re.M | re.S)]


async def shell(script: str, limit: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``script`` run by bash in the repository's root: (exit code, combined output)."""
    return await run_command("bash", "-c", script, limit=limit, env=env)


async def test_the_readme_demo_answers_as_written(tmp_path: Path) -> None:
    """The five-minute demo's commands, run as written against `jalur demo` (moved to free
    ports with --port-base), show what their comments say."""
    (block,) = sh_blocks(README.read_text(), "## Five-minute demo")[:1]
    async with demo_on_port_base(tmp_path) as (base, admin):
        script = (
            block.replace("localhost:8080", f"127.0.0.1:{base}")
            .replace("localhost:9901", f"127.0.0.1:{admin}")
            .replace(".venv/bin/jalur migration", f"{sys.executable} -m proxy migration")
            .replace("proxy migration ", f"proxy migration --admin http://127.0.0.1:{admin} ")
        )
        assert script.count(str(base)) >= 8
        code, out = await shell("set -e\n" + script, limit=120)
    assert code == 0, out
    for shown in (
        "x-backend-system: tiktok",
        "x-backend-system: tokopedia",
        '"reason":"no_route"',
        "HTTP/1.1 400 Bad Request",
        "Idempotent-Replayed: true",
        "live:       shop-legacy=13, tokopedia-pay=87",
        "live:       shop-legacy=5, tokopedia-pay=95",
        '"status":"ready"',
        "jalur_requests_total{",
    ):
        assert shown in out, f"{shown!r} not in\n{out}"


async def test_the_documented_distributed_locust_run_works(tmp_path: Path) -> None:
    """docs/load-testing.md's master and worker commands, shortened to a few seconds and
    pointed at a demo on free ports, run to the end with a master and one worker."""
    blocks = sh_blocks((DOCS / "load-testing.md").read_text(), "## Locust by hand")
    lines = [line.strip() for line in blocks[0].splitlines()]
    (master,) = [line for line in lines if "--master " in line and not line.startswith("#")]
    (worker,) = [line for line in lines if "--worker" in line and not line.startswith("#")]
    port = str(free_port())
    async with demo_on_port_base(tmp_path) as (base, admin):

        def adapt(cmd: str) -> str:
            cmd = cmd.replace("http://127.0.0.1:8080", f"http://127.0.0.1:{base}")
            cmd = re.sub(r"-t \S+", "-t 3s", cmd)
            cmd = re.sub(r"-u \d+ -r \d+", "-u 4 -r 4", cmd)
            return cmd.replace("--expect-workers 2", "--expect-workers 1")

        master_cmd = adapt(master) + f" --master-bind-port {port} --only-summary"
        worker_cmd = adapt(worker) + f" --master-port {port}"
        assert master_cmd != master
        script = f"{master_cmd} & m=$!\n{worker_cmd} & w=$!\nwait $m; rm=$?\nwait $w; exit $rm"
        code, out = await shell(
            script, limit=90, env={"JALUR_LOADTEST_ADMIN_URL": f"http://127.0.0.1:{admin}"}
        )
    assert code == 0, out
    assert "Aggregated" in out, out
