"""The README and docs/ as a new user reads them: a short README whose map reaches every
page, links and anchors that resolve, the four questions the map must answer at once, and
every error `reason` Jalur can answer explained in docs/troubleshooting.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from proxy import compliance, errors, paths

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
    compliance guard's, the boundary's, and each literal passed as a reason in forward.py."""
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
    tree = ast.parse((ROOT / "proxy" / "forward.py").read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"_reject", "_gate_refusal"}  # (..., message, reason)
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
