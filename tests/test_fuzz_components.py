"""Fuzz the per-request pure functions with arbitrary input: the canonicaliser, the router,
the variant check and the boundary. Only documented exceptions may come out (PathError);
anything else is a crash. `make test` runs 300 examples; `make fuzz` sets
JALUR_FUZZ_EXAMPLES (100,000)."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy import config as cfg
from proxy import paths
from proxy.boundary import Boundary
from proxy.compliance import VariantCheck
from proxy.router import Router

DEMO = cfg.load(Path(__file__).parent.parent / "config" / "demo.yaml")
ROUTER = Router(DEMO.routes)
VARIANTS = VariantCheck(DEMO, ROUTER)
BOUNDARY = Boundary(DEMO)

EXAMPLES = int(os.environ.get("JALUR_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

raw_targets = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.sampled_from("/%.;\\?#aApP0129fFeE~-_ :@\x00\t"), max_size=120).map(
        lambda s: "/" + s
    ),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
)
header_names = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
    min_size=1,
    max_size=30,
)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=200)
headers = st.lists(st.tuples(header_names, header_values), max_size=20)


def one_request(target: str, host: str | None, pairs: list[tuple[str, str]]) -> None:
    h: CIMultiDict[str] = CIMultiDict(pairs)
    try:
        canonical = paths.canonicalize(target, host)
    except paths.PathError as exc:
        if not exc.reason:
            raise AssertionError("PathError without a reason slug") from exc
        return
    route = ROUTER.match("GET", host or "", canonical.path, h)
    kind = "social" if route is None else "commerce"
    VARIANTS.check(target, route, kind)
    BOUNDARY.check_names(h)
    for system in DEMO.systems:
        copy = h.copy()
        BOUNDARY.scrub(copy, system)
        BOUNDARY.filter_response(copy, system)


@FUZZ
@given(target=raw_targets, host=st.one_of(st.none(), st.text(max_size=40)), pairs=headers)
def test_no_input_crashes_the_request_path(
    target: str, host: str | None, pairs: list[tuple[str, str]]
) -> None:
    one_request(target, host, pairs)
