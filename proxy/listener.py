"""Jalur's HTTP/1.1 data listener: ``asyncio.Protocol`` connections parsed by llhttp.

Shaped like uvicorn's ``httptools_impl`` (read, not copied): one ``Connection`` protocol per
client socket feeds ``httptools.HttpRequestParser``; each request head becomes a slotted
``Request`` handed to one handler coroutine, ``async handler(request) -> Response | Stream``.
Requests on one connection are handled one at a time, in order (pipelining); what the
client sent ahead waits parsed in a bounded queue. ``Listener`` is the protocol factory
(given to ``accept.Acceptor``) and owns what is per listener: the connection count, the
drain, the limits (``config.Listen``) and the ``on_error(reason)`` counter callback.

What the listener enforces itself, before and around the handler
    ``header_read_timeout``: a connection that has not sent a complete head that long
    after its first byte (or after it was accepted) gets a JSON 408 ``header_timeout`` and
    is closed; an idle keep-alive connection is closed silently after
    ``keepalive_timeout``. ``max_head_bytes``: a head growing past it is answered 431
    ``head_too_large`` before the parser buffers it. ``max_line_size`` (request target),
    ``max_field_size`` (name plus value of one field), ``max_headers``, a repeated
    singleton field (``Host``, ``Content-Length``, ``Transfer-Encoding`` ... as aiohttp),
    a missing ``Host`` in HTTP/1.1, ``Transfer-Encoding`` in HTTP/1.0 and everything
    llhttp refuses in strict mode: 400 ``malformed`` and close. ``max_connections``: a
    connection beyond it is closed before a byte is read. ``max_requests_per_connection``:
    the answer to the last one says ``Connection: close``. ``max_pipelined``: reading
    pauses while that many parsed requests wait (overshoot: what one ``FEED_SLICE`` of
    input holds). Every listener-level refusal is JSON ``{"error", "reason",
    "request_id"}`` with ``X-Request-Id``, written raw, counted through ``on_error``.
Keep-alive
    llhttp's rule (HTTP/1.0 needs ``Connection: keep-alive``; ``Connection: close`` ends
    it). A connection also ends after: a chunked request or an Upgrade request that was
    not switched (nothing pipelined behind them is served: the framing catalogue's
    decision, kept from the aiohttp listener), an answer with ``close`` set, a request
    whose body was not wholly received when it was answered, and every answer once the
    listener drains. The closing answer says ``Connection: close``.
Bodies
    ``Request.read()`` returns what is buffered (``b""`` at the end). At most
    ``READ_HIGH_WATER`` body bytes are buffered before reading from the socket pauses;
    it resumes when the handler has taken them. ``100 Continue`` is written on the
    handler's first read only, so a refusal never invites the body. A client gone
    mid-body raises ``ConnectionResetError`` from ``read``; a body llhttp refuses raises
    ``MalformedBody`` (counted ``malformed``; the connection closes after the answer).
Answers
    ``Response``: a whole answer written in one ``transport.write`` (head and body).
    ``Stream``: a streamed one; its head goes out with the first body chunk (or alone by
    ``send_head``), chunked for HTTP/1.1 when no ``Content-Length`` is given,
    close-delimited for HTTP/1.0. HEAD, 1xx, 204 and 304 answers carry no body. ``Date``
    is cached per second; ``Server`` only when the answer has one or
    ``listen.server_header`` is set. Writes honour the socket's flow control
    (``pause_writing``); a write to a client that is gone raises ``ConnectionResetError``.
    ``Request.linger``: after the answer, read and discard what the client still sends
    for that long, then close (a refused body: the kernel's reset must not destroy the
    answer); 0 closes at once.
Errors
    A handler exception before the answer started: JSON 500 ``internal`` (logged once
    with its request id), connection closed; after it started: the connection is cut.
Upgrades
    After writing a ``101`` the handler takes the socket with ``Request.detach()``:
    ``(transport, leftover bytes)``, reading paused (the new owner sets its protocol and
    resumes reading). The listener stops parsing and draining it; it still counts against
    ``max_connections`` until the handler calls ``Request.tunnel_ended()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Final, NamedTuple

import httptools
import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from . import config as cfg
from .boundary import request_cookies
from .requestid import new_id

__all__ = [
    "FEED_SLICE",
    "HTTP10",
    "HTTP11",
    "READ_HIGH_WATER",
    "Connection",
    "HttpVersion",
    "Listener",
    "MalformedBody",
    "Request",
    "Response",
    "Stream",
    "head_refusal",
]

log = logging.getLogger("jalur")


class HttpVersion(NamedTuple):
    major: int
    minor: int


HTTP10: Final = HttpVersion(1, 0)
HTTP11: Final = HttpVersion(1, 1)

# Request body bytes buffered per connection before the socket stops being read (the
# handler reads them; a slow upstream then slows the client, memory stays bounded).
READ_HIGH_WATER: Final = 64 * 1024
# Input fed to llhttp at once while requests may be parsed ahead: reading pauses after a
# slice that filled the pipelining queue, so at most what one slice holds (4 KiB of tiny
# requests, ~200) is parsed beyond ``max_pipelined``. Body bytes go in larger slices.
FEED_SLICE: Final = 4096
BODY_SLICE: Final = 256 * 1024
# Body pieces shorter than this (a client's tiny chunks: ``1\r\nx\r\n`` ...) are gathered
# into one buffer. Each piece kept as its own bytes object costs ~40 bytes beside its
# payload, so 64 KiB of 2-byte chunks held ~2 MiB per connection, not ``READ_HIGH_WATER``.
SMALL_PIECE: Final = 512
# Seconds an answered connection whose request body was not wholly received still reads
# and discards before closing (unless the handler set ``Request.linger``).
UNREAD_LINGER: Final = 1.0
# Fields a request may carry once (aiohttp's C parser refuses a repeat too; a second Host
# or Content-Length is a smuggling vector), including in a chunked body's trailer.
_SINGLETONS: Final = frozenset(
    {
        b"content-length",
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"host",
        b"max-forwards",
        b"server",
        b"transfer-encoding",
        b"user-agent",
    }
)
_METHODS: Final = {
    m.encode(): m
    for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
}
_VERSIONS: Final = {"1.1": HTTP11, "1.0": HTTP10}
_NO_BODY_STATUS: Final = frozenset({204, 304})
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE: Final = b"Connection: close\r\n"
_KEEP_ALIVE: Final = b"Connection: keep-alive\r\n"
_CHUNKED: Final = b"Transfer-Encoding: chunked\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_CRLF: Final = b"\r\n"
_JSON: Final = "application/json"
_STATUS_LINES: Final = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}

# A timer may fire up to a clock tick early; within this it counts as expired.
_TIMER_SLACK: Final = 0.001
# Status lines with a back end's reason phrase remembered (relayed answers reuse a few).
MAX_STATUS_LINES: Final = 256
_REASON_LINES: dict[tuple[int, str], bytes] = {}
# Timer kinds (one re-armable handle per connection).
_T_OFF: Final = 0
_T_HEAD: Final = 1  # a complete request head is due (408)
_T_IDLE: Final = 2  # keep-alive idle (silent close)
_T_LINGER: Final = 3  # lingering close


class MalformedBody(ValueError):
    """The request body (chunk framing, trailer) was refused by the parser."""


class _Refused(Exception):
    """Raised from a parser callback: the request head is refused (400 ``malformed``);
    also queued for a head refused while an earlier request is being answered."""

    def __init__(
        self, why: str, status: bytes = b"400 Bad Request", reason: str = "malformed"
    ) -> None:
        super().__init__(why)
        self.status = status
        self.reason = reason


class _Stop(Exception):
    """Raised from a parser callback: stop parsing this input (the rest is not read)."""


_date_second = 0
_date_line = b""


def _date() -> bytes:
    """``Date: ...\\r\\n`` of the current second (formatted once per second)."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
    return _date_line


def _status_line(status: int, reason: str | None) -> bytes:
    if reason is None:
        line = _STATUS_LINES.get(status)
        if line is not None:
            return line
        reason = "Unknown"
    key = (status, reason)
    line = _REASON_LINES.get(key)
    if line is None:
        line = f"HTTP/1.1 {status} {reason}\r\n".encode("utf-8", "surrogateescape")
        if len(_REASON_LINES) < MAX_STATUS_LINES:  # reasons come from back ends: bounded
            _REASON_LINES[key] = line
    return line


def _fields(headers: Iterable[tuple[str, str]]) -> bytes:
    return "".join([f"{k}: {v}\r\n" for k, v in headers]).encode("utf-8", "surrogateescape")


def head_refusal(status: bytes, error: str, reason: str, request_id: str) -> bytes:
    """A JSON refusal of a request that never became a ``Request`` (raw bytes, closing)."""
    body = orjson.dumps({"error": error, "request_id": request_id, "reason": reason})
    return b"".join(
        (
            b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n",
            _date(),
            b"Connection: close\r\nX-Request-Id: ",
            request_id.encode(),
            b"\r\nContent-Length: %d\r\n\r\n" % len(body),
            body,
        )
    )


class Response:
    """A whole answer: ``headers`` (mutable) must not frame the body (the listener writes
    ``Content-Length``); ``close`` makes it the connection's last."""

    __slots__ = ("body", "close", "headers", "reason", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: CIMultiDict[str] | None = None,
        *,
        content_type: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers: CIMultiDict[str] = headers if headers is not None else CIMultiDict()
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        self.reason = reason
        self.close = False

    def force_close(self) -> None:
        self.close = True


class Request:
    """One request as the handler sees it; valid until its answer is written."""

    __slots__ = (
        "_body",
        "_chunked",
        "_complete",
        "_conn",
        "_continue",
        "_cookies",
        "_error",
        "_keep",
        "_size",
        "_small",
        "_upgrade",
        "_waiter",
        "body_exists",
        "content_length",
        "headers",
        "linger",
        "method",
        "raw_path",
        "total_bytes",
        "version",
    )

    def __init__(
        self,
        conn: Connection,
        method: str,
        raw_path: str,
        version: HttpVersion,
        headers: CIMultiDictProxy[str],
        content_length: int | None,
        chunked: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.content_length = content_length
        self._chunked = chunked
        self.body_exists = chunked or (content_length is not None and content_length > 0)
        self._complete = not self.body_exists  # every body byte has arrived
        self._body: deque[bytes | bytearray] = deque()
        self._size = 0  # bytes in _body
        self._small: bytearray | None = None  # the last piece of _body, gathering small ones
        self.total_bytes = 0  # body bytes received so far
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._cookies: dict[str, str] | None = None
        self._continue = False
        self._keep = True
        self._upgrade = False
        # Seconds to read and discard after the answer before closing (None: not set).
        self.linger: float | None = None

    # -- what the connection knows ---------------------------------------------------

    @property
    def remote(self) -> str | None:
        return self._conn.remote

    @property
    def scheme(self) -> str:
        return self._conn.scheme

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    @property
    def body_timeout(self) -> float:
        """Seconds from the head to the last body byte (``listen.body_timeout``)."""
        return self._conn.listener.limits.body_timeout

    @property
    def cookies(self) -> dict[str, str]:
        """Cookies as the boundary forwards them: strict pairs of every ``Cookie`` line,
        the first of a repeated name winning, quotes removed (``boundary.request_cookies``)."""
        cookies = self._cookies
        if cookies is None:
            cookies = self._cookies = request_cookies(self.headers.getall("Cookie", ()))
        return cookies

    # -- the body --------------------------------------------------------------------

    def at_eof(self) -> bool:
        """Every body byte has arrived (``read`` will not wait)."""
        return self._complete or self._error is not None

    async def read(self) -> bytes:
        """The body bytes buffered so far (waiting for some), ``b""`` at the end."""
        if self._continue:
            self._continue = False
            self._conn.write_continue()
        while not self._body:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            waiter = self._waiter = self._conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        body = self._body
        data = body.popleft() if len(body) == 1 else b"".join(body)
        if isinstance(data, bytearray):
            data = bytes(data)
        body.clear()
        self._small = None
        self._size = 0
        self._conn.body_taken()
        return data

    def _feed(self, data: bytes) -> None:
        if len(data) < SMALL_PIECE:
            small = self._small
            if small is None:
                small = self._small = bytearray()
                self._body.append(small)
            small += data
            if len(small) >= SMALL_PIECE:
                self._small = None
        else:
            self._small = None
            self._body.append(data)
        self._size += len(data)
        self.total_bytes += len(data)
        self._wake()

    def _end(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- answering -------------------------------------------------------------------

    def stream(
        self, status: int, headers: CIMultiDict[str], *, reason: str | None = None
    ) -> Stream:
        """A streamed answer; nothing is written until its first ``write``/``send_head``."""
        return Stream(self, status, headers, reason)

    @property
    def sent_ahead(self) -> int:
        """Bytes the client sent after this upgrade request's head, before any answer."""
        tail = self._conn._tail
        return len(tail) if tail is not None and self._conn.current is self else 0

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Take the client socket after a ``101`` was written: ``(transport, bytes the
        client sent after the upgrade request)``. Reading is paused; the listener no
        longer reads, writes, closes or drains it, but counts it open (``max_connections``)
        until ``tunnel_ended``."""
        return self._conn.detach(self)

    def tunnel_ended(self) -> None:
        """The detached connection is closed: it no longer counts (idempotent)."""
        self._conn.tunnel_ended()


class Stream:
    """A streamed answer to one request (``Request.stream``)."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_head",
        "_nobody",
        "_request",
        "close",
        "finished",
        "headers",
        "reason",
        "started",
        "status",
    )

    def __init__(
        self, request: Request, status: int, headers: CIMultiDict[str], reason: str | None
    ) -> None:
        self._request = request
        self._conn = request._conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self.close = False
        self.started = False  # the head was handed to the socket
        self.finished = False
        self._head = b""
        self._chunked = False
        self._nobody = False

    def force_close(self) -> None:
        self.close = True

    def _make_head(self) -> bytes:
        request = self._request
        status = self.status
        self._nobody = request.method == "HEAD" or status < 200 or status in _NO_BODY_STATUS
        framed = self._nobody or "Content-Length" in self.headers
        if not framed:
            if request.version >= HTTP11:
                self._chunked = True
            else:
                self.close = True  # close-delimited
        extra = _CHUNKED if self._chunked else b""
        return self._conn.head(request, status, self.reason, self.headers, extra, self.close)

    def send_head(self) -> None:
        """Write the head now (a body chunk is not ready yet)."""
        if not self.started:
            self.started = True
            self._conn.send(self._make_head())

    async def write(self, chunk: bytes) -> None:
        conn = self._conn
        if not self.started:
            self.started = True
            head = self._make_head()
            if self._nobody or not chunk:
                conn.send(head)
            elif self._chunked:
                conn.send_parts((head, b"%x\r\n" % len(chunk), chunk, _CRLF))
            else:
                conn.send_parts((head, chunk))
        elif self._nobody or not chunk:
            return
        elif self._chunked:
            conn.send_parts((b"%x\r\n" % len(chunk), chunk, _CRLF))
        else:
            conn.send(chunk)
        if conn.write_paused:
            await conn.drain()

    async def finish(self) -> None:
        """End the answer (the last chunk of a chunked one)."""
        if self.finished:
            return
        self.finished = True
        if not self.started:
            self.started = True
            head = self._make_head()
            self._conn.send(head + _LAST_CHUNK if self._chunked else head)
        elif self._chunked:
            self._conn.send(_LAST_CHUNK)
        if self._conn.write_paused:
            await self._conn.drain()

    def abort(self) -> None:
        """Cut the connection (an answer that cannot be completed honestly)."""
        self.finished = True
        self.close = True
        self._conn.abort()


Handler = Callable[[Request], Awaitable[Response | Stream]]


class Listener:
    """Protocol factory and per-listener state of the data listener."""

    def __init__(
        self,
        handler: Handler,
        limits: cfg.Listen,
        *,
        on_error: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.on_error = on_error
        self.loop = asyncio.get_running_loop()
        self.open_connections = 0
        # Most connections open since the heap was last released (``server``).
        self.peak_connections = 0
        # Set when a drain starts: every answer says Connection: close, and no
        # connection carries another request.
        self.draining = False
        self.connections: set[Connection] = set()
        self._empty: asyncio.Event | None = None
        server = limits.server_header
        self.server_line = f"Server: {server}\r\n".encode() if server else b""
        self.resume_pipelined = max(1, limits.max_pipelined // 2)

    def __call__(self) -> Connection:
        return Connection(self)

    def connection_gone(self, conn: Connection) -> None:
        """One connection fewer (closed, or a detached one whose tunnel ended)."""
        self.handed_over(conn)
        self.open_connections -= 1

    def handed_over(self, conn: Connection) -> None:
        """``conn`` is no longer drained here (closed, or detached by an upgrade: it still
        counts against ``max_connections`` until ``Request.tunnel_ended``)."""
        self.connections.discard(conn)
        if not self.connections and self._empty is not None:
            self._empty.set()

    async def shutdown(self, grace: float) -> None:
        """Drain: idle connections close now, busy ones after their answer; those still
        busy after ``grace`` seconds are cut."""
        self.draining = True
        for conn in list(self.connections):
            conn.close_if_idle()
        if self.connections:
            self._empty = asyncio.Event()
            try:
                async with asyncio.timeout(grace):
                    await self._empty.wait()
            except TimeoutError:
                log.warning("drain: %d connections still busy, closing", len(self.connections))
        for conn in list(self.connections):
            conn.abort()


class Connection(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    __slots__ = (
        "__weakref__",  # the leak tests watch connections go
        "_broken",
        "_deadline",
        "_detached",
        "_drain_waiter",
        "_framing",
        "_head_bytes",
        "_headers",
        "_heads",
        "_in_body",
        "_lingering",
        "_lost",
        "_parsing",
        "_pending",
        "_read_paused",
        "_refused",
        "_seen",
        "_served",
        "_special",
        "_tail",
        "_task",
        "_timer",
        "_timer_kind",
        "_tunnel",
        "_url",
        "_url_size",
        "_why",
        "_wrote",
        "current",
        "limits",
        "listener",
        "loop",
        "parser",
        "queue",
        "remote",
        "scheme",
        "transport",
        "write_paused",
    )

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.limits = listener.limits
        self.loop = listener.loop
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = None
        self.remote: str | None = None
        self.scheme = "http"
        self.queue: deque[Request | _Refused] = deque()  # parsed, waiting their turn
        self.current: Request | None = None  # being handled
        self.write_paused = False
        self._refused = True  # not counted (over max_connections) until connection_made
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = _T_OFF
        self._deadline = 0.0
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self._lost = False
        self._broken = False  # the parser refused input: nothing more is parsed
        self._detached = False
        self._tunnel = False  # detached and still counted as open (until tunnel_ended)
        self._lingering = False
        self._pending: bytes = b""  # input not parsed yet (pipelining queue full)
        self._tail: bytes | None = None  # input after an upgrade request
        self._served = 0
        self._why: Exception | None = None  # what a parser callback raised
        self._wrote = False  # bytes of the current request's answer were written
        self._head_bytes = 0  # bytes of the head being received
        self._heads = 0  # heads completed (tells whether a feed completed one)
        self._in_body = False  # the parser is inside a request body
        # Bytes fed inside a body since its last body bytes: chunk size lines, extensions,
        # the trailer section (-1: body bytes came in the last feed).
        self._framing = 0
        self._parsing: Request | None = None  # the request whose body is being parsed
        self._url: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        self._url_size = 0  # bytes of the request target
        self._seen: set[bytes] = set()  # singleton fields seen in this request
        self._special: dict[bytes, bytes] = {}  # framing fields seen (lower-cased name)

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self.listener
        if listener.open_connections >= self.limits.max_connections:
            listener.on_error("max_connections")
            transport.abort()  # type: ignore[attr-defined]  # refused before any byte is read
            return
        self._refused = False
        listener.open_connections += 1
        if listener.open_connections > listener.peak_connections:
            listener.peak_connections = listener.open_connections
        listener.connections.add(self)
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.remote = str(peer[0])
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self.parser = httptools.HttpRequestParser(self)
        self._arm(_T_HEAD, self.limits.header_read_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused or self._detached:
            return
        self._lost = True
        self._stop_timer()
        self.listener.connection_gone(self)
        gone = ConnectionResetError("client closed the connection")
        for request in (self.current, self._parsing):
            if request is not None:
                request._fail(gone)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(gone)
        self.queue.clear()
        self.parser = None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool | None:
        """The client will send nothing more (a half-close): what it sent is still
        answered, the last answer closing the connection; a body cut short fails."""
        if self._lingering or self._detached:
            self._close()
            return None
        parsing = self._parsing
        if parsing is not None:
            parsing._fail(ConnectionResetError("client ended its side mid-body"))
        self._broken = True  # nothing more will be parsed
        last = self.queue[-1] if self.queue else self.current
        if isinstance(last, Request):
            last._keep = False
            return True  # keep writing: the transport closes after the last answer
        if self.current is None and not self.queue:
            return None  # idle: the transport closes
        return True

    def data_received(self, data: bytes) -> None:
        if self._lingering or self._broken:
            return  # discarded
        if self._tail is not None:
            self._tail += data  # after an upgrade request (reading is paused)
            return
        if self._pending:
            self._pending += data
            self._update_reading()
            return
        if not self._in_body:
            limit = self.limits.max_head_bytes
            if self._head_bytes + len(data) > limit:
                end = data.find(b"\r\n\r\n")
                if end < 0 or self._head_bytes + end + 4 > limit:
                    self._head_too_large()
                    return
            if self._timer_kind == _T_IDLE:
                self._arm(_T_HEAD, self.limits.header_read_timeout)
        self._feed(data)

    # -- parsing -----------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        parser = self.parser
        assert parser is not None
        heads = self._heads
        awaiting = not self._in_body  # these bytes start in a head (counted if it goes on)
        size = fed = len(data)
        try:
            if size <= FEED_SLICE:
                parser.feed_data(data)
            else:
                view = memoryview(data)
                pos = 0
                limit = self.limits.max_pipelined
                while pos < size:
                    step = BODY_SLICE if self._in_body else FEED_SLICE
                    try:
                        parser.feed_data(view[pos : pos + step])
                    except httptools.HttpParserUpgrade as exc:
                        raise httptools.HttpParserUpgrade(pos + int(exc.args[0])) from None
                    pos += step
                    if len(self.queue) >= limit and pos < size:
                        self._pending = bytes(view[pos:])
                        fed = pos
                        break
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[int(exc.args[0]) :])
        except httptools.HttpParserCallbackError:
            cause, self._why = self._why, None
            if isinstance(cause, _Stop):
                self._broken = True
            elif isinstance(cause, _Refused):
                self._malformed(str(cause))
            else:
                raise
        except httptools.HttpParserError as exc:
            self._malformed(str(exc) or "malformed request")
        if self._in_body:
            # llhttp hands body bytes over as they come, but httptools gathers a trailer
            # field whole before ``on_header`` sees it, and nothing bounds extensions or the
            # trailer section: their run is bounded like a head (one read's overshoot).
            framing = self._framing
            self._framing = 0 if framing < 0 or awaiting else framing + fed
            if self._framing > self.limits.max_head_bytes and not self._broken:
                self._malformed("chunk framing or trailer section over listen.max_head_bytes")
        if awaiting and self._heads == heads:
            # Still in the same head. (Bytes of a next head after a body's end are not
            # counted: at most one read's worth beyond max_head_bytes, as aiohttp's.)
            self._head_bytes += size
        if self.queue:
            self._disarm()
            if self._task is None:
                self._next()
        self._update_reading()

    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers = []
        self._url_size = 0
        self._seen.clear()
        self._special.clear()

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._url_size += len(url)
        if self._url_size > self.limits.max_line_size:
            raise self._refuse("request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= self.limits.max_headers:
            raise self._refuse("too many header fields")
        if len(name) + len(value) > self.limits.max_field_size:
            raise self._refuse("header field too long")
        key = name.lower()
        if key in _SINGLETONS:
            if key in self._seen:
                raise self._refuse(f"duplicate {name.decode()} header")
            self._seen.add(key)
            self._special[key] = value
        elif key == b"expect" or key == b"sec-websocket-key1" or key == b"upgrade":
            self._special[key] = value
        if self._in_body:
            return  # a trailer field: checked, never a request header
        headers.append(
            (name.decode("ascii"), value.decode("utf-8", "surrogateescape").rstrip(" \t"))
        )

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        special = self._special
        text = parser.get_http_version()
        version = _VERSIONS.get(text)
        if version is None:
            major, _, minor = text.partition(".")
            version = HttpVersion(int(major), int(minor or 0))
        if b"host" not in special and version >= HTTP11:
            raise self._refuse("missing Host header")
        chunked = b"transfer-encoding" in special
        if chunked and version < HTTP11:
            raise self._refuse("Transfer-Encoding in an HTTP/1.0 request")
        if b"sec-websocket-key1" in special:
            raise self._refuse("obsolete WebSocket handshake")
        length_field = special.get(b"content-length")
        length = int(length_field) if length_field is not None else None
        method_raw = parser.get_method()
        method = _METHODS.get(method_raw) or method_raw.decode("ascii")
        url = self._url
        raw = url[0] if len(url) == 1 else b"".join(url)
        request = Request(
            self,
            method,
            raw.decode("utf-8", "surrogateescape"),
            version,
            CIMultiDictProxy(CIMultiDict(self._headers)),
            length,
            chunked,
        )
        upgrade = b"upgrade" in special and parser.should_upgrade()
        request._keep = parser.should_keep_alive() and not chunked and not upgrade
        request._upgrade = upgrade
        expect = special.get(b"expect")
        if expect is not None and version >= HTTP11 and expect.lower() == b"100-continue":
            request._continue = True
        self._heads += 1
        self._head_bytes = 0
        if request.body_exists:
            self._in_body = True
            self._parsing = request
        self.queue.append(request)

    def on_body(self, body: bytes) -> None:
        self._framing = -1
        request = self._parsing
        if request is not None and not request._error:
            request._feed(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        request = self._parsing
        if request is not None:
            self._parsing = None
            request._end()

    def _refuse(self, why: str) -> _Refused:
        """The exception a parser callback raises to refuse the head (kept: httptools
        raises its own ``HttpParserCallbackError`` in its place)."""
        exc = self._why = _Refused(why)
        return exc

    def _malformed(self, why: str) -> None:
        """The parser refused input: the body being parsed fails, or the head is refused
        (answered when its turn comes); nothing further is parsed."""
        self._broken = True
        log.debug("malformed request from %s: %s", self.remote, why)
        request = self._parsing
        refusal = _Refused(f"malformed request: {why.strip()[:120]}")
        if request is not None and self._in_body:
            queue = self.queue
            if queue and queue[-1] is request:
                # Not handed to the handler yet (llhttp checks the framing just after the
                # head, e.g. an unknown Transfer-Encoding): refused like a bad head.
                queue[-1] = refusal
                self._parsing = None
                return
            self.listener.on_error("malformed")
            request._keep = False
            request._fail(MalformedBody(f"malformed request body: {why}"))
            return
        self.queue.append(refusal)

    def _upgraded(self, tail: bytes) -> None:
        """llhttp stopped after an Upgrade (or CONNECT) request's head: what follows is
        not HTTP. A body it announced is read with a parser of its own; otherwise the
        bytes wait for ``detach`` (reading paused) and are dropped if no 101 is sent."""
        request = self.queue[-1] if self.queue else None
        if isinstance(request, Request):
            request._keep = False  # what follows is not HTTP: no further request
        if not isinstance(request, Request) or not request.body_exists:
            self._tail = tail
            return
        # Body parser: a synthetic head with the same framing, its callbacks are ours.
        request._upgrade = False
        self._in_body = True
        self._parsing = request
        framing = (
            b"Transfer-Encoding: chunked"
            if request._chunked
            else (b"Content-Length: %d" % (request.content_length or 0))
        )
        self.parser = httptools.HttpRequestParser(_BodyOnly(self))
        self.parser.feed_data(b"PUT / HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")
        self._feed(tail)

    def _head_too_large(self) -> None:
        limit = self.limits.max_head_bytes
        self._refuse_raw(
            b"431 Request Header Fields Too Large",
            f"request head over {limit} bytes",
            "head_too_large",
        )

    def _refuse_raw(self, status: bytes, error: str, reason: str) -> None:
        """Answer a head that never became a request, then close (no handler involved).
        While an earlier request is being answered, the refusal waits its turn (counted
        then), as a malformed head does: the client gets every answer, in order."""
        self._broken = True
        if self.current is not None and not self._lost:
            self.queue.append(_Refused(error, status, reason))
            return
        self.listener.on_error(reason)
        transport = self.transport
        if transport is not None and not self._lost:
            transport.write(head_refusal(status, error, reason, new_id()))
            self._close()

    # -- flow control ------------------------------------------------------------------

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._lost or self._detached:
            return
        parsing = self._parsing
        # Pipelining: paused at max_pipelined waiting, resumed once half of them are served.
        full = self.listener.resume_pipelined if self._read_paused else self.limits.max_pipelined
        pause = (
            self._tail is not None
            or bool(self._pending)
            or len(self.queue) >= full
            or (parsing is not None and parsing._size >= READ_HIGH_WATER)
        ) and not self._lingering
        if pause != self._read_paused:
            self._read_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def body_taken(self) -> None:
        """The handler took buffered body bytes: read on if reading paused for them."""
        if self._read_paused:
            self._resume()

    def _resume(self) -> None:
        pending = self._pending
        if pending and len(self.queue) < self.listener.resume_pipelined:
            self._pending = b""
            self._feed(pending)
            return
        self._update_reading()

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("client closed the connection")
        if not self.write_paused:
            return
        waiter = self._drain_waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._drain_waiter = None

    # -- writing -----------------------------------------------------------------------

    def write_continue(self) -> None:
        if not self._lost and self.transport is not None:
            self.transport.write(_CONTINUE)

    def send(self, data: bytes) -> None:
        transport = self.transport
        if self._lost or transport is None or transport.is_closing():
            raise ConnectionResetError("client closed the connection")
        self._wrote = True
        transport.write(data)

    def send_parts(self, parts: Iterable[bytes]) -> None:
        transport = self.transport
        if self._lost or transport is None or transport.is_closing():
            raise ConnectionResetError("client closed the connection")
        self._wrote = True
        transport.writelines(parts)

    def closing(self, request: Request) -> bool:
        """Is the answer to ``request`` the connection's last?"""
        return (
            not request._keep
            or self.listener.draining
            or self._served >= self.limits.max_requests_per_connection
            or request.linger is not None
            or not request._complete
        )

    def head(
        self,
        request: Request,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        framing: bytes,
        close: bool,
    ) -> bytes:
        """An answer's head; ``close`` (or the connection's state) makes it the last."""
        if status == 101:
            connection = b""  # the answer names the protocol switched to itself
        elif close or self.closing(request):
            request._keep = False
            connection = _CLOSE
        elif request.version < HTTP11:
            connection = _KEEP_ALIVE
        else:
            connection = b""
        server = self.listener.server_line
        if server and "Server" in headers:
            server = b""  # the back end's own, relayed
        return b"".join(
            (
                _status_line(status, reason),
                _fields(headers.items()),
                b"" if "Date" in headers else _date(),
                server,
                connection,
                framing,
                _CRLF,
            )
        )

    def _answer(self, request: Request, answer: Response) -> None:
        status = answer.status
        body = answer.body
        if status < 200 or status in _NO_BODY_STATUS:
            framing, body = b"", b""
        else:
            framing = b"Content-Length: %d\r\n" % len(body)
            if request.method == "HEAD":
                body = b""
        head = self.head(request, status, answer.reason, answer.headers, framing, answer.close)
        self.send(head + body if body else head)

    # -- the handler -------------------------------------------------------------------

    def _next(self) -> None:
        item = self.queue.popleft()
        if isinstance(item, _Refused):
            self._refuse_raw(item.status, str(item), item.reason)
            return
        self._served += 1
        self._wrote = False
        self.current = item
        self._task = self.loop.create_task(self._serve(item))
        if self._read_paused:
            self._resume()

    async def _serve(self, request: Request) -> None:
        while True:
            try:
                result = await self.listener.handler(request)
                if self._detached:
                    return
                if isinstance(result, Response):
                    self._answer(request, result)
                    if self.write_paused:
                        # A client pipelining without reading holds one answer, not all.
                        await self.drain()
                else:
                    if not result.finished:
                        await result.finish()
                    if result.close:
                        request._keep = False
            except ConnectionError:
                request._keep = False
                self._abort_quietly()
            except Exception as exc:
                request._keep = False
                self._crashed(request, exc)
            if not self._done(request):
                return
            request = self.current  # type: ignore[assignment]

    def _crashed(self, request: Request, exc: BaseException) -> None:
        """A handler exception: JSON 500 if nothing was written yet, else the cut."""
        request_id = new_id()
        log.error("internal error request_id=%s", request_id, exc_info=exc)
        self.listener.on_error("internal")
        transport = self.transport
        if transport is None or self._lost:
            return
        if self.current is request and not transport.is_closing() and not self._wrote:
            answer = Response(
                500,
                orjson.dumps(
                    {
                        "error": "internal proxy error",
                        "request_id": request_id,
                        "reason": "internal",
                    }
                ),
                CIMultiDict({"X-Request-Id": request_id}),
                content_type=_JSON,
            )
            answer.close = True
            with contextlib.suppress(ConnectionError):
                self._answer(request, answer)
        else:
            transport.abort()

    def _done(self, request: Request) -> bool:
        """After an answer: True when ``self.current`` holds the next request to serve."""
        self.current = None
        self._task = None
        if self._detached or self._lost:
            return False
        if not request._keep or self.closing(request):
            self._finish_connection(request)
            return False
        if self.queue:
            item = self.queue[0]
            if isinstance(item, _Refused):
                self._next()
                return False
            self.queue.popleft()
            self._served += 1
            self._wrote = False
            self.current = item
            self._task = asyncio.current_task()
            if self._read_paused:
                self._resume()
            return True
        if self._broken:
            self._close()
            return False
        if self._head_bytes:
            self._arm(_T_HEAD, self.limits.header_read_timeout)
        else:
            self._arm(_T_IDLE, self.limits.keepalive_timeout)
        if self._read_paused:
            self._resume()
        return False

    def _finish_connection(self, request: Request) -> None:
        """The last answer is written: linger if the request asked (or its body is not
        wholly read), then close."""
        self.queue.clear()
        linger = request.linger
        if linger is None and not request._complete:
            linger = UNREAD_LINGER if not request._continue else 0.0
        if not linger:
            self._close()
            return
        self._lingering = True
        self._broken = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            with contextlib.suppress(OSError):
                transport.write_eof()
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        self._arm(_T_LINGER, linger)

    # -- timers and closing ------------------------------------------------------------

    def _arm(self, kind: int, delay: float) -> None:
        """Guard the connection with ``kind`` from now for ``delay`` seconds. The timer
        handle is reused: a later deadline only moves ``_deadline`` (checked when the
        handle fires), so a request on a kept-alive connection creates no timer."""
        deadline = self.loop.time() + delay
        self._timer_kind = kind
        self._deadline = deadline
        timer = self._timer
        if timer is not None:
            if timer.when() <= deadline:
                return
            timer.cancel()
        self._timer = self.loop.call_at(deadline, self._expired)

    def _disarm(self) -> None:
        """Nothing is guarded any more (a pending handle finds nothing to do)."""
        self._timer_kind = _T_OFF

    def _stop_timer(self) -> None:
        self._timer_kind = _T_OFF
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        kind = self._timer_kind
        if kind == _T_OFF:
            return
        if self.loop.time() + _TIMER_SLACK < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._expired)
            return
        self._timer_kind = _T_OFF
        if self._lost or self._detached or self.current is not None or self.queue:
            return
        if kind == _T_HEAD:
            self._refuse_raw(
                b"408 Request Timeout", "request head not received in time", "header_timeout"
            )
        else:
            self._close()

    def close_if_idle(self) -> None:
        """Drain: close now when no request is being served, else after its answer."""
        if self.current is None and not self.queue:
            self._close()

    def _close(self) -> None:
        self._stop_timer()
        self._lingering = False
        transport = self.transport
        if transport is not None and not self._detached:
            transport.close()

    def abort(self) -> None:
        self._stop_timer()
        transport = self.transport
        if transport is not None and not self._detached:
            transport.abort()

    def _abort_quietly(self) -> None:
        if self.transport is not None and not self._lost and not self._detached:
            self.transport.abort()

    def detach(self, request: Request) -> tuple[asyncio.Transport, bytes]:
        transport = self.transport
        if transport is None or self._lost or self._detached or request is not self.current:
            raise ConnectionResetError("the client connection is gone")
        if not self._read_paused:
            transport.pause_reading()
            self._read_paused = True
        self._detached = True
        self._stop_timer()
        tail = self._tail or b""
        self._tail = None
        self.queue.clear()
        self.parser = None
        # Still open: an upgraded connection holds a socket (and an upstream one) like any
        # other, so it counts against max_connections until its tunnel ends.
        self._tunnel = True
        self.listener.handed_over(self)
        return transport, tail

    def tunnel_ended(self) -> None:
        if self._tunnel:
            self._tunnel = False
            self.listener.connection_gone(self)


class _BodyOnly:
    """Parser callbacks for the body of an upgrade request that was not switched (see
    ``Connection._upgraded``): the synthetic head is ignored; after the body, stop."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def on_body(self, body: bytes) -> None:
        self.conn.on_body(body)

    def on_message_complete(self) -> None:
        self.conn.on_message_complete()
        stop = self.conn._why = _Stop()
        raise stop
