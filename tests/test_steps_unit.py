"""Each step of ``steps.STEPS`` on its own, on a stand-in request: no listener, no socket.

A test brings the ``Exchange`` to the step under test by running the steps before it
(``upto``: none of them may answer), then calls that one step and looks at what it answered
or filled in, and at what it counted. The stand-in request is ``fakes.FakeRequest``; the
``State`` is compiled from a real ``Config`` (``fakes.unit_state``).

"Nothing allocated for a feature that is off" is measured, not assumed: ``allocated`` is the
peak of ``tracemalloc`` over one call of the step.
"""

from __future__ import annotations

import inspect
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest

from proxy import steps
from proxy.compliance import SOCIAL_AFTER_DEADLINE
from proxy.exchange import Exchange
from proxy.gate import settle
from proxy.health import Health
from proxy.steps import STEPS, Step

from .conftest import build_config
from .fakes import (
    FakeContent,
    FakeRequest,
    Unit,
    Version,
    closes,
    exchange,
    json_answer,
    unit_state,
)

SHOP = "http://127.0.0.1:9001"
FEED = "http://127.0.0.1:9002"
LEGACY = "http://127.0.0.1:9003"
TIGHT = "http://127.0.0.1:9004"
FUTURE = "2099-01-01T00:00:00+00:00"

# The documented order (the steps module's docstring; ARCHITECTURE.md's list plus the two
# steps the split added: rate_limit and buffer_body).
DOCUMENTED: tuple[str, ...] = (
    "framing",
    "canonical_path",
    "names",
    "route",
    "split",
    "variants",
    "guard",
    "body_limit",
    "rate_limit",
    "idempotency",
    "buffer_body",
    "admit",
    "headers",
    "shadow",
    "scrub",
)

CONFIG: dict[str, Any] = {
    "compliance": {
        "legacy_clusters": ["legacy"],
        "transition_until": FUTURE,
        "audit": {"path": "-"},
    },
    "clusters": {
        "shop": {"system": "tokopedia", "endpoints": [SHOP]},
        # One request at a time, one endpoint ejected by one failed connect.
        "tight": {
            "system": "tokopedia",
            "endpoints": [TIGHT],
            "max_requests": 1,
            "max_connections": 1,
            "max_pending": 0,
            "outlier_detection": {"consecutive_connect_failures": 1, "max_ejection_percent": 100},
        },
        "feed": {"system": "tiktok", "endpoints": [FEED]},
        "hashed": {
            "system": "tokopedia",
            "endpoints": [f"http://127.0.0.1:{port}" for port in range(9011, 9015)],
            "lb_policy": "hash",
            "hash_on": {"header": "x-cart"},
        },
        "legacy": {"system": "tiktok", "endpoints": [LEGACY]},
    },
    "routes": [
        {"name": "pay", "match": {"exact": "/pay"}, "category": "payment", "to": "shop"},
        {
            "name": "old-pay",
            "match": {"prefix": "/oldpay/"},
            "category": "payment",
            "split": [{"cluster": "legacy", "weight": 50}, {"cluster": "shop", "weight": 50}],
        },
        {
            "name": "small",
            "match": {"prefix": "/small"},
            "category": "promotion",
            "to": "tight",
            "max_body_bytes": 100,
        },
        {
            "name": "limited",
            "match": {"prefix": "/limited"},
            "category": "promotion",
            "to": "feed",
            "rate_limit": {"route": {"rate": 1, "burst": 1}},
        },
        {
            "name": "promo",
            "match": {"prefix": "/promo"},
            "category": "promotion",
            "split": [{"cluster": "feed", "weight": 50}, {"cluster": "shop", "weight": 50}],
            "sticky": {"header": "x-user"},
        },
        {
            "name": "deals",
            "match": {"prefix": "/deals"},
            "category": "promotion",
            "split": [{"cluster": "feed", "weight": 50}, {"cluster": "shop", "weight": 50}],
            "sticky": {"cookie": "deal"},
        },
        {
            "name": "mirror",
            "match": {"prefix": "/mirror"},
            "category": "promotion",
            "to": "shop",
            "shadow": {"cluster": "feed"},
        },
        {"name": "cart", "match": {"prefix": "/cart"}, "category": "cart", "to": "hashed"},
        {"name": "feed", "match": {"prefix": "/"}, "category": "promotion", "to": "feed"},
    ],
}


@pytest.fixture
async def unit() -> AsyncIterator[Unit]:
    async with unit_state(build_config(CONFIG)) as u:
        yield u


def upto(unit: Unit, request: FakeRequest, step: Step) -> Exchange:
    """An exchange for ``request`` that passed every (synchronous) step before ``step``."""
    ex = exchange(unit, request)
    for before in STEPS[: STEPS.index(step)]:
        out = before(ex)
        if inspect.isawaitable(out):
            cast(Any, out).close()  # tests of later steps do not need the wait
            continue
        assert out is None, f"step {before.__name__} answered"
    return ex


def answer(out: object) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of an answer a step gave."""
    return json_answer(out)


def allocated(call: Callable[[], object]) -> int:
    """Bytes allocated at the peak of one ``call()`` (after a warm-up call)."""
    _close(call())
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = call()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    _close(out)
    return peak


def _close(out: object) -> None:
    if inspect.iscoroutine(out):
        out.close()


def test_steps_are_in_the_documented_order() -> None:
    assert tuple(s.__name__ for s in STEPS) == DOCUMENTED
    # ... and the module says so in the same order (each name in ``backquotes``).
    doc = steps.__doc__ or ""
    positions = [doc.index(f"``{name}``") for name in DOCUMENTED]
    assert positions == sorted(positions)
    assert all(getattr(steps, name) is s for name, s in zip(DOCUMENTED, STEPS, strict=True))


# -- framing ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [Version(2, 0), Version(0, 9), Version(1, 2)])
async def test_framing_answers_505_to_a_version_not_served(unit: Unit, version: Version) -> None:
    ex = exchange(unit, FakeRequest(version=version))
    out = steps.framing(ex)
    status, body = answer(out)
    assert (status, body["reason"]) == (505, "version")
    assert closes(out)  # what was pipelined after it is not trusted
    assert unit.value("jalur_requests_rejected_total", reason="version") == 1


@pytest.mark.parametrize("coding", ["gzip", "gzip, chunked", "identity, chunked", "chunked, x"])
async def test_framing_answers_501_to_a_transfer_coding_other_than_chunked(
    unit: Unit, coding: str
) -> None:
    request = FakeRequest("POST", headers={"Host": "shop.test", "Transfer-Encoding": coding})
    status, body = answer(steps.framing(exchange(unit, request)))
    assert (status, body["reason"]) == (501, "transfer_encoding")


@pytest.mark.parametrize("version", [Version(1, 0), Version(1, 1)])
async def test_framing_passes_http_1_0_and_1_1_and_chunked(unit: Unit, version: Version) -> None:
    request = FakeRequest(
        "POST", headers={"Host": "shop.test", "Transfer-Encoding": "Chunked"}, version=version
    )
    assert steps.framing(exchange(unit, request)) is None


# -- canonical_path, names ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers", "reason"),
    [
        ("/../etc/passwd", {"Host": "shop.test"}, "dot-segment-above-root"),
        ("/pay%2fx", {"Host": "shop.test"}, "encoded-slash"),
        ("/a%zz", {"Host": "shop.test"}, "bad-escape"),
        ("/pay;jsessionid=1", {"Host": "shop.test"}, "path-parameter"),
        ("/", [("Host", "a.test"), ("Host", "b.test")], "several-hosts"),
        ("/", {"Host": "a..b"}, "invalid-host"),
    ],
)
async def test_canonical_path_answers_400_to_a_target_with_two_readings(
    unit: Unit, path: str, headers: Any, reason: str
) -> None:
    ex = upto(unit, FakeRequest(path=path, headers=headers), steps.canonical_path)
    status, body = answer(steps.canonical_path(ex))
    assert (status, body["reason"]) == (400, reason)
    assert ex.flags == "DPE"
    assert unit.value("jalur_requests_rejected_total", reason=reason) == 1


async def test_canonical_path_sets_the_one_reading_that_is_routed_and_forwarded(
    unit: Unit,
) -> None:
    request = FakeRequest(path="/promo/%7Esale/./x?b=1", headers={"Host": "SHOP.Test.:8080"})
    ex = upto(unit, request, steps.canonical_path)
    assert steps.canonical_path(ex) is None
    assert ex.host_name == "shop.test"
    assert ex.upstream_target == "/promo/~sale/x?b=1"


async def test_names_answers_400_to_an_underscore_header(unit: Unit) -> None:
    request = FakeRequest(headers={"Host": "shop.test", "X_User": "u1"})
    status, body = answer(steps.names(upto(unit, request, steps.names)))
    assert (status, body["reason"]) == (400, "underscore_header")


# -- route, split -------------------------------------------------------------------------


async def test_route_answers_404_when_nothing_matches() -> None:
    conf = build_config({**CONFIG, "routes": CONFIG["routes"][:1]})  # only /pay
    async with unit_state(conf) as u:
        ex = upto(u, FakeRequest(path="/elsewhere"), steps.route)
        status, body = answer(steps.route(ex))
        assert (status, body["reason"]) == (404, "no_route")
        assert ex.flags == "NR"
        assert ex.route is None
        assert not closes(steps.route(ex))  # a 404 keeps the connection
        assert u.value("jalur_requests_rejected_total", reason="no_route") == 2


async def test_route_sets_the_route_and_its_policy_and_counts_it_in_flight(unit: Unit) -> None:
    ex = upto(unit, FakeRequest(path="/pay"), steps.route)
    assert steps.route(ex) is None
    assert ex.route is not None
    assert ex.route.name == "pay"
    assert ex.policy is unit.state.policies["pay"]
    assert unit.value("jalur_requests_in_flight", route="pay") == 1
    unit.state.bound.routes["pay"].exit()


@pytest.mark.parametrize(
    ("path", "sticky"),
    [("/promo", lambda k: {"x-user": k}), ("/deals", lambda k: {"Cookie": f"a=1; deal={k}"})],
    ids=["header", "cookie"],
)
async def test_split_keeps_a_sticky_key_on_one_cluster(
    unit: Unit, path: str, sticky: Callable[[str], dict[str, str]]
) -> None:
    def cluster_of(key: str) -> str:
        ex = upto(unit, FakeRequest(path=path, headers={"Host": "s", **sticky(key)}), steps.split)
        assert steps.split(ex) is None
        assert ex.cluster is not None
        return ex.cluster.name

    keys = [f"user-{i}" for i in range(40)]
    first = {k: cluster_of(k) for k in keys}
    assert all(cluster_of(k) == first[k] for k in keys)  # the same key, the same cluster
    assert set(first.values()) == {"feed", "shop"}  # and the keys spread over both


async def test_split_with_one_live_target_never_reads_a_key(unit: Unit) -> None:
    ex = upto(unit, FakeRequest(path="/pay"), steps.split)
    assert steps.split(ex) is None
    assert ex.cluster is unit.state.clusters["shop"]


# -- variants, guard ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/pay.json", "/PAY/", "/pay/confirm"])
async def test_variants_refuses_a_social_request_that_reads_as_a_transaction_path(
    unit: Unit, path: str
) -> None:
    ex = upto(unit, FakeRequest("POST", path), steps.variants)
    assert ex.cluster is not None
    assert ex.cluster.kind == "social"
    status, _ = answer(steps.variants(ex))
    assert status == 400
    assert ex.flags == "UAEX"
    assert ex.reason  # audited as blocked


async def test_guard_answers_503_once_the_transition_deadline_passed(unit: Unit) -> None:
    deadline = unit.state.guard.deadline
    assert deadline is not None
    request = FakeRequest(path="/oldpay/x", headers={"Host": "s"})
    legacy = None
    for _ in range(200):  # the split picks the legacy cluster about every other time
        legacy = upto(unit, request, steps.guard)
        assert legacy.cluster is not None
        if legacy.cluster.name == "legacy":
            break
    assert legacy is not None
    assert steps.guard(legacy) is None  # before the deadline
    unit.services.clock = lambda: deadline
    status, body = answer(steps.guard(legacy))
    assert (status, body["reason"]) == (503, SOCIAL_AFTER_DEADLINE)
    assert legacy.flags == "UAEX"
    labels = {"route": "old-pay", "reason": SOCIAL_AFTER_DEADLINE}
    assert unit.value("jalur_compliance_blocked_total", **labels) == 1


# -- body_limit ---------------------------------------------------------------------------


async def test_body_limit_answers_413_by_content_length_before_reading_a_byte(
    unit: Unit,
) -> None:
    request = FakeRequest("POST", "/small", body=b"x" * 101)
    ex = upto(unit, request, steps.body_limit)
    status, body = answer(out := steps.body_limit(ex))
    assert (status, body["reason"]) == (413, "body_too_large")
    assert request.content.read == 0  # never read, never invited (no 100 Continue)
    assert request.writer.written == []
    assert request.linger  # the listener reads and drops the rest briefly
    assert closes(out)
    assert unit.value("jalur_requests_rejected_total", reason="body_too_large") == 1


async def test_body_limit_passes_a_body_at_the_limit_and_keeps_the_limit(unit: Unit) -> None:
    ex = upto(unit, FakeRequest("POST", "/small", body=b"x" * 100), steps.body_limit)
    assert steps.body_limit(ex) is None
    assert ex.limit == 100


# -- the steps of features that may be off -----------------------------------------------


async def test_rate_limit_costs_nothing_when_off_and_waits_only_when_on(unit: Unit) -> None:
    off = upto(unit, FakeRequest(path="/promo"), steps.rate_limit)
    assert steps.rate_limit(off) is None
    assert allocated(lambda: steps.rate_limit(off)) == 0
    on = upto(unit, FakeRequest(path="/limited"), steps.rate_limit)
    first = steps.rate_limit(on)
    assert inspect.iscoroutine(first)
    assert await first is None  # the bucket's one token
    second = steps.rate_limit(upto(unit, FakeRequest(path="/limited"), steps.rate_limit))
    assert second is not None
    status, body = answer(await second)
    assert status == 429
    assert body["reason"] == "route_rate_limited"


@pytest.mark.parametrize(("method", "path"), [("POST", "/promo"), ("GET", "/pay")])
async def test_idempotency_is_none_and_allocates_nothing_when_off(
    unit: Unit, method: str, path: str
) -> None:
    # No gate on the route, or a method the gate does not hold.
    ex = upto(unit, FakeRequest(method, path, body=b"a=1"), steps.idempotency)
    assert steps.idempotency(ex) is None
    assert allocated(lambda: steps.idempotency(ex)) == 0
    assert ex.gate is None
    assert ex.body is None


async def test_idempotency_is_a_coroutine_only_on_a_gated_post(unit: Unit) -> None:
    key = {"Host": "s", "Idempotency-Key": "k-1", "Authorization": "Bearer u"}
    ex = upto(unit, FakeRequest("POST", "/pay", headers=key, body=b"amount=1"), steps.idempotency)
    out = steps.idempotency(ex)
    assert inspect.iscoroutine(out)
    assert allocated(lambda: steps.idempotency(ex)) > 0  # the coroutine, at least
    assert await out is None  # a new key: forwarded, holding its lock
    assert ex.ticket is not None
    assert ex.body is not None
    assert ex.body.preread == b"amount=1"
    await settle(ex)  # nothing was sent: the key is released, its renewal stops
    assert ex.ticket.renewer is not None
    assert ex.ticket.settled
    assert unit.value("jalur_idempotency_total", route="pay", outcome="released") == 1
    missing = upto(unit, FakeRequest("POST", "/pay", body=b"amount=1"), steps.idempotency)
    assert await cast(Any, steps.idempotency(missing)) is None  # not required by default


async def test_buffer_body_is_none_without_a_body_and_reads_a_small_one(unit: Unit) -> None:
    bodiless = upto(unit, FakeRequest(path="/promo"), steps.buffer_body)
    assert steps.buffer_body(bodiless) is None
    assert allocated(lambda: steps.buffer_body(bodiless)) == 0
    request = FakeRequest("POST", "/promo", body=[b"a=1&", b"b=2"])
    ex = upto(unit, request, steps.buffer_body)
    out = steps.buffer_body(ex)
    assert inspect.iscoroutine(out)
    assert await out is None
    assert ex.body is not None
    assert ex.body.preread == b"a=1&b=2"


async def test_buffer_body_answers_413_for_a_body_over_the_limit_without_length(
    unit: Unit,
) -> None:
    request = FakeRequest(
        "POST",
        "/small",
        headers={"Host": "s", "Transfer-Encoding": "chunked"},
        content=FakeContent([b"x" * 60, b"y" * 60]),
    )
    ex = upto(unit, request, steps.buffer_body)
    status, body = answer(await cast(Any, steps.buffer_body(ex)))
    assert (status, body["reason"]) == (413, "body_too_large")


async def test_shadow_is_none_without_a_plan_and_copies_with_one(unit: Unit) -> None:
    off = upto(unit, FakeRequest(path="/promo"), steps.shadow)
    assert steps.shadow(off) is None
    assert allocated(lambda: steps.shadow(off)) == 0
    assert off.copy is None
    on = upto(unit, FakeRequest(path="/mirror/a?q=1"), steps.shadow)
    assert steps.shadow(on) is None
    assert on.copy is not None
    assert on.copy.plan.cluster.name == "feed"


# -- admit --------------------------------------------------------------------------------


async def test_admit_answers_503_uo_when_the_circuit_breaker_is_open(unit: Unit) -> None:
    first = upto(unit, FakeRequest(path="/small"), steps.admit)
    assert steps.admit(first) is None  # takes the cluster's one slot
    assert first.host is not None
    assert first.endpoint is not None
    second = upto(unit, FakeRequest(path="/small"), steps.admit)
    status, body = answer(steps.admit(second))
    assert (status, body["reason"]) == (503, "overflow")
    assert second.flags == "UO"
    assert second.admitted is None
    assert unit.value("jalur_circuit_open", cluster="tight") == 1
    assert unit.value("jalur_upstream_errors_total", cluster="tight", kind="overflow") == 1
    tight = unit.state.clusters["tight"]
    tight.finish(first.host, False)
    assert tight.active == 0
    assert unit.value("jalur_circuit_open", cluster="tight") == 0


async def test_admit_answers_503_uh_when_no_endpoint_is_healthy(unit: Unit) -> None:
    tight = unit.state.clusters["tight"]
    tight.health.failed(tight.hosts[0], True)  # one failed connect ejects it (this config)
    assert tight.hosts[0].state is Health.EJECTED
    ex = upto(unit, FakeRequest(path="/small"), steps.admit)
    status, body = answer(steps.admit(ex))
    assert (status, body["reason"]) == (503, "no_healthy_upstream")
    assert ex.flags == "UH"
    assert ex.admitted is tight  # admitted, so the driver releases it
    tight.finish(ex.host, False)
    assert tight.active == 0


async def test_admit_picks_the_same_endpoint_for_the_same_hash_key(unit: Unit) -> None:
    def endpoint_of(cart: str) -> str:
        ex = upto(
            unit, FakeRequest(path="/cart", headers={"Host": "s", "x-cart": cart}), steps.admit
        )
        assert steps.admit(ex) is None
        assert ex.hash_key == cart
        assert ex.endpoint is not None
        return ex.endpoint.url

    carts = [f"cart-{i}" for i in range(40)]
    first = {c: endpoint_of(c) for c in carts}
    assert all(endpoint_of(c) == first[c] for c in carts)
    assert len(set(first.values())) > 1


# -- headers, scrub -----------------------------------------------------------------------


async def test_headers_drops_hop_by_hop_fields_and_sets_forwarding_ones(unit: Unit) -> None:
    request = FakeRequest(
        "POST",
        "/promo?x=1",
        headers=[
            ("Host", "shop.test"),
            ("Connection", "keep-alive, X-Secret"),
            ("Connection", "Idempotency-Key"),  # may not be removed that way
            ("Idempotency-Key", "k"),
            ("X-Secret", "s"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic x"),
            ("Expect", "100-continue"),
            ("Via", "1.0 edge"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("Accept", "a"),
            ("Accept", "b"),
        ],
        body=b"",
        remote="10.1.2.3",
        scheme="https",
    )
    ex = upto(unit, request, steps.headers)
    assert steps.headers(ex) is None
    out = ex.out_headers
    assert out is not None
    for gone in ("Connection", "X-Secret", "Keep-Alive", "TE", "Proxy-Authorization", "Expect"):
        assert gone not in out
    assert out["Idempotency-Key"] == "k"
    assert out.getall("Accept") == ["a", "b"]
    assert out["X-Forwarded-For"] == "10.1.2.3"  # no trusted hops: the client's claim dropped
    assert out["X-Forwarded-Proto"] == "https"
    assert out["X-Forwarded-Host"] == "shop.test"
    assert out["Via"] == "1.0 edge, 1.1 jalur"
    assert out["X-Request-Id"] == ex.request_id


async def test_scrub_strips_what_the_other_system_owns_and_counts_it(unit: Unit) -> None:
    request = FakeRequest(
        path="/small",
        headers={
            "Host": "shop.test",
            "x-tt-user": "social-id",  # the social system's identity, bound for commerce
            "Cookie": "tt_session=abc; cart=1",
        },
    )
    ex = upto(unit, request, steps.scrub)
    assert ex.cluster is not None
    assert ex.cluster.system == "tokopedia"
    assert steps.scrub(ex) is None
    out = ex.out_headers
    assert out is not None
    assert "x-tt-user" not in out
    assert "tt_session" not in out.get("Cookie", "")
    assert "cart=1" in out.get("Cookie", "")
    for kind in ("headers", "cookies"):
        assert unit.value("jalur_boundary_stripped_total", system="tokopedia", kind=kind) == 1


async def test_scrub_of_a_clean_request_counts_nothing(unit: Unit) -> None:
    ex = upto(unit, FakeRequest(path="/small"), steps.scrub)
    assert steps.scrub(ex) is None
    assert ex.consent is None
    assert unit.value("jalur_boundary_stripped_total", system="tokopedia", kind="headers") == 0


async def test_buffer_body_answers_408_to_a_body_that_stalls_and_closes_at_once() -> None:
    conf = build_config({**CONFIG, "listen": {"host": "127.0.0.1", "body_idle_timeout": 0.05}})
    async with unit_state(conf) as u:
        request = FakeRequest(
            "POST", "/promo", content=FakeContent([b"a=1"], stall=True), content_length=10
        )
        ex = upto(u, request, steps.buffer_body)
        status, body = answer(await cast(Any, steps.buffer_body(ex)))
        assert (status, body["reason"]) == (408, "body_timeout")
        assert request.linger == 0  # a stalled client sends nothing more: no lingering
        assert u.value("jalur_requests_rejected_total", reason="body_timeout") == 1


async def test_buffer_body_invites_a_waiting_body_once_and_only_when_reading_it(
    unit: Unit,
) -> None:
    headers = {"Host": "s", "Expect": "100-continue"}
    request = FakeRequest("POST", "/promo", headers=headers, body=[b"a=1", b"&b=2"])
    ex = upto(unit, request, steps.buffer_body)
    assert request.writer.written == []  # no step before it invited the body
    assert await cast(Any, steps.buffer_body(ex)) is None
    assert request.writer.written == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    assert ex.body is not None
    assert ex.body.preread == b"a=1&b=2"
    assert ex.body.bytes == 7


async def test_no_step_invites_a_body_it_refuses(unit: Unit) -> None:
    headers = {"Host": "s", "Expect": "100-continue", "Content-Length": "500"}
    request = FakeRequest("POST", "/small", headers=headers, content=FakeContent([b"x" * 500]))
    ex = exchange(unit, request)
    for step in STEPS:
        out = step(ex)
        if inspect.isawaitable(out):
            out = await out
        if out is not None:
            break
    assert answer(out)[0] == 413
    assert request.writer.written == []
    assert request.content.read == 0
