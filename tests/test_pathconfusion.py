"""Path confusion: no crafted target gets a transaction path to the social back end.

The proxy under test has commerce transaction routes (case-insensitive prefixes) and a
social catch-all, the configuration most exposed to confusion. Each case states where the
request must end: served by commerce, refused with 400, or (for genuinely promotional
paths) served by social; and whatever happens, the social back end never receives a path
that any lenient reading (tests/pathconfusion.py, independent of proxy.compliance) puts
under a transaction prefix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .pathconfusion import Running, is_transaction, run_in_thread, send

CATALOGUE = [
    ("/api/payment", "commerce"),
    ("/API/PAYMENT", "commerce"),
    ("/Api/Payment/charge", "commerce"),
    ("/api/payment/../feed", "social"),
    ("/api/feed/../payment", "commerce"),
    ("/api/feed/%2e%2e/payment", "commerce"),
    ("/api/feed/%2E%2E/payment", "commerce"),
    ("/api/feed/.%2e/payment", "commerce"),
    ("/api/feed/%2e./payment", "commerce"),
    ("/api/./payment", "commerce"),
    ("/api//payment", "commerce"),
    ("//api/payment", "commerce"),
    ("///api///payment", "commerce"),
    ("/api/payment/", "commerce"),
    ("/api/feed/..%2fpayment", "400"),
    ("/api/feed%2f..%2fpayment", "400"),
    ("/api/feed/..%5cpayment", "400"),
    ("/api/feed\\..\\payment", "400"),
    ("/api/pay%6dent", "commerce"),
    ("/api/%70ayment", "commerce"),
    ("/api/%2570ayment", "400"),
    ("/api/%25%37%30ayment", "400"),
    ("/api/payment%00", "400"),
    ("/api/payment%00.html", "400"),
    ("/api/payment;x=1", "400"),
    ("/api/payment%3bx=1", "400"),
    ("/api;/payment", "400"),
    ("/api/pay;ment", "400"),
    ("/api/payment.", "commerce"),
    ("/api/payment%2e", "commerce"),
    ("/api./payment", "400"),
    ("/api%2e/payment", "400"),
    ("/api%20/payment", "400"),
    ("/api/payment%20", "commerce"),
    ("/api/payment%09", "400"),
    ("/api/%EF%BD%90ayment", "400"),
    ("/api/%EF%BC%8Fpayment", "400"),
    ("%EF%BC%8Fapi%EF%BC%8Fpayment", "400"),
    ("/api/pa%C0%B4ment", "400"),
    ("/api/%C0%AE%C0%AE/payment", "400"),
    ("/api/feed/%C0%AE%C0%AE/payment", "400"),
    ("/api/payment%23frag", "commerce"),
    ("/api/payment#frag", "400"),
    ("/api/payment?x=/api/feed", "commerce"),
    ("/api/feed?/api/payment", "social"),
    ("/api/feed#/../payment", "400"),
    ("/api/checkout", "commerce"),
    ("/api/CHECKOUT/x", "commerce"),
    ("/api/feed/../../api/cart", "commerce"),
    ("/api/cart%2F1", "400"),
    ("/api/orders/%2e%2e/%2e%2e/api/orders", "commerce"),
    ("/api/orders/1/../../feed", "social"),
    ("/api/feed/..;/payment", "400"),
    ("/api/feed/.;/payment", "400"),
    ("/api/feed/%2e;/../payment", "400"),
    ("/API/FEED/../PAYMENT", "commerce"),
    ("http://shop.test/api/payment", "commerce"),
    ("http://evil.test/api/payment", "400"),
    ("http://shop.test/api/feed/../payment", "commerce"),
    ("/api/feed/%252e%252e/payment", "400"),
    ("/api/feed/%25252e%25252e/payment", "400"),
    ("/api/feed/..%c0%afpayment", "400"),
    ("/api/feed/..%e0%80%afpayment", "400"),
    ("/api/feed/..%25c0%25afpayment", "400"),
    ("/api/payment .", "400"),
    ("/api/feed", "social"),
    ("/api/feed/video", "social"),
    ("/shop/items", "social"),
    ("/api/paymentx", "commerce"),
    ("/api/payments", "commerce"),
]

# `make fuzz` raises this to 100,000.
EXAMPLES = int(os.environ.get("JALUR_FUZZ_EXAMPLES", "2000"))

# Targets are built from segments a back end might confuse: transaction words spelled in
# the ways back ends normalise (case, escapes, fullwidth), decorated with what back ends
# trim or ignore, joined by separators back ends may read as "/".
WORDS = [
    "api", "API", "payment", "PayMent", "%70ayment", "%2570ayment", "pay%6dent",
    "%EF%BD%90ayment", "checkout", "CART", "orders", "feed", "live", "x", "..", ".",
]  # fmt: skip
PRE = ["", "", "", ".", "..", "%2e", "%2e%2e", "%EF%BC%8E", ";"]
POST = [
    "", "", "", ".", "%2e", "%20", "%09", ";x=1", "%3b", "%00", "%23", "#", "%C0%AE", "\\",
    "?", "%3f", "%2f", "%5c", "%ff",
]  # fmt: skip
SEPARATORS = ["/", "/", "/", "//", "%2f", "%2F", "\\", "/./", "/../", "%5c", "%EF%BC%8F"]

segments = st.tuples(st.sampled_from(PRE), st.sampled_from(WORDS), st.sampled_from(POST))


def _join(parts: list[tuple[str, str, str]], seps: list[str], absolute: bool) -> str:
    path = ""
    seps = ["/", *seps[1:]]  # origin-form starts with "/"; the rest may be anything
    for (pre, word, post), sep in zip(parts, seps, strict=False):
        path += sep + pre + word + post
    return ("http://shop.test" if absolute else "") + path


free_targets = st.integers(min_value=1, max_value=5).flatmap(
    lambda n: st.builds(
        _join,
        st.lists(segments, min_size=n, max_size=n),
        st.lists(st.sampled_from(SEPARATORS), min_size=n, max_size=n),
        st.booleans(),
    )
)

TX_WORDS = ["payment", "PayMent", "%70ayment", "%2570ayment", "pay%6dent", "%EF%BD%90ayment",
            "checkout", "CART", "orders"]  # fmt: skip

# Half the examples aim straight at a transaction prefix behind a social-looking spelling.
focused_targets = st.builds(
    lambda a, sep, b, tail: _join([a, b, *tail], ["/", sep, *["/"] * len(tail)], False),
    st.tuples(st.sampled_from(PRE), st.sampled_from(["api", "API", "feed", "live"]),
              st.sampled_from(POST)),
    st.sampled_from(SEPARATORS),
    st.tuples(st.sampled_from(PRE), st.sampled_from(TX_WORDS), st.sampled_from(POST)),
    st.lists(segments, max_size=2),
)  # fmt: skip

targets = st.one_of(free_targets, focused_targets)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    yield from run_in_thread(tmp_path_factory.mktemp("pathconfusion"))


def test_catalogue_has_enough_cases() -> None:
    assert len(CATALOGUE) >= 60


@pytest.mark.parametrize(("target", "expected"), CATALOGUE)
def test_path_confusion_catalogue(running: Running, target: str, expected: str) -> None:
    running.clear()
    status = send(running.port, target.encode("latin-1"))
    social, commerce = running.social_paths(), running.commerce_paths()
    assert not [p for p in social if is_transaction(p)]
    if expected == "commerce":
        assert status == 200
        assert len(commerce) == 1
        assert not social
    elif expected == "social":
        assert status == 200
        assert len(social) == 1
        assert not commerce
    else:
        assert status == int(expected)
        assert not social
        assert not commerce


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(target=targets)
def test_no_generated_path_reaches_social_as_a_transaction(running: Running, target: str) -> None:
    running.clear()
    status = send(running.port, target.encode("latin-1"))
    leaked = [p for p in running.social_paths() if is_transaction(p)]
    assert not leaked, (target, status, leaked)
    assert status != 0  # always an answer, never a dropped connection
