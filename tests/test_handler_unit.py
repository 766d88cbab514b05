"""The handler (``Forwarder.handle``: steps, retries, settle, record) end to end on the fake
upstream: no listener, no socket, no Redis.

What is covered: every path whose answer Jalur gives itself (refusals by a step, upstream
failures after the retries, route timeouts, idempotency replays), with what they leave
behind: the audit record (a real ``AuditLog`` writing to a file), the idempotency store
(the memory store), the metrics, and nothing still counted by a cluster.

Relayed answers (``relay.relay``) are tested on ``FakeRequest.stream`` (a ``FakeStream``
that keeps what was written): that is how Jalur's own listener (``proxy/listener.py``)
takes a streamed answer; the socket tests (test_proxy.py, test_streaming.py) cover the
same on real connections.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from proxy import idempotency as idem
from proxy.compliance import SOCIAL_AFTER_DEADLINE
from proxy.forward import Forwarder

from .conftest import build_config
from .fakes import (
    HANG,
    FakeRequest,
    FakeResponse,
    Unit,
    json_answer,
    refused,
    reset,
    script,
    unit_state,
)

A = "http://127.0.0.1:9001"
B = "http://127.0.0.1:9002"
SOCIAL = "http://127.0.0.1:9003"
FUTURE = "2099-01-01T00:00:00+00:00"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
PAYER = {"Host": "shop.test", "Authorization": "Bearer u1"}


def config(audit: Path) -> dict[str, Any]:
    fast = {"backoff": {"base": 0.001, "max": 0.002}}
    return {
        "compliance": {
            "legacy_clusters": ["legacy"],
            "transition_until": FUTURE,
            "audit": {"path": str(audit)},
        },
        "clusters": {
            "shop": {
                "system": "tokopedia",
                "endpoints": [A, B],
                "retry": {**fast, "retry_on": ["connect-failure", "reset-before-request", 503]},
                "timeouts": {"response_headers": 0.05},
            },
            "legacy": {"system": "tiktok", "endpoints": [SOCIAL]},
        },
        "routes": [
            {
                "name": "pay",
                "match": {"prefix": "/pay"},
                "category": "payment",
                "to": "shop",
                "max_body_bytes": 1000,
            },
            {
                "name": "old-pay",
                "match": {"prefix": "/oldpay"},
                "category": "payment",
                "to": "legacy",
            },
            {
                "name": "slow",
                "match": {"prefix": "/slow"},
                "category": "promotion",
                "to": "shop",
                "timeout": 0.1,
            },
        ],
    }


class Handler:
    """A ``Forwarder`` on the fake, and what it wrote to the audit log."""

    def __init__(self, unit: Unit, audit: Path) -> None:
        self.unit = unit
        self.forwarder = Forwarder(unit.state, unit.services)
        self.audit_path = audit

    async def __call__(self, request: FakeRequest) -> Any:
        return await self.forwarder.handle(cast(Any, request))

    def audit(self) -> list[dict[str, Any]]:
        """The audit records written so far (closes the audit log)."""
        self.unit.services.audit.close()
        lines = self.audit_path.read_bytes().splitlines()
        records = [orjson.loads(line) for line in lines]
        return [r for r in records if "request_id" in r]

    def idle(self) -> None:
        """Nothing of any request is still counted: admission, endpoints, budget, state."""
        assert self.unit.state.active == 0
        for cluster in self.unit.state.clusters.values():
            assert cluster.active == 0
            assert cluster.retries_active == 0
            assert all(h.active == 0 for h in cluster.hosts)


@pytest.fixture
async def handler(tmp_path: Path) -> AsyncIterator[Handler]:
    audit = tmp_path / "audit.log"
    async with unit_state(build_config(config(audit))) as unit:
        unit.services.audit.start()
        try:
            yield Handler(unit, audit)
        finally:
            unit.services.audit.close()


def body_of(resp: object) -> dict[str, Any]:
    return json_answer(resp)[1]


async def test_a_refused_request_is_answered_audited_and_never_sent(handler: Handler) -> None:
    deadline = handler.unit.state.guard.deadline
    assert deadline is not None
    handler.forwarder.clock = lambda: deadline + 1
    resp = await handler(FakeRequest("POST", "/oldpay/x", headers=PAYER, body=b"a=1"))
    assert resp.status == 503
    assert body_of(resp)["reason"] == SOCIAL_AFTER_DEADLINE
    assert handler.unit.transport.attempts == []
    handler.idle()
    (record,) = handler.audit()
    assert record["decision"] == "blocked"
    assert record["reason"] == SOCIAL_AFTER_DEADLINE
    assert record["status"] == 503
    assert record["route"] == "old-pay"


async def test_an_unrouted_request_is_a_404_with_the_clients_request_id(handler: Handler) -> None:
    request = FakeRequest(path="/nowhere", headers={"Host": "s", "X-Request-Id": "abc-123"})
    resp = await handler(request)
    assert resp.status == 404
    assert body_of(resp)["request_id"] == "abc-123"
    assert handler.unit.value("jalur_requests_rejected_total", reason="no_route") == 1
    assert handler.audit() == []  # no route, no transaction: nothing to audit


async def test_a_body_over_the_routes_limit_is_a_413_that_lingers(handler: Handler) -> None:
    key = {**PAYER, "Idempotency-Key": "k-big"}
    request = FakeRequest("POST", "/pay", headers=key, body=b"x" * 1001)
    resp = await handler(request)
    assert resp.status == 413
    assert request.linger
    assert request.content.read == 0
    assert handler.unit.transport.attempts == []
    handler.idle()


async def test_a_payment_whose_connects_all_fail_releases_its_key(handler: Handler) -> None:
    # Nothing reached an upstream: the key is free again, the retry with it is served.
    handler.unit.transport.handler = script(refused(), refused(), FakeResponse(503))
    key = {**PAYER, "Idempotency-Key": "k-1"}
    resp = await handler(FakeRequest("POST", "/pay", headers=key, body=b"amount=5"))
    assert resp.status == 502
    assert body_of(resp)["reason"] == "connect"
    assert len(set(handler.unit.transport.endpoints)) == 2
    handler.idle()
    outcome = {"route": "pay", "outcome": "released"}
    assert handler.unit.value("jalur_idempotency_total", **outcome) == 1
    (record,) = handler.audit()
    assert (record["decision"], record["status"], record["cluster"]) == ("allowed", 502, "shop")


async def test_a_payment_that_may_have_executed_is_never_sent_again(handler: Handler) -> None:
    # The upstream read the payment and the connection broke before its answer: the key's
    # outcome is unknown, and a repeat with the key is answered from the store, unsent.
    handler.unit.transport.handler = script(reset(sent=120))
    key = {**PAYER, "Idempotency-Key": "k-2"}
    first = await handler(FakeRequest("POST", "/pay", headers=key, body=b"amount=5"))
    assert first.status == 502
    assert body_of(first)["reason"] == "reset"
    again = await handler(FakeRequest("POST", "/pay", headers=key, body=b"amount=5"))
    assert again.headers[idem.REPLAYED_HEADER] == "true"
    assert body_of(again)["reason"] == "outcome_unknown"
    assert len(handler.unit.transport.attempts) == 1  # executed at most once
    assert handler.unit.transport.attempts[0].body == b"amount=5"
    handler.idle()


async def test_a_retried_payment_sends_the_same_key_and_body_each_time(handler: Handler) -> None:
    # Before a byte went out a keyed payment may go to the other endpoint; once one did, it
    # is not sent again.
    handler.unit.transport.handler = script(reset(sent=0), reset(sent=50))
    key = {**PAYER, "Idempotency-Key": "k-3", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    resp = await handler(FakeRequest("POST", "/pay", headers=key, body=b"amount=7"))
    assert resp.status == 502
    sent = handler.unit.transport.attempts
    assert [a.headers["Idempotency-Key"] for a in sent] == ["k-3", "k-3"]
    assert [a.body for a in sent] == [b"", b"amount=7"]
    assert sent[0].endpoint != sent[1].endpoint
    # Each try is its own span of the client's trace (the headers as sent on each try).
    parents = [a.headers["traceparent"].split("-") for a in sent]
    assert [p[1] for p in parents] == [TRACE_ID, TRACE_ID]
    assert parents[0][2] != parents[1][2]
    assert PARENT_ID not in (parents[0][2], parents[1][2])
    handler.idle()


async def test_a_route_timeout_is_a_504_and_releases_the_attempt(handler: Handler) -> None:
    handler.unit.transport.handler = script(HANG)
    resp = await handler(FakeRequest(path="/slow"))
    assert resp.status == 504
    assert body_of(resp)["reason"] == "route_timeout"
    handler.idle()
    assert handler.unit.value("jalur_requests_in_flight", route="slow") == 0


# -- relayed answers (on Jalur's own listener's streamed answers) -------------------------

# Relay writes through ``Request.stream``, which ``FakeRequest`` serves with a ``FakeStream``.


async def test_an_answer_is_relayed_without_hop_by_hop_fields(handler: Handler) -> None:
    upstream = FakeResponse(
        200,
        [b"hello ", b"world"],
        [("Content-Type", "text/plain"), ("Connection", "x-hop"), ("x-hop", "1"), ("TE", "x")],
    )
    handler.unit.transport.handler = script(upstream)
    request = FakeRequest(path="/slow/a", headers={"Host": "shop.test"})
    resp = await handler(request)
    assert request.streamed is not None
    assert resp is request.streamed
    assert (resp.status, resp.body) == (200, b"hello world")
    assert resp.headers["Content-Type"] == "text/plain"
    for gone in ("Connection", "x-hop", "TE"):
        assert gone not in resp.headers
    assert resp.headers["x-request-id"]
    assert upstream.released
    assert not resp.aborted
    handler.idle()


async def test_an_upstream_failure_mid_answer_cuts_the_client_connection(
    handler: Handler,
) -> None:
    upstream = FakeResponse(200, [b"part one"], fail=reset(sent=100))
    handler.unit.transport.handler = script(upstream)
    resp = await handler(FakeRequest(path="/slow/a"))
    assert resp.body == b"part one"
    assert resp.aborted  # never an error page appended to a half-sent body
    assert upstream.closed
    assert handler.unit.value("jalur_upstream_errors_total", cluster="shop", kind="reset") == 1
    handler.idle()


@pytest.mark.parametrize("client_gone", [False, True])
async def test_a_relayed_payment_is_stored_and_replayed_never_sent_twice(
    handler: Handler, client_gone: bool
) -> None:
    # The answer is the key's outcome even when its client went away mid-answer: the rest is
    # read anyway and a repeat with the key gets it from the store.
    upstream = FakeResponse(201, [b'{"paid":', b"true}"], [("Content-Type", "application/json")])
    handler.unit.transport.handler = script(upstream)
    key = {**PAYER, "Idempotency-Key": "k-relay"}
    first_request = FakeRequest("POST", "/pay", headers=key, body=b"amount=9")
    first_request.gone = client_gone
    first = await handler(first_request)
    assert first.status == 201
    if not client_gone:
        assert first.body == b'{"paid":true}'
    again = await handler(FakeRequest("POST", "/pay", headers=key, body=b"amount=9"))
    assert again.status == 201
    assert again.body == b'{"paid":true}'
    assert again.headers[idem.REPLAYED_HEADER] == "true"
    assert len(handler.unit.transport.attempts) == 1
    handler.idle()
