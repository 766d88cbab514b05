"""The retry loop (``attempts.prepare`` / ``send`` / ``within``) on the fake upstream: no
sockets, no listener, no Redis.

Each test compiles a real ``Config`` (``build_state``) with a ``FakeTransport`` behind its
clusters, runs a ``FakeRequest`` through ``steps.STEPS`` (so the ``Exchange`` holds what the
retry loop reads: cluster, route policy, endpoint, headers, body, idempotency ticket) and
then calls the retry loop directly. The fake records every attempt (endpoint, headers,
body read), so the assertions are on attempt counts and order, never on sleeps: backoffs
are configured at a millisecond.

``done`` ends the exchange as the driver does and checks that nothing stays counted
(endpoint attempts, admission, retry-budget slots).
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import pytest

from proxy import attempts, errors
from proxy import config as cfg
from proxy.attempts import STALE_RESENDS
from proxy.compliance import SOCIAL_AFTER_DEADLINE
from proxy.exchange import Answer, Exchange
from proxy.gate import settle
from proxy.health import Health
from proxy.retry import BUDGET, NO_OTHER_ENDPOINT
from proxy.steps import STEPS
from proxy.upstream import UpstreamResponse

from .conftest import build_config
from .fakes import (
    HANG,
    FakeContent,
    FakeRequest,
    FakeResponse,
    Handler,
    Unit,
    exchange,
    json_answer,
    refused,
    reset,
    script,
    unit_state,
)

A = "http://127.0.0.1:9001"
B = "http://127.0.0.1:9002"
# Tiny backoffs: a retry waits at most a millisecond or two.
FAST: dict[str, Any] = {"backoff": {"base": 0.001, "max": 0.002}}
FUTURE = "2099-01-01T00:00:00+00:00"


def config(
    *,
    endpoints: tuple[str, ...] = (A, B),
    retry: dict[str, Any] | None = None,
    category: str = "promotion",
    system: str = "tokopedia",
    route: dict[str, Any] | None = None,
    compliance: dict[str, Any] | None = None,
    **cluster: Any,
) -> cfg.Config:
    """One cluster ``c`` and one catch-all route ``all`` to it."""
    spec: dict[str, Any] = {"system": system, "endpoints": list(endpoints), **cluster}
    spec["retry"] = {**FAST, **(retry or {})}
    data: dict[str, Any] = {
        "clusters": {"c": spec},
        "routes": [{"name": "all", "match": {}, "category": category, "to": "c", **(route or {})}],
    }
    if compliance is not None:
        data["compliance"] = {**compliance, "audit": {"path": "-"}}
    return build_config(data)


async def ready(unit: Unit, request: FakeRequest) -> Exchange:
    """An exchange past every step (none may answer), as the driver hands it on."""
    ex = exchange(unit, request)
    for step in STEPS:
        out = step(ex)
        if inspect.isawaitable(out):
            out = await out
        assert out is None, f"step {step.__name__} answered {out.status}"
    return ex


async def done(ex: Exchange) -> None:
    """The driver's ``finally``; then nothing of the request may still be counted."""
    assert ex.route is not None
    cluster = ex.admitted
    if cluster is not None:
        cluster.finish(ex.host, ex.retrying)
    if ex.ticket is not None:
        await settle(ex)
    ex.state.bound.routes[ex.route.name].exit()
    for c in ex.state.clusters.values():
        assert c.active == 0
        assert c.retries_active == 0
        assert all(h.active == 0 for h in c.hosts)


async def send(ex: Exchange) -> UpstreamResponse | Answer:
    """``prepare`` then ``send`` (within the route's timeout when it has one), then ``done``:
    as the driver does."""
    try:
        retries = await attempts.prepare(ex)
        if not isinstance(retries, attempts.Retries):
            return retries  # the body a retry would need could not be read
        assert ex.policy is not None
        sending = attempts.send(ex, retries)
        if ex.policy.timeout is None:
            return await sending
        return await attempts.within(ex, ex.policy.timeout, sending)
    finally:
        await done(ex)


def error_of(out: UpstreamResponse | Answer) -> dict[str, Any]:
    """The JSON body of an answer Jalur gave itself."""
    return json_answer(out)[1]


async def run(
    conf: cfg.Config, handler: Handler, request: FakeRequest | None = None
) -> tuple[Unit, Exchange, UpstreamResponse | Answer]:
    unit = unit_state(conf, handler)
    ex = await ready(unit, request or FakeRequest())
    return unit, ex, await send(ex)


# -- connect failures ---------------------------------------------------------------------


async def test_connect_failure_is_retried_on_another_endpoint() -> None:
    ok = FakeResponse(200, [b"hello"])
    unit, ex, out = await run(config(), script(refused(), ok))
    async with unit:
        assert out is ok
        first, second = unit.transport.endpoints
        assert first != second
        assert unit.value("jalur_retries_total", route="all") == 1
        assert unit.value("jalur_upstream_errors_total", cluster="c", kind="connect") == 1
        assert ex.flags == "-"


async def test_connect_failure_on_the_only_endpoint_is_not_retried() -> None:
    unit, ex, out = await run(config(endpoints=(A,)), script(refused()))
    async with unit:
        assert unit.transport.endpoints == [A]
        assert out.status == 502
        body = error_of(out)
        assert body["reason"] == "connect"
        assert body["request_id"] == ex.request_id
        assert NO_OTHER_ENDPOINT in body["error"]
        assert "127.0.0.1" not in body["error"]  # no internal address told to the client
        assert ex.flags == "UF"
        assert unit.value("jalur_retries_total", route="all") == 0


async def test_a_streamed_post_is_sent_again_after_a_connect_failure() -> None:
    # Nothing of the body was read by a failed connect: even a streamed POST (no buffer)
    # goes to the next endpoint whole.
    ok = FakeResponse(201)
    conf = config(route={"buffer_body_bytes": 0})
    request = FakeRequest("POST", "/orders", body=[b"item=1&", b"qty=2"])
    unit, _, out = await run(conf, script(refused(), ok), request)
    async with unit:
        assert out is ok
        first, second = unit.transport.attempts
        assert not first.body_read
        assert second.body == b"item=1&qty=2"


# -- statuses -----------------------------------------------------------------------------


@pytest.mark.parametrize("listed", [True, False])
async def test_503_is_retried_only_when_the_policy_lists_it(listed: bool) -> None:
    unavailable, ok = FakeResponse(503, [b"busy"]), FakeResponse(200)
    retry = {"retry_on": ["connect-failure", 503]} if listed else {}
    unit, _, out = await run(config(retry=retry), script(unavailable, ok))
    async with unit:
        if listed:
            assert out is ok
            assert unavailable.released  # dropped unread, its connection not kept busy
            assert len(set(unit.transport.endpoints)) == 2
            assert unit.value("jalur_retries_total", route="all") == 1
        else:
            assert out is unavailable  # relayed as the upstream's answer
            assert len(unit.transport.attempts) == 1


async def test_a_503_to_a_post_without_a_key_is_not_retried() -> None:
    unavailable = FakeResponse(503)
    conf = config(retry={"retry_on": [503]})
    request = FakeRequest("POST", "/orders", body=b"x=1")
    unit, _, out = await run(conf, script(unavailable), request)
    async with unit:
        assert out is unavailable
        assert len(unit.transport.attempts) == 1


async def test_attempts_run_out_on_the_last_answer_with_backoffs_between() -> None:
    answers = [FakeResponse(503) for _ in range(4)]
    conf = config(retry={"attempts": 4, "retry_on": [503]})
    unit, _, out = await run(conf, script(*answers))
    async with unit:
        assert out is answers[-1]
        assert [a.released for a in answers] == [True, True, True, False]
        endpoints = unit.transport.endpoints
        assert len(endpoints) == 4
        assert endpoints[0] != endpoints[1]  # an endpoint not tried yet, while there is one
        assert unit.value("jalur_retries_total", route="all") == 3


# -- methods and bytes sent ---------------------------------------------------------------


async def test_a_post_is_not_retried_once_a_byte_went_out() -> None:
    conf = config(retry={"retry_on": ["connect-failure", "reset"]})
    request = FakeRequest("POST", "/orders", body=b"x=1")
    unit, ex, out = await run(conf, script(reset(sent=40)), request)
    async with unit:
        assert len(unit.transport.attempts) == 1
        assert out.status == 502
        body = error_of(out)
        assert body["reason"] == "reset"
        assert "may already have been processed" in body["error"]
        assert ex.flags == "UC"


async def test_a_post_is_retried_when_no_byte_went_out() -> None:
    ok = FakeResponse(200)
    request = FakeRequest("POST", "/orders", body=b"x=1")
    unit, _, out = await run(config(), script(reset(sent=0), ok), request)
    async with unit:
        assert out is ok
        assert [a.body for a in unit.transport.attempts] == [b"", b"x=1"]


async def test_a_get_is_retried_after_a_reset_when_resets_are_listed() -> None:
    ok = FakeResponse(200)
    conf = config(retry={"retry_on": ["reset"]})
    unit, _, out = await run(conf, script(reset(sent=80), ok))
    async with unit:
        assert out is ok
        assert len(unit.transport.attempts) == 2


# -- the idempotency gate -----------------------------------------------------------------


@pytest.mark.parametrize("dedupes", [False, True])
async def test_a_keyed_post_held_by_the_gate_is_sent_twice_only_if_the_upstream_dedupes(
    dedupes: bool,
) -> None:
    ok = FakeResponse(201)
    conf = config(
        category="payment",
        retry={"retry_on": ["connect-failure", "reset"]},
        route={"idempotency": {"upstream_dedupes": dedupes}},
    )
    key = {"Host": "shop.test", "Idempotency-Key": "pay-1", "Authorization": "Bearer u1"}
    request = FakeRequest("POST", "/pay", headers=key, body=b"amount=5")
    unit = unit_state(conf, script(reset(sent=12), ok))
    async with unit:
        ex = await ready(unit, request)
        assert ex.ticket is not None  # the gate holds the key's lock
        out = await send(ex)
        assert ex.ticket.sent  # a byte went out: the key is consumed either way
        sent = unit.transport.attempts
        if dedupes:
            assert out is ok
            assert [a.headers["Idempotency-Key"] for a in sent] == ["pay-1", "pay-1"]
            assert [a.body for a in sent] == [b"amount=5", b"amount=5"]
        else:
            assert len(sent) == 1
            assert out.status == 502


async def test_a_keyed_post_held_by_the_gate_is_retried_when_no_byte_went_out() -> None:
    ok = FakeResponse(201)
    conf = config(category="payment")
    key = {"Host": "shop.test", "Idempotency-Key": "pay-2", "Authorization": "Bearer u1"}
    request = FakeRequest("POST", "/pay", headers=key, body=b"amount=5")
    sent_on_first: list[bool] = []

    def first_then_ok(attempt: Any) -> FakeResponse:
        assert ex.ticket is not None
        sent_on_first.append(ex.ticket.sent)
        return ok

    unit = unit_state(conf, script(refused(), first_then_ok))
    async with unit:
        ex = await ready(unit, request)
        out = await send(ex)
        assert out is ok
        assert len(unit.transport.attempts) == 2
        assert sent_on_first == [True]  # marked sent again for the second attempt


# -- the keep-alive race ------------------------------------------------------------------


async def test_a_reset_on_a_reused_connection_resends_a_get_at_most_stale_resends_times() -> None:
    stale = [reset(sent=60, reused=True) for _ in range(STALE_RESENDS + 1)]
    conf = config(endpoints=(A,), retry={"attempts": 1})  # retries off: only the race re-sends
    unit, ex, out = await run(conf, script(*stale))
    async with unit:
        assert unit.transport.endpoints == [A] * (STALE_RESENDS + 1)
        assert out.status == 502
        assert ex.flags == "UC"
        host = unit.state.clusters["c"].hosts[0]
        assert host.failures == 1  # only the last reset counts against the endpoint


async def test_a_reused_connection_reset_then_an_answer_is_not_the_endpoints_fault() -> None:
    ok = FakeResponse(200)
    conf = config(endpoints=(A,), retry={"attempts": 1})
    unit, _, out = await run(conf, script(reset(sent=60, reused=True), ok))
    async with unit:
        assert out is ok
        assert unit.transport.endpoints == [A, A]
        assert unit.state.clusters["c"].hosts[0].failures == 0
        assert unit.value("jalur_retries_total", route="all") == 0
        assert unit.value("jalur_upstream_errors_total", cluster="c", kind="reset") == 1


@pytest.mark.parametrize("method", ["POST", "DELETE"])
async def test_the_keep_alive_race_never_resends_an_unsafe_method(method: str) -> None:
    conf = config(endpoints=(A,), retry={"attempts": 1})
    request = FakeRequest(method, "/orders/1")
    unit, _, out = await run(conf, script(reset(sent=60, reused=True)), request)
    async with unit:
        assert len(unit.transport.attempts) == 1
        assert out.status == 502


# -- timeouts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conf", "reason"),
    [
        # One try with its own timeout: the upstream did not answer in time.
        (config(retry={"attempts": 1, "per_try_timeout": 0.05}), "timeout"),
        # The route's deadline cuts every try and backoff (the config check wants it to fit
        # the tries; the fake itself never times out a head).
        (config(route={"timeout": 0.1}, timeouts={"response_headers": 0.05}), "route_timeout"),
    ],
    ids=["per_try_timeout", "route_timeout"],
)
async def test_a_head_that_never_comes_is_a_504_ut(conf: cfg.Config, reason: str) -> None:
    unit, ex, out = await run(conf, script(HANG))
    async with unit:
        assert out.status == 504
        assert error_of(out)["reason"] == reason
        assert ex.flags == "UT"
        assert unit.value("jalur_upstream_errors_total", cluster="c", kind=reason) == 1


async def test_a_per_try_timeout_is_retried_when_timeouts_are_listed() -> None:
    ok = FakeResponse(200)
    conf = config(retry={"per_try_timeout": 0.05, "retry_on": ["timeout"]})
    unit, _, out = await run(conf, script(HANG, ok))
    async with unit:
        assert out is ok
        assert len(set(unit.transport.endpoints)) == 2


async def test_a_route_deadline_already_past_sends_nothing() -> None:
    unit = unit_state(config(route={"timeout": 0.5}, timeouts={"response_headers": 0.1}))
    async with unit:
        ex = await ready(unit, FakeRequest())
        ex.started = time.monotonic() - 1.0  # the request waited a second before sending
        out = await send(ex)
        assert out.status == 504
        assert unit.transport.attempts == []


# -- budget and compliance ----------------------------------------------------------------


async def test_an_exhausted_retry_budget_is_not_retried_and_says_why() -> None:
    conf = config(retry={"budget_percent": 0, "min_retry_concurrency": 0})
    unit, _, out = await run(conf, script(refused()))
    async with unit:
        assert len(unit.transport.attempts) == 1
        assert out.status == 502
        assert BUDGET in error_of(out)["error"]


async def test_the_compliance_guard_refuses_a_retry_once_the_deadline_passed() -> None:
    # A legacy social cluster may carry payments until the transition deadline; a retry is
    # judged anew, at its own time.
    conf = config(
        category="payment",
        system="tiktok",
        compliance={"legacy_clusters": ["c"], "transition_until": FUTURE},
    )
    unit = unit_state(conf)
    deadline = unit.state.guard.deadline
    assert deadline is not None

    def fail_after_the_deadline(attempt: Any) -> FakeResponse:
        unit.services.clock = lambda: deadline + 1.0
        raise refused()

    unit.transport.handler = script(fail_after_the_deadline)
    async with unit:
        ex = await ready(unit, FakeRequest())
        out = await send(ex)
        assert len(unit.transport.attempts) == 1
        assert out.status == 502
        assert "may not serve payment requests now" in error_of(out)["error"]
        assert ex.reason == SOCIAL_AFTER_DEADLINE
        labels = {"route": "all", "reason": SOCIAL_AFTER_DEADLINE}
        assert unit.value("jalur_compliance_blocked_total", **labels) == 1


# -- health -------------------------------------------------------------------------------


async def test_a_failed_connect_marks_the_endpoint_failed() -> None:
    conf = config(outlier_detection={"consecutive_connect_failures": 1})
    ok = FakeResponse(200)
    unit, _, out = await run(conf, script(refused(), ok))
    async with unit:
        assert out is ok
        cluster = unit.state.clusters["c"]
        failed = next(h for h in cluster.hosts if h.endpoint.url == unit.transport.endpoints[0])
        assert failed.state is Health.EJECTED
        assert cluster.health.available == tuple(h for h in cluster.hosts if h is not failed)
        labels = {"cluster": "c", "endpoint": failed.endpoint.url}
        assert unit.value("jalur_endpoint_healthy", **labels) == 0


async def test_a_5xx_answer_counts_against_the_endpoint() -> None:
    unavailable = FakeResponse(500)
    unit, _, out = await run(config(endpoints=(A,)), script(unavailable))
    async with unit:
        assert out is unavailable
        assert unit.state.clusters["c"].hosts[0].failures == 1


async def test_a_success_clears_the_endpoints_failure_streak() -> None:
    conf = config(endpoints=(A,), retry={"attempts": 3, "retry_on": [502]})
    unit, _, out = await run(conf, script(FakeResponse(502), FakeResponse(200)))
    async with unit:
        assert out.status == 200
        assert unit.state.clusters["c"].hosts[0].failures == 0


async def test_upstream_errors_map_to_their_answers() -> None:
    # Every error the transport raises is answered with its own status and reason.
    cases: list[tuple[errors.UpstreamError, int, str]] = [
        (errors.ConnectTimeout("t"), 504, "connect_timeout"),
        (errors.UpstreamProtocolError("p"), 502, "protocol"),
        (errors.TlsVerifyFailed("v"), 502, "tls_verify"),
    ]
    for exc, status, reason in cases:
        unit, ex, out = await run(config(endpoints=(A,), retry={"attempts": 1}), script(exc))
        async with unit:
            assert (out.status, error_of(out)["reason"], ex.flags) == (status, reason, exc.flag)


async def test_a_retry_leaves_the_hashed_endpoint_for_one_not_tried_yet() -> None:
    # lb_policy hash sends a key to the same endpoint every time; a retry still goes to an
    # endpoint not tried yet while there is one.
    conf = config(
        lb_policy="hash", hash_on={"header": "x-cart"}, retry={"attempts": 3, "retry_on": [503]}
    )
    request = FakeRequest(headers={"Host": "shop.test", "x-cart": "cart-7"})
    answers = script(FakeResponse(503), FakeResponse(503), FakeResponse(200))
    unit, _, out = await run(conf, answers, request)
    async with unit:
        assert out.status == 200
        first, second, third = unit.transport.endpoints
        assert second != first
        assert third in (first, second)


async def test_a_keyed_post_whose_connect_failed_releases_its_key() -> None:
    # No byte went out: the key is not consumed, a repeat with it is a new request (not
    # "outcome unknown").
    conf = config(endpoints=(A,), category="payment")
    key = {"Host": "shop.test", "Idempotency-Key": "pay-3", "Authorization": "Bearer u1"}
    unit = unit_state(conf, script(refused(), FakeResponse(201)))
    async with unit:
        ex = await ready(unit, FakeRequest("POST", "/pay", headers=key, body=b"amount=5"))
        out = await send(ex)
        assert ex.ticket is not None
        assert not ex.ticket.sent
        assert out.status == 502
        again = await ready(unit, FakeRequest("POST", "/pay", headers=key, body=b"amount=5"))
        assert again.ticket is not None  # the gate let it through as new
        assert (await send(again)).status == 201


# -- the client's body --------------------------------------------------------------------


async def test_a_client_that_breaks_off_mid_upload_is_not_the_upstreams_fault() -> None:
    # A POST is not buffered for a retry: its body streams into the attempt.
    conf = config(endpoints=(A,), route={"buffer_body_bytes": 0})
    content = FakeContent([b"part-1;"], fail=ConnectionResetError("client went away"))
    request = FakeRequest("POST", "/cart/1", content=content, content_length=100)
    unit, ex, out = await run(conf, script(FakeResponse(200)), request)
    async with unit:
        assert out.status == 400
        assert ex.flags == "DC"
        assert unit.transport.attempts[0].body == b"part-1;"
        assert unit.state.clusters["c"].hosts[0].failures == 0
        assert unit.value("jalur_upstream_errors_total", cluster="c", kind="upstream") == 0


async def test_a_streamed_body_over_the_limit_is_a_413_not_an_upstream_error() -> None:
    conf = config(endpoints=(A,), route={"buffer_body_bytes": 0, "max_body_bytes": 10})
    content = FakeContent([b"x" * 8, b"y" * 8])
    request = FakeRequest(
        "POST", "/upload", headers={"Host": "s", "Transfer-Encoding": "chunked"}, content=content
    )
    unit, _, out = await run(conf, script(FakeResponse(200)), request)
    async with unit:
        assert out.status == 413
        assert error_of(out)["reason"] == "body_too_large"
        assert unit.transport.attempts[0].body == b"x" * 8
        assert unit.state.clusters["c"].hosts[0].failures == 0


async def test_a_body_a_retry_would_need_that_breaks_off_is_answered_before_sending() -> None:
    # A PUT may be retried, so its body is read (bounded) before the first attempt.
    content = FakeContent([b"part-1;"], fail=ConnectionResetError("client went away"))
    request = FakeRequest("PUT", "/cart/1", content=content, content_length=100)
    conf = config(route={"buffer_body_bytes": 0})
    unit, ex, out = await run(conf, script(), request)
    async with unit:
        assert out.status == 400
        assert ex.flags == "DC"
        assert unit.transport.attempts == []


# -- the whole family: which failure of which method is sent again ------------------------

CONNECT = ["connect-failure"]
DEFAULT = ["connect-failure", "refused", "reset-before-request"]


@pytest.mark.parametrize(
    ("failure", "method", "retry_on", "retried"),
    [
        (errors.ConnectFailed("x"), "POST", DEFAULT, True),
        (errors.ConnectTimeout("x"), "PATCH", CONNECT, True),
        (errors.ConnectRefused("x"), "GET", ["refused"], True),
        (errors.ConnectRefused("x"), "GET", ["reset"], False),
        (errors.ConnectFailed("x"), "GET", ["refused"], False),  # not refused: a failed connect
        (errors.TlsVerifyFailed("x"), "GET", CONNECT, True),
        (reset(sent=0), "POST", DEFAULT, True),
        (reset(sent=0), "POST", ["reset"], True),  # reset implies reset-before-request
        (reset(sent=10), "GET", DEFAULT, False),
        (reset(sent=10), "GET", ["reset"], True),
        (reset(sent=None), "PUT", ["reset"], True),
        (reset(sent=None), "POST", ["reset"], False),  # unknown counts as sent
        (reset(sent=10), "PATCH", ["reset"], False),
        (errors.ResponseTimeout("x"), "GET", ["timeout"], True),
        (errors.ResponseTimeout("x"), "DELETE", DEFAULT, False),
        (errors.ResponseTimeout("x"), "POST", ["timeout"], False),
        (errors.UpstreamProtocolError("x"), "GET", [*DEFAULT, "reset", "timeout"], False),
    ],
)
async def test_which_failures_are_sent_again(
    failure: errors.UpstreamError, method: str, retry_on: list[str], retried: bool
) -> None:
    ok = FakeResponse(200)
    conf = config(retry={"retry_on": retry_on})
    request = FakeRequest(method, "/items/1", body=b"v=1" if method != "GET" else None)
    unit, ex, out = await run(conf, script(failure, ok), request)
    async with unit:
        if retried:
            assert out is ok
            assert len(unit.transport.attempts) == 2
            if method != "GET":
                assert unit.transport.attempts[1].body == b"v=1"
        else:
            assert len(unit.transport.attempts) == 1
            assert out.status == failure.status
            assert ex.flags == failure.flag
