"""The idempotency gate as a step: a keyed POST/PATCH is executed upstream at most once.

The stores, scopes and tickets are ``idempotency.py``'s; this module is where a request
meets them: ``check`` (before any upstream is chosen) answers a repeat from the store or
takes the key's lock, ``settle`` (once the answer is known) records the outcome or
releases the lock, and ``capture_rest`` keeps reading an answer whose client went away so
the outcome stored is complete. docs/payments.md has the rule.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from aiohttp import web
from multidict import CIMultiDict

from . import errors, ratelimit
from . import idempotency as idem
from .answers import body_failed, gate_refusal, refuse_body
from .clientbody import ClientBody
from .exchange import Answer, Exchange
from .retry import IDEMPOTENCY_KEY
from .upstream import UpstreamResponse

log = logging.getLogger("jalur")

# The answer to a repeat of a keyed request whose first attempt may have executed upstream
# without Jalur seeing the answer (docs/payments.md: "outcome unknown").
OUTCOME_UNKNOWN: Final = (
    "the outcome of the first request with this Idempotency-Key is unknown: it may have "
    "been executed. Look up its status; use a new key for a new attempt"
)
# Stored response headers that must be recomputed when a response is replayed.
_NOT_REPLAYED: Final = frozenset({"content-length", "transfer-encoding", "x-request-id", "date"})


async def check(ex: Exchange, gate: idem.Gate) -> Answer | None:
    """None to forward the request (holding the key's lock when it has one), or the
    answer: a replay, 400 missing/invalid key, 409 in flight, 413, 422 mismatch, 503
    store down or full, or an outcome-unknown replay."""
    state = ex.state
    rm = state.bound.routes[gate.route]
    policy = gate.policy
    rid = ex.request_id
    key = ex.headers.get(IDEMPOTENCY_KEY)
    if key is None:
        if not policy.require:
            return None
        rm.idempotency("missing")
        return gate_refusal(
            ex, 400, "this route requires an Idempotency-Key header on POST/PATCH", "missing"
        )
    problem = idem.key_problem(key)
    if problem is not None:
        rm.idempotency("invalid")
        return gate_refusal(ex, 400, problem, "idempotency_key_invalid")
    body = ex.body = ClientBody(ex.request, ex.limit, state.config.listen.body_idle_timeout)
    try:
        data = await body.read_all(policy.max_body_bytes)
    except Exception:
        return body_failed(ex)
    if data is None:
        too_large = errors.BodyTooLarge(
            "request body too large for an idempotent request (idempotency.max_body_bytes)"
        )
        return refuse_body(ex, too_large)
    fp = idem.fingerprint(ex.method, ex.upstream_target, data)
    identity = gate.identity(ex.headers.getall)
    scope = idem.scope_of(gate.route, identity, key)
    quota = identity or anonymous_quota(ex, state.boundary.trusted_hops)
    store = ex.services.idempotency
    try:
        begun = await store.begin(scope, fp, rid, policy.ttl, quota)
        if begun.outcome == "in_flight" and policy.wait_in_flight:
            done = await idem.wait_done(store, scope, fp, policy.wait_timeout)
            if done is not None:
                begun = idem.Begin("done", done)
    except idem.StoreError as exc:
        # A keyed request is never forwarded unprotected: its client asked for at most
        # once, and only the store can promise it.
        rm.idempotency("store_error")
        log.error("idempotency store error request_id=%s: %s", rid, exc)
        return gate_refusal(
            ex, 503, "idempotency store unavailable", "idempotency_store_unavailable"
        )
    outcome = begun.outcome
    if outcome == "new":
        ticket = idem.Ticket(scope, rid, fp, policy.ttl, policy.max_response_bytes)
        ticket.start_renewing(store)
        ex.ticket = ticket
        return None
    if outcome == "full":
        rm.idempotency("full")
        return gate_refusal(
            ex, 503, "idempotency store is full; try again later", "idempotency_store_full"
        )
    if outcome == "mismatch":
        rm.idempotency("mismatch")
        return gate_refusal(
            ex, 422, "Idempotency-Key was already used with a different request", "mismatch"
        )
    if outcome == "in_flight":
        rm.idempotency("conflict")
        return gate_refusal(
            ex, 409, "a request with this Idempotency-Key is in flight", "in_flight"
        )
    rm.idempotency("replayed")
    return replay(ex, begun)


def replay(ex: Exchange, begun: idem.Begin) -> Answer:
    """The stored answer of a key's first request, sent again; outcome unknown when none
    was stored."""
    stored = begun.stored
    if begun.outcome == "unknown" or stored is None or stored.unknown:
        # No answer is stored: the first attempt's proxy died holding the key, the key came
        # just after the store lost its data, or the first attempt's answer was lost.
        status = stored.status if stored is not None and stored.unknown else 503
        resp = gate_refusal(ex, status, OUTCOME_UNKNOWN, "outcome_unknown")
        resp.headers[idem.REPLAYED_HEADER] = "true"
        return resp
    if not stored.replayable:
        return gate_refusal(
            ex,
            409,
            "the original response was too large to replay; it was not re-sent",
            "not_replayable",
        )
    ex.status = stored.status
    headers: CIMultiDict[str] = CIMultiDict(
        (k, v) for k, v in stored.headers if k.lower() not in _NOT_REPLAYED
    )
    headers[idem.REPLAYED_HEADER] = "true"
    headers["x-request-id"] = ex.request_id
    return web.Response(status=stored.status, body=stored.body, headers=headers)


def anonymous_quota(ex: Exchange, trusted_hops: int) -> str:
    """Whose quota a keyed request without identity counts against: its client's address
    where Jalur knows it (the X-Forwarded-For hop ``trusted_hops`` from the right), else
    none of its own ("": the store's global bounds only), because without trusted hops the
    peer is the ingress every shopper shares."""
    if not trusted_hops:
        return ""
    client = ratelimit.client_address(ex.headers.getall, ex.request.remote, trusted_hops)
    return f"client:{client}"


async def settle(ex: Exchange) -> None:
    """Store the key's outcome (an upstream answer, or outcome unknown once a byte went
    out) or release it (nothing reached an upstream). Shielded: a client that goes away
    does not cancel the record of what its payment did."""
    ticket = ex.ticket
    if ticket is None or ticket.settled:
        return
    route = ex.route
    try:
        outcome = await asyncio.shield(ticket.settle(ex.services.idempotency, ex.status))
    except Exception as exc:  # the client has its answer; never fail the request now
        log.error("idempotency store error settling request_id=%s: %s", ex.request_id, exc)
        outcome = "store_error"
    if route is not None:
        ex.state.bound.routes[route.name].idempotency(outcome)


async def capture_rest(upr: UpstreamResponse, ticket: idem.Ticket) -> None:
    """The client went away mid-answer: read the rest of the upstream's answer anyway (its
    own read timeouts bound this), so a keyed payment's outcome is stored complete."""
    try:
        while chunk := await upr.read_chunk():
            ticket.capture(chunk)
    except errors.ProxyError:
        return
    ticket.complete = True
