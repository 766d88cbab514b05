"""Every answer Jalur gives itself, and how each kind of refusal is counted and flagged.

Invariant: every error answered by Jalur is JSON ``{"error", "reason", "request_id"}`` with
``x-request-id``; the detail of an upstream failure (which may name an internal address or an
errno) is logged under the request id and never sent. A refusal of an ambiguous or malformed
request closes the connection after the answer (what the client pipelined behind it is not
trusted to be framed as the client meant); a refused body lingers briefly first.
"""

from __future__ import annotations

import logging
import re
from typing import Final

import orjson
from multidict import CIMultiDict

from . import errors, paths
from .exchange import Exchange
from .listener import Response
from .metrics import ClusterMetrics
from .requestid import new_id

log = logging.getLogger("jalur")

# An incoming X-Request-Id is kept only if it is this shape; anything else is replaced, so
# the id can be logged and echoed without escaping.
_REQUEST_ID_OK: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}").fullmatch
# Seconds an unread request body is still read and discarded after a 413 before the
# connection closes (Envoy's delayed_close_timeout): closing at once with body bytes unread
# would make the kernel send a reset that can destroy the 413 before the client reads it.
REFUSED_LINGER: Final = 1.0
# The reason (and upstream error kind) of a 504 when a route's whole-request timeout ran out.
ROUTE_TIMEOUT: Final = "route_timeout"


def new_request_id(incoming: str | None) -> str:
    if incoming is not None and _REQUEST_ID_OK(incoming):
        return incoming
    return new_id()


def error_response(status: int, message: str, request_id: str, **extra: str) -> Response:
    body = {"error": message, "request_id": request_id, **extra}
    if "reason" not in body and "kind" in body:  # an upstream failure: its kind says why
        body["reason"] = body["kind"]
    return Response(
        status,
        orjson.dumps(body),
        CIMultiDict({"x-request-id": request_id}),
        content_type="application/json",
    )


def failure_response(
    exc: errors.ProxyError, request_id: str, where: str, note: str = ""
) -> Response:
    """The answer to a failed or refused upstream exchange: the kind of failure (``public``,
    ``kind``) and the request id; the detail is logged under the same request id."""
    level = logging.WARNING if isinstance(exc, errors.UpstreamError) else logging.INFO
    log.log(level, "request_id=%s upstream=%s %s: %s", request_id, where, exc.kind, exc.message)
    return error_response(exc.status, exc.public + note, request_id, kind=exc.kind, reason=exc.kind)


def reject(ex: Exchange, status: int, message: str, reason: str) -> Response:
    """Refused before routing: counted by reason, never under a route label."""
    ex.services.metrics.rejected(reason)
    if ex.flags == "-":
        ex.flags = "DPE"
    ex.status = status
    resp = error_response(status, message, ex.request_id, reason=reason)
    if status != 404:
        # A malformed or ambiguous request: what the client pipelined after it is not
        # trusted to be framed as the client meant (NGINX also closes after a 400).
        resp.force_close()
        if ex.route is None:  # after routing, the route's own record says it
            _audit_refusal(ex, reason)
    return resp


def _audit_refusal(ex: Exchange, reason: str) -> None:
    """A request refused before routing whose target a transaction route would take is
    still a transaction decision: it is audited under that route (best effort: a target
    that has no canonical reading cannot be said to address any route)."""
    state = ex.state
    host, target = ex.host_name, ex.target  # read by ``steps.canonical_path`` if it ran
    if target is None:
        try:
            host = paths.canonical_host(ex.headers.getall("Host", []))
            target = paths.canonicalize(ex.request.raw_path, ex.headers.get("Host"))
        except paths.PathError:
            return
    route = state.router.match(ex.method, host, target.path, ex.headers)
    if route is not None and route.category in state.transaction_categories:
        ex.refused_route = route
        ex.reason = reason


def block(ex: Exchange, status: int, reason: str, message: str) -> Response:
    """Refused by compliance after routing: counted per route, always audited."""
    assert ex.route is not None
    ex.state.bound.routes[ex.route.name].blocked(reason)
    ex.reason = reason
    ex.flags = "UAEX"
    ex.status = status
    log.debug(
        "compliance blocked request_id=%s route=%s cluster=%s reason=%s",
        ex.request_id,
        ex.route.name,
        ex.cluster.name if ex.cluster else "-",
        reason,
    )
    resp = error_response(status, message, ex.request_id, reason=reason)
    if status == 400:
        resp.force_close()  # an ambiguous path: as in ``reject``
    return resp


def gate_refusal(ex: Exchange, status: int, message: str, reason: str) -> Response:
    """Refused by the idempotency gate (counted there, by outcome)."""
    ex.status = status
    ex.reason = ex.reason or reason
    return error_response(status, message, ex.request_id, reason=reason)


def unavailable(ex: Exchange, cm: ClusterMetrics, exc: errors.PolicyError) -> Response:
    """503 without sending anything: circuit breaker open (UO) or no healthy endpoint
    (UH). Never a fallback to another cluster."""
    ex.flags = exc.flag
    ex.status = exc.status
    cm.error(exc.kind)
    return failure_response(exc, ex.request_id, ex.cluster.name if ex.cluster else "-")


def refuse_body(ex: Exchange, exc: errors.RequestError) -> Response:
    """413 (over the limit) or 408 (body stalled), counted by kind; nothing more of the
    body is forwarded and the connection closes after the answer."""
    body_refused(ex, exc)
    ex.status = exc.status
    resp = error_response(exc.status, exc.message, ex.request_id, reason=exc.kind)
    resp.force_close()
    return resp


def body_refused(ex: Exchange, exc: errors.RequestError) -> None:
    """Count a refused request body, flag the exchange, and set how long the listener
    lingers after the answer: a stalled client sends nothing more (close at once), one
    over the limit or still dripping at the body deadline may still be sending (read and
    discard briefly, so the kernel's reset cannot destroy the answer)."""
    ex.services.metrics.rejected(exc.kind)
    ex.flags = exc.flag
    stalled = type(exc) is errors.BodyTimeout  # a dripping (BodyDeadline) one still sends
    # Seconds the listener lingers after answering (reads and discards what the client still
    # sends) before it closes the connection.
    ex.request.linger = 0.0 if stalled else REFUSED_LINGER
    # The body keeps its refusal, whose traceback holds the frames that read the body (and
    # through them the request and its connection): a cycle the collector would free only
    # at its next full pass. Dropped here, where the answer is decided.
    exc.__traceback__ = None


def body_failed(ex: Exchange) -> Response:
    """The answer when reading the client's body failed: its refusal (413/408) when a limit
    cut it, else 400 for a client that broke off mid-upload."""
    body = ex.body
    if body is not None and body.refused is not None:
        return refuse_body(ex, body.refused)
    ex.flags = "DC"
    if body is not None and body.malformed:
        # Its framing broke (a chunk size, a trailer): counted by the listener.
        message = "malformed request: the request body's framing is invalid"
        resp = error_response(400, message, ex.request_id, reason="malformed")
        resp.force_close()
        return resp
    return error_response(400, "client body ended early", ex.request_id)
