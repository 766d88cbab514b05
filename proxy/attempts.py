"""Sending one request upstream: the attempts, the retries between them, the route's deadline.

Per request, per attempt, per retry (Envoy's router): the ``Exchange`` is the request,
``Retries`` what the retry policy has spent on it (attempts, endpoints tried, the budget
slot), and each ``Transport.send`` one attempt. The verdicts (which failure or status may
be retried, the backoff) are ``retry.RetryPolicy``'s; this module applies them.

Invariants:
- A request is sent again only if it is ``repeatable`` (idempotent, or keyed and either
  not gated here or gated with ``upstream_dedupes``) and its body can be sent again; a
  keyed request the gate holds is never re-sent once a byte of it went out.
- Every retry passes the compliance guard again and takes a slot of the cluster's retry
  budget; a retry never leaves the cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, Final

from . import errors, tracing
from . import idempotency as idem
from .answers import ROUTE_TIMEOUT, body_failed, error_response, failure_response, unavailable
from .exchange import Answer, Exchange
from .h1transport import connection_reused
from .health import EndpointState
from .retry import (
    BUDGET,
    IDEMPOTENCY_KEY,
    IDEMPOTENT_METHODS,
    NO_ENDPOINT,
    NO_OTHER_ENDPOINT,
    RetryPolicy,
)
from .upstream import ClusterRuntime, UpstreamResponse

# Times a bodiless idempotent request is sent again after the pooled keep-alive connection it
# went out on was found closed by the upstream (bounds the loop if every idle one is stale).
STALE_RESENDS: Final = 2
# Methods whose request is re-sent after that race (safe: reading has no effect upstream).
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


class Retries:
    """What the retry policy has spent on one request."""

    __slots__ = ("attempt", "policy", "repeatable", "stale", "tried")

    def __init__(self, policy: RetryPolicy, repeatable: bool) -> None:
        self.policy = policy
        self.repeatable = repeatable  # may be sent twice (idempotent or keyed, retries on)
        self.attempt = 1
        self.stale = 0  # sends again after a pooled connection turned out closed
        self.tried: tuple[EndpointState, ...] = ()


async def prepare(ex: Exchange) -> Retries | Answer:
    """The request's retry state; a body that may be sent twice is kept (bounded) first."""
    cluster, policy = ex.cluster, ex.policy
    assert cluster is not None
    assert policy is not None
    gate = ex.gate
    if gate is not None:
        # The gate holds a keyed request: only if the back end deduplicates keys itself
        # (else a retry after a byte went out could execute it twice). A request the gate
        # let through without a key is not keyed at all.
        keyed = ex.ticket is not None and gate.policy.upstream_dedupes
    else:  # no gate here: the back end sees the key and is trusted to honour it
        keyed = bool(ex.headers.get(IDEMPOTENCY_KEY, "").strip())
    retry = policy.retry[cluster.name]
    repeatable = retry.enabled and (ex.method in IDEMPOTENT_METHODS or keyed)
    body = ex.body
    if repeatable and body is not None:
        try:
            await body.buffer(retry.buffer_bytes)
        except Exception:
            return body_failed(ex)
    return Retries(retry, repeatable)


async def send(ex: Exchange, retries: Retries) -> UpstreamResponse | Answer:
    """Send to ``ex.host``, retrying within the cluster as the policy allows: the response
    to relay, or the error answer."""
    cluster, route, headers = ex.cluster, ex.route, ex.out_headers
    assert cluster is not None
    assert route is not None
    assert headers is not None
    cm = ex.state.bound.clusters[cluster.name]
    transport_send = cluster.transport.send
    method, target, body = ex.method, ex.upstream_target, ex.body
    policy = retries.policy
    ticket, trace = ex.ticket, ex.trace
    while True:
        host = ex.host
        assert host is not None
        if trace is not None:
            headers[tracing.TRACEPARENT] = trace.attempt(host.endpoint.url)
        started = time.monotonic()
        sent_before = ticket is not None and ticket.sent
        if ticket is not None:
            ticket.sent = True  # until the transport says no byte went out
        try:
            if policy.per_try_timeout is None:
                up = await transport_send(host.endpoint, method, target, headers, body)
            else:
                async with asyncio.timeout(policy.per_try_timeout):
                    up = await transport_send(host.endpoint, method, target, headers, body)
        except (errors.ProxyError, TimeoutError) as caught:
            ex.host = None
            cluster.release(host)
            _unsent(ticket, sent_before, caught)
            if body is not None and (body.refused is not None or body.client_failed):
                return body_failed(ex)
            exc = (
                caught
                if isinstance(caught, errors.ProxyError)
                else errors.ResponseTimeout(
                    f"upstream sent no response head within {policy.per_try_timeout:g}s"
                )
            )
            cm.error(exc.kind)
            if trace is not None:
                trace.attempt_done(None, exc.kind)
            if _stale(ex, retries, exc):
                # The keep-alive race: the upstream closed this pooled connection as the
                # request went out (an idle timeout shorter than ours). Not the endpoint's
                # fault and safe to send again on another connection to the same endpoint,
                # whatever ``retry`` says (Go's HTTP client does the same). Counted as the
                # reset it was.
                retries.stale += 1
                host.active += 1
                ex.host = host
                continue
            connect = isinstance(exc, errors.ConnectFailed | errors.ConnectTimeout)
            # A per-try timeout while the client is still uploading may be the client's
            # slowness: it does not count against the endpoint's health.
            slow_client = (
                isinstance(caught, TimeoutError) and body is not None and not body.client_done()
            )
            if isinstance(exc, errors.UpstreamError) and not slow_client:
                cluster.health.failed(host, connect)
            why: str | None = ""  # retries off: no retry, nothing to explain
            if policy.enabled:
                replayable = body is None or body.replayable
                why = policy.error_verdict(exc, method, retries.repeatable, replayable)
            if why is None and retries.attempt < policy.attempts:
                retries.tried += (host,)
                why = may_retry(ex, cluster, retries.tried, connect)
                if why is None:
                    why = await retry_on(ex, cluster, retries, connect)
                if why is None:
                    retries.attempt += 1
                    continue
            ex.flags = exc.flag
            note = f" (attempt {retries.attempt})" if retries.attempt > 1 else ""
            if why:
                note = f"{note}; not retried: {why}"
            ex.status = exc.status
            return failure_response(exc, ex.request_id, f"{cluster.name}/{host.endpoint.url}", note)
        ex.upstream_time = time.monotonic() - started
        cm.upstream_response(ex.upstream_time)
        status = up.status
        if trace is not None:
            trace.attempt_done(status)
        if status < 500:
            cluster.health.succeeded(host)
            return up
        cluster.health.failed(host, False)
        if (
            retries.attempt < policy.attempts
            and policy.status_verdict(status, retries.repeatable, body is None or body.replayable)
            and may_retry(ex, cluster, (*retries.tried, host), False) is None
        ):
            # Dropped unread: release() keeps the connection only if the answer had already
            # arrived in full (then it is reusable), else closes it.
            up.release()
            ex.host = None
            cluster.release(host)
            retries.tried += (host,)
            if await retry_on(ex, cluster, retries, False):
                err = errors.NoHealthyUpstream(f"{NO_ENDPOINT} after a {status} answer")
                return unavailable(ex, cm, err)
            retries.attempt += 1
            continue
        return up


def _unsent(ticket: idem.Ticket | None, sent_before: bool, caught: BaseException) -> None:
    """A keyed request's lock learns whether any byte of this attempt went out."""
    if ticket is not None and not sent_before:
        ticket.sent = getattr(caught, "request_bytes_sent", None) != 0


def _stale(ex: Exchange, retries: Retries, exc: errors.ProxyError) -> bool:
    """Was this the keep-alive race on a reused connection, safe to send once more?"""
    return (
        retries.stale < STALE_RESENDS
        and isinstance(exc, errors.UpstreamReset)
        and connection_reused(exc)
        and ex.body is None
        and ex.method in SAFE_METHODS
    )


def may_retry(
    ex: Exchange, cluster: ClusterRuntime, tried: tuple[EndpointState, ...], elsewhere: bool
) -> str | None:
    """None if the request may be sent once more (an endpoint not in ``tried`` is needed
    when ``elsewhere``), taking a retry-budget slot; else why not."""
    if elsewhere and not cluster.untried(tried):
        return NO_OTHER_ENDPOINT
    route = ex.route
    assert route is not None
    # A retry is sent anew: it must pass the compliance guard like the first try did (a
    # transition deadline may have passed meanwhile).
    refused = ex.state.guard.check(route.name, cluster.name, ex.services.clock())
    if refused is not None:
        ex.state.bound.routes[route.name].blocked(refused)
        ex.reason = refused
        return f"cluster {cluster.name} may not serve {route.category} requests now"
    if not ex.retrying:
        if not cluster.acquire_retry():
            return BUDGET
        ex.retrying = True
    return None


async def retry_on(
    ex: Exchange, cluster: ClusterRuntime, retries: Retries, elsewhere: bool
) -> str | None:
    """Wait the backoff, then take the endpoint for the next try (one not tried yet when
    there is one; only such with ``elsewhere``): None once ``ex.host`` holds it."""
    await asyncio.sleep(retries.policy.backoff(retries.attempt))
    host = cluster.choose(ex.hash_key, retries.tried, elsewhere)
    if host is None:
        return NO_OTHER_ENDPOINT if elsewhere else NO_ENDPOINT
    ex.host = host
    ex.endpoint = host.endpoint
    assert ex.route is not None
    ex.state.bound.routes[ex.route.name].retry()
    return None


async def within(
    ex: Exchange, deadline: float, send: Coroutine[Any, Any, UpstreamResponse | Answer]
) -> UpstreamResponse | Answer:
    """``send`` (every try and backoff) within what is left of the route's timeout
    (``deadline`` seconds) since the request arrived; 504 ``route_timeout`` when it runs
    out. An attempt cut here is released by the driver (``ex.host``); a keyed request whose
    bytes went out is stored as outcome unknown, as after any lost answer."""
    left = deadline - (time.monotonic() - ex.started)
    try:
        if left <= 0:
            send.close()
            raise TimeoutError
        async with asyncio.timeout(left):
            return await send
    except TimeoutError:
        assert ex.cluster is not None
        ex.state.bound.clusters[ex.cluster.name].error(ROUTE_TIMEOUT)
        ex.flags = "UT"
        ex.status = 504
        message = f"no upstream answer within this route's timeout of {deadline:g}s"
        return error_response(504, message, ex.request_id, reason=ROUTE_TIMEOUT)
