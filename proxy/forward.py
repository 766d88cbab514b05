"""The request handler: run the steps, send, relay, record. The small driver of the request path.

Per request this module only looks things up; everything it consults was built at config
load into a ``state.State``. A request keeps the ``State`` it started with even if a reload
swaps in a new one meanwhile.

The path of one request:
1. ``steps.STEPS``, in order, until one answers (the whole policy order is declared there);
2. a WebSocket upgrade is relayed (``relay.websocket``); anything else is sent upstream with
   the route's retries and deadline (``attempts``);
3. the answer is relayed (``relay.relay``) and a shadow copy, if any, submitted;
4. whatever happened: the cluster's admission and endpoint are released, a keyed request's
   outcome is settled (``gate.settle``), and the request is recorded once (``record``).

Invariants (each owned by the module named):
- The path that was matched is the path that is forwarded (``steps.canonical_path``).
- Hop-by-hop headers are never forwarded, in either direction (``headers``).
- Bodies stream with bounded buffers (``clientbody``); a keyed payment is executed at most
  once (``gate``, ``attempts``).
- Every error answered by Jalur itself is JSON ``{"error", "reason", "request_id"}``
  (``answers``); an upstream failure after the response head went out aborts the client
  connection instead of appending an error page to a half-sent body (``relay``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from . import attempts
from .answers import LINGER, error_response, failure_response, new_request_id
from .exchange import Answer, Exchange
from .gate import settle
from .record import record
from .relay import is_websocket, relay, websocket
from .state import Services, State, build_state
from .steps import STEPS

__all__ = [
    "LINGER",
    "Forwarder",
    "Services",
    "State",
    "build_state",
    "error_response",
    "failure_response",
    "new_request_id",
]


class Forwarder:
    """The data-plane handler. ``state`` is swapped whole on reload; a request keeps the
    state it started with."""

    def __init__(self, state: State, services: Services) -> None:
        self.state = state
        self.services = services

    @property
    def clock(self) -> Callable[[], float]:
        """The wall clock the compliance guard's deadlines are judged by (tests move it)."""
        return self.services.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.services.clock = clock

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        state = self.state
        started = time.monotonic()
        rid = new_request_id(request.headers.get("X-Request-Id"))
        ex = Exchange(state, self.services, request, rid, started)
        ex.trace = state.tracer.start(request.headers, request.method)
        state.active += 1
        try:
            resp = await _serve(ex)
            if not ex.status:
                ex.status = resp.status
            return resp
        finally:
            state.leave()
            record(ex, time.monotonic() - started)


async def _serve(ex: Exchange) -> Answer:
    try:
        for step in STEPS:
            out = step(ex)
            if out is None:
                continue
            if not isinstance(out, web.StreamResponse):
                out = await out  # a step that had something to wait for
                if out is None:
                    continue
            return out
        return await _forward(ex)
    finally:
        matched = ex.route
        if matched is not None:  # entered by the ``route`` step
            if ex.admitted is not None:
                ex.admitted.finish(ex.host, ex.retrying)
            if ex.ticket is not None:
                await settle(ex)
            ex.state.bound.routes[matched.name].exit()


async def _forward(ex: Exchange) -> Answer:
    """Past every step: send upstream (retries, deadline), relay the answer."""
    if is_websocket(ex):
        return await websocket(ex)
    body, copy = ex.body, ex.copy
    if body is not None and copy is not None:
        body.copy = copy.body
    retries = await attempts.prepare(ex)
    if not isinstance(retries, attempts.Retries):
        return retries
    send = attempts.send(ex, retries)
    assert ex.policy is not None
    assert ex.route is not None
    assert ex.cluster is not None
    timeout = ex.policy.timeout
    up = await (send if timeout is None else attempts.within(ex, timeout, send))
    if isinstance(up, web.StreamResponse):
        return up
    state = ex.state
    state.migration.served(ex.route.name, ex.cluster.name)
    resp = await relay(ex, up)
    if copy is not None and ex.flags == "-":
        copy.status = up.status
        refusal = state.guard.check(ex.route.name, copy.plan.cluster.name, ex.services.clock())
        ex.services.shadower.submit(copy, refusal)
    return resp
