"""Socket-free stand-ins for the two edges of the request path: the client's request and the
upstream transport (the way httpx's ``MockTransport`` stands in for a network).

``FakeTransport`` implements ``upstream.Transport``: every ``send`` is one attempt, recorded
(``Attempt``: endpoint, method, target, the headers as sent, the body bytes the upstream
read) and answered by a handler function scripted per test::

    def handler(attempt: Attempt) -> FakeResponse | Awaitable[FakeResponse]: ...

It returns a ``FakeResponse`` (any status; a body that may fail mid-stream) or raises what a
real transport raises (``errors.ConnectFailed``, ``errors.UpstreamReset`` with
``request_bytes_sent``, ...). ``script(...)`` builds a handler from a list of outcomes, one
per attempt. The request body is read by the fake only when the attempt got past its
connect (the handler returned, or raised an error whose ``request_bytes_sent`` is not 0),
as ``H1Transport`` does: a connect failure leaves a streamed body unread, so it can still
be sent on the next try.

``FakeRequest`` is the client's request as the steps, the retry loop and ``ClientBody``
read it: ``method``, ``raw_path``, ``version`` (``.major``/``.minor``, comparable with a
tuple), ``headers``, ``content_length``, ``body_exists``, ``remote``, ``scheme``,
``cookies``, and the body as the listener's ``Request`` serves it (``read``/``at_eof``/
``total_bytes``, ``body_timeout``, ``linger``, ``stream`` for a streamed answer: a
``FakeStream`` that keeps what was written; ``writer.written`` records ``100 Continue``).
``exchange()`` is the one place the stand-in is handed to ``Exchange``.

``json_answer`` and ``closes`` read an answer Jalur gave itself (the listener's
``Response``).

``unit_state(config)`` compiles a real ``Config`` with ``state.build_state`` and puts one
``FakeTransport`` behind every cluster; no socket is opened (``H1Transport`` connects
lazily), no Redis (the memory store), no listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

import orjson
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from proxy import config as cfg
from proxy import errors
from proxy import idempotency as idem
from proxy.accesslog import AccessLog
from proxy.compliance import AuditLog
from proxy.exchange import Exchange
from proxy.metrics import Metrics
from proxy.shadow import Shadower
from proxy.state import Services, State, build_state
from proxy.upstream import Endpoint, Transport, UpstreamResponse

# ``H1Transport`` marks an error raised on a pooled keep-alive connection with this
# attribute (``h1transport.connection_reused`` reads it).
_REUSED: Final = "connection_reused"


# -- the upstream -------------------------------------------------------------------------


class FakeResponse:
    """An upstream answer: a head, then ``body`` chunk by chunk, then ``fail`` (raised by the
    read after the last chunk) if given, else the end of the body."""

    def __init__(
        self,
        status: int = 200,
        body: Iterable[bytes] = (),
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        reason: str = "",
        fail: errors.UpstreamError | None = None,
    ) -> None:
        self._status = status
        self._reason = reason or ("OK" if status < 400 else "Error")
        self._headers: CIMultiDict[str] = CIMultiDict(headers)
        self.chunks = [c for c in body if c]
        self.fail = fail
        self.released = False
        self.closed = False

    @property
    def status(self) -> int:
        return self._status

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    def header_items(self) -> list[tuple[str, str]]:
        return list(self._headers.items())

    async def read_chunk(self) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        if self.fail is not None:
            raise self.fail
        return b""

    def body_ready(self) -> bool:
        return True  # everything is "buffered": the fake never waits

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


@dataclass
class Attempt:
    """One ``send`` as the upstream saw it."""

    endpoint: str  # the endpoint's URL
    method: str
    target: str
    headers: CIMultiDict[str]  # a copy, as sent on this attempt
    source: AsyncIterable[bytes] | None = field(default=None, repr=False)
    body: bytes = b""  # what the upstream read of the body
    body_read: bool = False

    async def read_body(self) -> bytes:
        """Read the request body (once; later calls return what was read)."""
        if not self.body_read:
            self.body_read = True
            if self.source is not None:
                async for chunk in self.source:
                    self.body += chunk  # what arrived before a failure stays recorded
        return self.body


Handler = Callable[[Attempt], "FakeResponse | Awaitable[FakeResponse]"]


class FakeTransport:
    """``upstream.Transport`` without sockets: each ``send`` is answered by ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.attempts: list[Attempt] = []
        self.responses: list[FakeResponse] = []
        self.closed = False

    async def send(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
    ) -> FakeResponse:
        attempt = Attempt(endpoint.url, method, target, CIMultiDict(headers), body)
        self.attempts.append(attempt)
        try:
            out = self.handler(attempt)
            resp = await out if inspect.isawaitable(out) else out
        except errors.UpstreamError as exc:
            if exc.request_bytes_sent != 0:  # it got past the connect: the body went out
                await _upload(attempt)
            raise
        await _upload(attempt)
        self.responses.append(resp)
        return resp

    async def close(self) -> None:
        self.closed = True

    @property
    def endpoints(self) -> list[str]:
        """The endpoint of every attempt, in order."""
        return [a.endpoint for a in self.attempts]


async def _upload(attempt: Attempt) -> None:
    """The body as the transport sends it: a failure to produce it (the client broke off,
    a body limit) is an ``UpstreamError`` after the head went out, as in ``H1Transport``."""
    try:
        await attempt.read_body()
    except Exception as exc:
        raise errors.UpstreamError(
            f"request body failed: {type(exc).__name__}: {exc}", request_bytes_sent=1
        ) from exc


class _Hang:
    """An outcome that never comes (a per-try or route timeout must cut it)."""


HANG: Final = _Hang()
# Seconds a ``HANG`` attempt waits for the timeout under test before it fails the test
# (bounds a test whose timeout never fires).
HANG_LIMIT: Final = 10.0
Outcome = FakeResponse | errors.UpstreamError | _Hang | Callable[[Attempt], FakeResponse]


def script(*outcomes: Outcome) -> Handler:
    """A handler answering attempt n with ``outcomes[n]`` (an error is raised, ``HANG``
    waits for ever); an attempt beyond the script fails the test."""
    left = list(outcomes)

    async def handler(attempt: Attempt) -> FakeResponse:
        assert left, f"unexpected attempt {attempt}"
        outcome = left.pop(0)
        if isinstance(outcome, _Hang):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HANG_LIMIT):
                    await asyncio.Event().wait()
            raise AssertionError(f"nothing cut {attempt} within {HANG_LIMIT}s")
        if isinstance(outcome, errors.UpstreamError):
            raise outcome
        if isinstance(outcome, FakeResponse):
            return outcome
        return outcome(attempt)

    return handler


def reset(sent: int | None, reused: bool = False) -> errors.UpstreamReset:
    """The upstream closed the connection after ``sent`` request bytes (None: unknown);
    ``reused``: on a pooled keep-alive connection (the keep-alive race)."""
    exc = errors.UpstreamReset("upstream closed the connection", request_bytes_sent=sent)
    setattr(exc, _REUSED, reused)
    return exc


def refused() -> errors.ConnectRefused:
    return errors.ConnectRefused("connect refused (fake)")


# -- the client ---------------------------------------------------------------------------


class Version(NamedTuple):
    major: int
    minor: int


HTTP11: Final = Version(1, 1)
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class FakeContent:
    """The client's body stream: ``chunks`` in order, then the end; ``fail`` (if given) is
    raised instead of the end (a client that broke off); ``stall``: never ends."""

    def __init__(
        self, chunks: Iterable[bytes] = (), fail: Exception | None = None, stall: bool = False
    ) -> None:
        self.chunks = [c for c in chunks if c]
        self.total_bytes = sum(len(c) for c in self.chunks)
        self.fail = fail
        self.stall = stall
        self.read = 0  # bytes handed out

    def is_eof(self) -> bool:
        return not self.chunks and self.fail is None and not self.stall

    async def readany(self) -> bytes:
        if self.chunks:
            chunk = self.chunks.pop(0)
            self.read += len(chunk)
            return chunk
        if self.fail is not None:
            raise self.fail
        if self.stall:
            await asyncio.Event().wait()
        return b""


class FakeWriter:
    """What the proxy wrote to the client outside a response (``100 Continue``)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.written.append(data)


class FakeRequest:
    """The client's request, as the request path reads it (see the module docstring)."""

    def __init__(
        self,
        method: str = "GET",
        path: str = "/",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (("Host", "shop.test"),),
        body: bytes | Iterable[bytes] | None = None,
        *,
        version: Version = HTTP11,
        remote: str | None = "127.0.0.1",
        scheme: str = "http",
        content: FakeContent | None = None,
        content_length: int | None = None,
        body_timeout: float = 300.0,
    ) -> None:
        self.method = method
        self.raw_path = path
        self.version = version
        hdrs: CIMultiDict[str] = CIMultiDict(headers)
        chunks: list[bytes] = []
        if body is not None:
            chunks = [body] if isinstance(body, bytes) else list(body)
            if "Content-Length" not in hdrs and "Transfer-Encoding" not in hdrs:
                hdrs["Content-Length"] = str(sum(len(c) for c in chunks))
        self.headers = CIMultiDictProxy(hdrs)
        self.content = content if content is not None else FakeContent(chunks)
        length = hdrs.get("Content-Length")
        self.content_length = (
            content_length
            if content_length is not None
            else (int(length) if length is not None else None)
        )
        self.body_exists = (
            body is not None or content is not None or bool(self.content_length)
        ) and self.content_length != 0
        self.remote = remote
        self.scheme = scheme
        self.cookies: dict[str, str] = {}
        for line in hdrs.getall("Cookie", []):
            for pair in line.split(";"):
                name, eq, value = pair.strip().partition("=")
                if eq:
                    self.cookies.setdefault(name, value)
        self.body_timeout = body_timeout  # Jalur's listener: ``listen.body_timeout``
        self.writer = FakeWriter()
        self.transport = None  # no socket to abort
        # Seconds the listener lingers after the answer (set by a body refusal).
        self.linger: float | None = None
        self.streamed: FakeStream | None = None  # the streamed answer, once there is one
        self.gone = False  # the client went away before its answer: writes fail
        # The client waits for ``100 Continue`` before it sends the body.
        self._continue = version >= HTTP11 and (
            self.headers.get("Expect", "").lower() == "100-continue"
        )

    # -- the body, as Jalur's own listener's ``Request`` serves it ----------------------

    @property
    def total_bytes(self) -> int:
        return self.content.total_bytes

    def at_eof(self) -> bool:
        return self.content.is_eof()

    async def read(self) -> bytes:
        """The next body bytes (``b""`` at the end); ``100 Continue`` before the first."""
        if self._continue:
            self._continue = False
            await self.writer.write(CONTINUE)
        return await self.content.readany()

    # -- answering --------------------------------------------------------------------

    def stream(
        self, status: int, headers: CIMultiDict[str], *, reason: str | None = None
    ) -> FakeStream:
        self.streamed = FakeStream(status, headers, reason)
        self.streamed.gone = self.gone
        return self.streamed


class FakeStream:
    """A streamed answer (``Request.stream``) written to no socket: what went out is kept.
    ``gone``: the client went away (every write raises ``ConnectionResetError``)."""

    def __init__(self, status: int, headers: CIMultiDict[str], reason: str | None) -> None:
        self.status = status
        self.headers = headers
        self.reason = reason
        self.head_sent = False
        self.chunks: list[bytes] = []
        self.close = False
        self.aborted = False
        self.gone = False

    def force_close(self) -> None:
        self.close = True

    def send_head(self) -> None:
        self._check()
        self.head_sent = True

    async def write(self, chunk: bytes) -> None:
        self._check()
        self.head_sent = True
        if chunk:
            self.chunks.append(chunk)

    async def finish(self) -> None:
        self._check()
        self.head_sent = True

    def abort(self) -> None:
        self.aborted = self.close = True

    def _check(self) -> None:
        if self.gone:
            raise ConnectionResetError("the client went away (fake)")

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


# -- a compiled config on the fake --------------------------------------------------------


@dataclass
class Unit:
    """A real ``State`` and ``Services`` whose clusters send through ``transport``."""

    state: State
    services: Services
    transport: FakeTransport
    metrics: Metrics

    def value(self, name: str, **labels: str) -> float:
        """A metric sample's value (0 when absent)."""
        got = self.metrics.registry.get_sample_value(name, labels)
        return got if got is not None else 0.0

    async def close(self) -> None:
        await self.state.close()

    async def __aenter__(self) -> Unit:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def unit_state(config: cfg.Config, handler: Handler | None = None) -> Unit:
    """``build_state(config)`` with one ``FakeTransport`` behind every cluster. Call inside
    the event loop; ``close()`` it at the end."""
    metrics = Metrics(CollectorRegistry(), buckets=config.metrics.buckets)
    state = build_state(config, metrics)
    transport = FakeTransport(handler if handler is not None else script())
    for cluster in state.clusters.values():
        cluster.transport = transport
        cluster.health.transport = transport
    services = Services(
        metrics=metrics,
        access=AccessLog(enabled=False),
        audit=AuditLog(config.compliance.audit),
        shadower=Shadower(config.migration.max_shadow_in_flight, lambda route, outcome: None),
        idempotency=idem.make_store(config.store),
    )
    return Unit(state, services, transport, metrics)


def exchange(unit: Unit, request: FakeRequest, request_id: str = "rid-1") -> Exchange:
    """An ``Exchange`` for ``request`` (the one place the stand-in meets the type the
    request path declares), arrived now."""
    return Exchange(unit.state, unit.services, cast(Any, request), request_id, time.monotonic())


# -- answers Jalur gives itself -----------------------------------------------------------


def json_answer(out: object) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of an answer Jalur gave itself (never an upstream's response),
    checked for the fields every such answer has."""
    assert not isinstance(out, FakeResponse | FakeStream), f"not Jalur's own answer: {out!r}"
    answer = cast(Any, out)
    body = orjson.loads(answer.body)
    assert isinstance(body, dict)
    assert set(body) >= {"error", "reason", "request_id"}, body
    assert answer.headers["x-request-id"] == body["request_id"]
    status: int = answer.status
    return status, body


def closes(out: object) -> bool:
    """Whether the answer is its connection's last (``close`` on the listener's responses,
    ``keep_alive`` False on aiohttp's)."""
    return getattr(out, "close", None) is True or getattr(out, "keep_alive", None) is False


if TYPE_CHECKING:  # mypy --strict holds the fakes to the protocols they stand in for
    _TRANSPORT: Transport = FakeTransport(script())
    _RESPONSE: UpstreamResponse = FakeResponse()
