"""Clusters, their endpoints, and the transport that talks HTTP/1.1 to them.

The rest of the proxy sees the upstream through ``Transport.send``: one call with a
request head and a body stream, returning a response head and a body stream. The
implementation is ``h1transport.H1Transport`` (pooled keep-alive connections on asyncio
Protocols, llhttp); unit tests use ``tests/fakes.FakeTransport``. WebSocket and other
upgrades are ``tunnel.py``'s.

``map_connect_error`` is the one place a failed connect (OS, TLS, timeout) becomes the
``errors.UpstreamError`` tree, for every transport that connects.

``ClusterRuntime`` is a cluster as served: its endpoints' health (``health``), its load
balancer (``balancer``), its circuit breaker and retry budget (counters below) and its
retry policy (``retry``). The request path uses it like this (see ``forward``)::

    if not cluster.admit(): ...                  # 503 UO: circuit breaker open
    host = cluster.choose(key)                   # None: 503 UH, never another cluster
    try:
        up = await cluster.transport.send(host.endpoint, ...)
        ...                                      # maybe cluster.release(host) and retry:
        cluster.acquire_retry(); host = cluster.choose(key, exclude=tried)
    finally:
        cluster.finish(host, retrying)           # once, when the request is done

Circuit breaking (Envoy's ``max_connections``/``max_pending_requests``/``max_requests``):
a request is admitted while fewer than ``min(max_requests, max_connections + max_pending)``
requests of the cluster are in flight. An HTTP/1.1 request holds one pooled connection from
its send until its response body is done, so in-flight requests beyond ``max_connections``
are exactly the ones pending for a connection. ``jalur_circuit_open{cluster}`` is 1 while
the cluster is at that limit.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from multidict import CIMultiDict
from yarl import URL

from . import config as cfg
from . import errors, tls
from .balancer import Balancer, make_balancer
from .health import ClusterHealth, EndpointState
from .retry import RetryPolicy

if TYPE_CHECKING:
    from .metrics import ClusterMetrics


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str  # "http://127.0.0.1:9001", also the metric label
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        u = URL(url)
        assert u.host is not None
        assert u.port is not None
        return cls(url=url.rstrip("/"), scheme=u.scheme, host=u.host, port=u.port)


class UpstreamResponse(Protocol):
    """A response head plus its body stream. Call ``release`` after the body was read to
    the end (the connection goes back to the pool) or ``close`` to discard it."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    def header_items(self) -> list[tuple[str, str]]: ...
    async def read_chunk(self) -> bytes: ...  # b"" at the end of the body
    # True if ``read_chunk`` would return without waiting (bytes buffered, body ended or
    # failed); False when unknown. The relay sends the head alone only when it is False.
    def body_ready(self) -> bool: ...
    # Done with the answer: its connection is pooled again only if the exchange is complete
    # (body read to the end, keep-alive), else closed. Never reads the rest of a body.
    def release(self) -> None: ...
    # Discard the answer and close its connection.
    def close(self) -> None: ...


class Transport(Protocol):
    """One cluster's upstream connections.

    ``send`` writes the request and returns once the response head has arrived. It raises
    ``errors.UpstreamError`` (or ``errors.BadRequest`` for a request it cannot write). An
    ``UpstreamError`` raised by ``send`` (or by ``read_chunk``) should carry
    ``request_bytes_sent``: 0 when the transport knows that no byte of the request was
    handed to a socket (the retry logic may then send even a POST again), the count when
    some were, and it may leave the class default ``None`` when it cannot tell (treated
    like "sent"). Connect failures (``ConnectFailed``, ``ConnectTimeout``) are 0 by
    default; ``ConnectRefused`` (or a ``ConnectFailed`` caused by
    ``ConnectionRefusedError``) marks a refused connect. The transport must not re-send a
    request by itself: retries are decided by the caller, which may call ``send`` again
    with the same ``body`` object (it can be iterated again when it is replayable).
    """

    async def send(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
    ) -> UpstreamResponse: ...

    async def close(self) -> None: ...


def map_connect_error(
    exc: BaseException, url: str, *, over_tls: bool, timeout: float
) -> errors.UpstreamError | None:
    """A failed TCP connect (and TLS handshake, ``over_tls``) to ``url`` as the ``errors`` tree,
    for transports that connect with ``loop.create_connection`` inside
    ``asyncio.timeout(timeout)``; None when ``exc`` is no connect failure (cancellation:
    the caller re-raises it). The message names the endpoint: it is only logged."""
    if isinstance(exc, ssl.SSLError | ConnectionResetError | ConnectionAbortedError):
        mapped = tls.map_error(exc, handshake=True) if over_tls else None
        return mapped or errors.ConnectFailed(f"upstream connect to {url} failed: {exc}")
    if isinstance(exc, TimeoutError):
        return errors.ConnectTimeout(f"upstream connect to {url} timed out after {timeout:g}s")
    if isinstance(exc, ConnectionRefusedError):
        return errors.ConnectRefused(f"upstream connect to {url} refused: {exc}")
    if isinstance(exc, OSError):
        return errors.ConnectFailed(f"upstream connect to {url} failed: {exc}")
    return None


class ClusterRuntime:
    """A cluster as served: its system, endpoints, transport, health, balancer, circuit
    breaker and retry policy (see the module docstring)."""

    __slots__ = (
        "active",
        "balancer",
        "endpoints",
        "hash_cookie",
        "hash_header",
        "hashed",
        "health",
        "hosts",
        "kind",
        "limit",
        "metrics",
        "name",
        "retries_active",
        "retry",
        "spec",
        "system",
        "transport",
    )

    def __init__(
        self,
        name: str,
        spec: cfg.Cluster,
        system: cfg.System,
        transport: Transport,
        metrics: ClusterMetrics | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.system = spec.system
        self.kind = system.kind
        self.endpoints = tuple(Endpoint.parse(u) for u in spec.endpoints)
        self.transport = transport
        self.metrics = metrics
        self.hosts = tuple(EndpointState(e) for e in self.endpoints)
        self.health = ClusterHealth(name, self.hosts, spec, transport, metrics)
        self.balancer: Balancer = make_balancer(spec.lb_policy, self.hosts)
        self.retry = RetryPolicy(spec.retry, spec.timeouts.response_headers)
        hash_on = spec.hash_on
        self.hash_header = hash_on.header if hash_on is not None else None
        self.hash_cookie = hash_on.cookie if hash_on is not None else None
        self.hashed = hash_on is not None  # the balancer wants the request's key
        self.limit = min(spec.max_requests, spec.max_connections + spec.max_pending)
        self.active = 0  # admitted requests not finished yet
        self.retries_active = 0  # of those, requests that have retried
        if metrics is not None:
            metrics.set_circuit_open(False)

    # -- circuit breaker ------------------------------------------------------------------

    def admit(self) -> bool:
        """Count one more request in flight, or False when the breaker is open."""
        active = self.active
        if active >= self.limit:
            return False
        self.active = active = active + 1
        if active == self.limit and self.metrics is not None:
            self.metrics.set_circuit_open(True)
        return True

    def finish(self, host: EndpointState | None, retrying: bool) -> None:
        """An admitted request is done; ``host`` is the endpoint whose attempt it still
        holds (None if none), ``retrying`` whether it holds a retry-budget slot."""
        if host is not None:
            host.active -= 1
        if retrying:
            self.retries_active -= 1
        if self.active == self.limit and self.metrics is not None:
            self.metrics.set_circuit_open(False)
        self.active -= 1

    def acquire_retry(self) -> bool:
        """Take a slot of the retry budget for an admitted request (once per request)."""
        retry = self.retry
        allowed = max(retry.min_concurrency, int(self.active * retry.budget_ratio))
        if self.retries_active >= allowed:
            return False
        self.retries_active += 1
        return True

    # -- endpoints ------------------------------------------------------------------------

    def choose(
        self,
        key: str | None = None,
        exclude: tuple[EndpointState, ...] = (),
        elsewhere: bool = False,
    ) -> EndpointState | None:
        """The endpoint for the next attempt (its ``active`` counted), preferring ones not
        in ``exclude`` (requiring them with ``elsewhere``); None when no endpoint is
        healthy."""
        hosts = self.health.available
        if exclude:
            rest = tuple(h for h in hosts if h not in exclude)
            if rest or elsewhere:
                hosts = rest
        n = len(hosts)
        if n == 1:
            host = hosts[0]
        elif n:
            host = self.balancer.pick(hosts, key)
        else:
            return None
        host.active += 1
        return host

    def untried(self, tried: tuple[EndpointState, ...]) -> bool:
        """Whether a healthy endpoint not in ``tried`` is left."""
        return any(h not in tried for h in self.health.available)

    @staticmethod
    def release(host: EndpointState) -> None:
        """An attempt on ``host`` ended without becoming the request's answer."""
        host.active -= 1

    def pick(self) -> Endpoint:
        """An endpoint for a side request (e.g. a shadow copy), nothing counted; raises
        ``NoHealthyUpstream`` when none is healthy."""
        hosts = self.health.available
        if not hosts:
            raise errors.NoHealthyUpstream(f"no healthy endpoint in cluster {self.name}")
        return self.balancer.pick(hosts, None).endpoint

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> None:
        """Start background health checks; call once the loop runs (``build_state``)."""
        self.health.start()

    async def close(self) -> None:
        """Stop health checks and ejection timers (the transport is closed separately)."""
        await self.health.close()
