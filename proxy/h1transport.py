"""A pooled HTTP/1.1 client on asyncio Protocols: the fast ``upstream.Transport``.

``H1Transport`` speaks HTTP/1.1 to one cluster's endpoints over plain ``asyncio.Protocol``
connections (so it runs on uvloop's C transports) and parses responses with llhttp through
``httptools`` (strict mode: no leniencies). It implements the same ``Transport`` protocol as
``upstream.AiohttpTransport`` without aiohttp's per-request machinery: one small response
object, one future for the response head and the parser reused for the life of the
connection. WebSocket upgrades are not handled here.

TLS (a cluster with ``https://`` endpoints; contexts built by ``tls.for_cluster``): each
new connection is wrapped with the cluster's current context (``Rotating.context``, so a
rotated client certificate applies to new connections only), SNI and the verified name
being ``tls.server_name`` or the endpoint's host. The TLS session of the first exchange on
a connection is kept per endpoint and offered by the endpoint's next new connection
(resumption: no full handshake while the upstream honours it); a session from a context
that has since been rotated is not offered. The handshake counts against
``timeouts.connect``. TLS failures -- during the handshake, or an alert after it such as
TLS 1.3's "certificate required" -- become ``TlsVerifyFailed``/``TlsHandshakeFailed``
through ``tls.map_error`` in ``_connect`` (by way of ``upstream.map_connect_error``, shared
with ``tunnel``) and ``connection_lost``, the two places socket errors are mapped here.

Wiring (in ``forward.build_state``)::

    transport = H1Transport(spec, config.listen)

Behaviour
---------
Pool
    Per endpoint a LIFO stack of idle keep-alive connections. At most
    ``cluster.max_connections`` connections are open per transport (connecting, busy and
    idle together); when the bound is reached an idle connection of another endpoint is
    closed to make room, otherwise ``send`` waits for a free slot for up to
    ``timeouts.connect`` seconds (then ``ConnectTimeout``). An idle connection is closed
    after ``pool_idle_timeout`` seconds (default 15), and at once if its peer closes it or
    sends anything unsolicited. A connection is only reused after a complete exchange:
    request fully written, response fully parsed, no error, and the response allowed
    keep-alive (not ``Connection: close``, not an HTTP/1.0 response without keep-alive, not
    a close-delimited body).
Request
    The head is built once per request as one ``bytes``: request line, the given headers in
    order, ``Host`` as given (the endpoint's ``host:port`` only when absent). A header value
    or target holding CR or LF is refused with ``errors.BadRequest`` before anything is
    sent. No body (``body is None``): nothing is added (a ``Content-Length: 0`` is sent only
    if the given headers carry it). A body with ``Content-Length`` in the headers is written
    as is and must match it exactly; a body without one is sent chunked. Writing respects
    the socket's flow control (``pause_writing``), so an upload never queues more than the
    transport's write buffer. The head goes out together with the first body chunk (one
    write); the body is written inline by ``send`` (no task per request). A final response
    that arrives while the body is still uploading is noticed at the next chunk or when the
    upstream stops accepting bytes: it is returned at once, the rest of the body keeps
    streaming in a background task (full duplex, as with aiohttp), and the connection is
    reused afterwards only if that upload completed. A response before any request byte was
    written is a protocol error.
Response
    ``status``, ``reason``, ``headers`` (``CIMultiDictProxy``, duplicates kept), and the body
    through ``read_chunk()`` (``b""`` at the end). At most ``READ_HIGH_WATER`` bytes are
    buffered (plus at most one socket read) before reading from the socket pauses; it
    resumes once the consumer has taken the buffer (``read_chunk`` returns all of it).
    Content-Length, chunked (decoded by llhttp) and close-delimited bodies; no body for
    HEAD, 1xx, 204 and 304. Interim 1xx responses (100 Continue, 103 Early Hints) are
    skipped; 101 is a protocol error (no upgrade is ever requested here). Malformed
    responses (bad status line, duplicate Content-Length, Content-Length together with
    Transfer-Encoding, obs-fold, bare LF, bad chunk framing, a status line over
    ``listen.max_line_size``, a header over ``listen.max_field_size``, more than
    ``MAX_HEADERS`` headers, a head over ``max_head_bytes``, a second response in the same
    exchange) raise ``UpstreamProtocolError`` and the connection is discarded.
Timeouts (``cluster.timeouts``; one re-armable ``loop.call_at`` handle per connection)
    ``connect``: TCP connect (``ConnectTimeout``), and separately the wait for a pool slot.
    ``response_headers``: from the end of the request write (the last body byte handed to
    the socket) until the response head is complete (``ResponseTimeout``). A slow *upload*
    is not counted against it; it is bounded by ``idle`` instead.
    ``idle``: while ``read_chunk`` waits for body bytes, or while the request write waits
    for the upstream to accept more bytes (``ResponseTimeout``). Time the *consumer* spends
    between reads does not count.
Errors (the ``errors.UpstreamError`` tree)
    connect refused: ``ConnectRefused`` (a ``ConnectFailed``); unreachable or DNS:
    ``ConnectFailed``; connect timeout or no pool slot in time: ``ConnectTimeout``; reset
    or EOF before a complete head: ``UpstreamReset``; reset or EOF in a framed body:
    ``UpstreamReset`` from ``read_chunk``; malformed: ``UpstreamProtocolError``; the
    request body iterator failing, or a body not matching its Content-Length: plain
    ``UpstreamError`` (chained to the cause; the caller knows whether its client failed).

Progress for retry decisions: every ``errors.UpstreamError`` raised here has
``request_bytes_sent`` set on the instance (the attribute ``errors.UpstreamError``
declares): bytes of the request handed to the socket, ``0`` when none were, so that even a
non-idempotent request may be sent again (connect failures, pool waits, a connection found
closed before the write). It also has ``connection_reused: bool``: the request went out on
a pooled keep-alive connection (the stale-connection race). The response object carries
both too. ``request_bytes_sent(exc)`` and ``connection_reused(exc)`` read them from any
exception. ``send`` never sends a request twice by itself, and iterates ``body`` afresh on
every call.

HEAD responses: httptools cannot tell llhttp that a response has no body, so the head
callback stops the parser with a private exception and the connection gets a fresh parser
(needs httptools >= 0.6.3; the tests check it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING, Final, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from . import config as cfg
from . import errors
from . import tls as tls_mod
from .upstream import map_connect_error

if TYPE_CHECKING:
    from .upstream import Endpoint

__all__ = [
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "POOL_IDLE_TIMEOUT",
    "READ_HIGH_WATER",
    "H1Transport",
    "connection_reused",
    "request_bytes_sent",
]

# Response body bytes buffered per connection before the socket stops being read.
READ_HIGH_WATER: Final = 64 * 1024
# Seconds an idle pooled connection is kept.
POOL_IDLE_TIMEOUT: Final = 15.0
# Most header fields in one response head (aiohttp's default as well).
MAX_HEADERS: Final = 128
# Largest response head (status line + header fields), like Envoy's 60 KiB default;
# raised to fit at least one maximal line plus one maximal field.
MAX_HEAD_BYTES: Final = 60 * 1024

# Attribute names set on raised errors (see the module docstring).
_SENT: Final = "request_bytes_sent"
_REUSED: Final = "connection_reused"

# Body framing of the request being written.
_NO_BODY: Final = -2
_CHUNKED: Final = -1

# What the connection's timer is guarding.
_T_OFF: Final = 0
_T_POOL: Final = 1  # idle in the pool
_T_HEAD: Final = 2  # waiting for the response head
_T_READ: Final = 3  # read_chunk waiting for body bytes
_T_WRITE: Final = 4  # request write waiting for the upstream to drain
# A timer may fire up to a clock tick early; within this it counts as expired.
_TIMER_SLACK: Final = 0.001

_CHUNK_END: Final = b"\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_HTTP11: Final = " HTTP/1.1\r\n"
_TE_CHUNKED: Final = "Transfer-Encoding: chunked\r\n"


def request_bytes_sent(exc: BaseException) -> int:
    """Request bytes handed to the upstream socket before ``exc`` (0 when unknown)."""
    sent = getattr(exc, _SENT, 0)
    return sent if isinstance(sent, int) else 0


def connection_reused(exc: BaseException) -> bool:
    """Whether the failed request went out on a pooled keep-alive connection."""
    return getattr(exc, _REUSED, False) is True


def _stamp(err: errors.UpstreamError, sent: int, reused: bool) -> errors.UpstreamError:
    setattr(err, _SENT, sent)
    setattr(err, _REUSED, reused)
    return err


class _SkipBody(Exception):
    """Raised from ``on_headers_complete`` to stop llhttp after a HEAD response head
    (httptools cannot tell llhttp that the message has no body)."""


class _Pool:
    """One endpoint's idle connections, constant request bytes and TLS session."""

    __slots__ = ("host", "host_line", "idle", "port", "server_name", "session", "url")

    def __init__(self, endpoint: Endpoint, server_name: str | None) -> None:
        self.url = endpoint.url
        self.host = endpoint.host
        self.port = endpoint.port
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        self.host_line = f"Host: {host}:{endpoint.port}\r\n"
        self.idle: deque[_Conn] = deque()
        self.server_name = server_name or endpoint.host  # SNI and verified name
        # The last TLS session the endpoint gave, with the context it belongs to.
        self.session: tuple[ssl.SSLContext, ssl.SSLSession] | None = None


class _Response:
    """One response head plus its body stream; valid until ``release`` or ``close``."""

    __slots__ = ("_conn", "_headers", "_items", "_sent", "connection_reused", "reason", "status")

    def __init__(
        self, conn: _Conn, status: int, reason: str, items: list[tuple[str, str]], reused: bool
    ) -> None:
        self._conn: _Conn | None = conn
        self.status = status
        self.reason = reason
        self._items = items
        self._headers: CIMultiDictProxy[str] | None = None
        self._sent = 0
        self.connection_reused = reused

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        h = self._headers
        if h is None:
            h = self._headers = CIMultiDictProxy(CIMultiDict(self._items))
        return h

    def header_items(self) -> list[tuple[str, str]]:
        return list(self._items)

    @property
    def request_bytes_sent(self) -> int:
        """Request bytes handed to the socket so far (grows while a request body that
        was still uploading when the head arrived keeps streaming)."""
        conn = self._conn
        return conn._sent if conn is not None else self._sent

    def body_ready(self) -> bool:
        """``read_chunk`` would return without waiting: body bytes are buffered, or the
        body ended or failed."""
        conn = self._conn
        return (
            conn is None
            or bool(conn._buf)
            or conn._msg_done
            or conn._error is not None
            or conn._closed
        )

    async def read_chunk(self) -> bytes:
        """The next piece of the body; ``b""`` at its end. Raises ``UpstreamReset`` if the
        upstream closed mid-body, ``ResponseTimeout`` after ``timeouts.idle`` seconds
        without a byte, ``UpstreamProtocolError`` for bad framing."""
        conn = self._conn
        if conn is None:
            return b""
        buf = conn._buf
        while True:
            if buf:
                if len(buf) == 1:
                    chunk = buf.popleft()
                else:
                    chunk = b"".join(buf)
                    buf.clear()
                conn._buffered = 0
                if conn._reading_paused:
                    conn._resume_reading()
                return chunk
            if conn._msg_done:
                return b""
            err = conn._error
            if err is not None:
                raise _stamp(err, conn._sent, self.connection_reused)
            if conn._closed:
                raise _stamp(
                    errors.UpstreamReset("upstream connection closed mid-body"),
                    conn._sent,
                    self.connection_reused,
                )
            loop = conn._loop
            conn._arm(_T_READ, loop.time() + conn._owner._t_idle)
            waiter = conn._read_waiter = loop.create_future()
            try:
                await waiter
            except BaseException:
                conn._read_waiter = None
                self.close()
                raise
            conn._read_waiter = None
            conn._timer_kind = _T_OFF

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool if the exchange
        is complete and keep-alive, else it is closed."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._sent = conn._sent
            conn._finish(True)

    def close(self) -> None:
        """Discard the response and its connection."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._sent = conn._sent
            conn._finish(False)


class _Conn(asyncio.Protocol):
    """One upstream TCP connection, its llhttp parser and the state of one exchange."""

    __slots__ = (
        "_active",
        "_buf",
        "_buffered",
        "_closed",
        "_counted",
        "_deadline",
        "_drain_waiter",
        "_error",
        "_field_bytes",
        "_framed",
        "_head_bytes",
        "_head_done",
        "_head_waiter",
        "_idle",
        "_interim",
        "_items",
        "_keep_alive",
        "_length",
        "_loop",
        "_msg_done",
        "_owner",
        "_parser",
        "_pool",
        "_pump_task",
        "_read_waiter",
        "_reading_paused",
        "_reason",
        "_remaining",
        "_resp",
        "_reused",
        "_sent",
        "_skip_body",
        "_ssl_ctx",
        "_timer",
        "_timer_at",
        "_timer_kind",
        "_trailer_bytes",
        "_transport",
        "_uses",
        "_write_done",
        "_write_paused",
    )

    def __init__(self, owner: H1Transport, pool: _Pool, loop: asyncio.AbstractEventLoop) -> None:
        self._owner = owner
        self._pool = pool
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._closed = False
        self._counted = False  # holds one of the owner's max_connections slots
        self._idle = False  # parked in pool.idle
        self._active = False  # an exchange is in progress
        self._uses = 0
        self._reused = False
        # TLS: the context used, until the connection's session was saved for resumption
        self._ssl_ctx: ssl.SSLContext | None = None
        # timer
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._timer_kind = _T_OFF
        self._deadline = 0.0
        # request side
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._sent = 0
        self._length = _NO_BODY
        self._remaining = 0
        self._write_done = True
        self._pump_task: asyncio.Task[bool] | None = None
        # response side
        self._head_waiter: asyncio.Future[None] | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._resp: _Response | None = None
        self._head_done = False
        self._msg_done = False
        self._interim = False
        self._skip_body = False
        self._keep_alive = False
        self._framed = False
        self._reason = b""
        self._items: list[tuple[str, str]] = []
        self._head_bytes = 0  # raw bytes read while the head was incomplete
        self._field_bytes = 0  # header field bytes of the head being parsed
        self._trailer_bytes = 0
        self._buf: deque[bytes] = deque()
        self._buffered = 0
        self._reading_paused = False
        self._error: errors.UpstreamError | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._active or self._msg_done or self._error is not None:
            # Bytes after the response (a late body, a 408 before closing): the
            # connection is out of step with us and is not used again.
            if not self._active:
                self._discard()
            else:
                self._keep_alive = False
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _SkipBody):
                # HEAD: the head is the whole message. llhttp stopped in an error state,
                # so the connection gets a fresh parser.
                self._parser = httptools.HttpResponseParser(self)
                # Bytes behind the head in this read mean the upstream is out of step with
                # us (a body after a HEAD answer): do not pool the connection. Conservative:
                # the read must end exactly at the only blank line in it.
                if not data.endswith(b"\r\n\r\n") or data.count(b"\r\n\r\n") != 1:
                    self._keep_alive = False
                self.on_message_complete()
            elif isinstance(cause, errors.UpstreamError):
                self._fail(cause)
            else:
                self._fail(errors.UpstreamProtocolError(f"invalid upstream response: {exc}"))
            return
        except httptools.HttpParserUpgrade:
            self._fail(errors.UpstreamProtocolError("upstream switched protocols unasked"))
            return
        except httptools.HttpParserError as exc:
            self._fail(errors.UpstreamProtocolError(f"invalid upstream response: {exc}"))
            return
        if not self._head_done:
            self._head_bytes += len(data)
            if self._head_bytes > self._owner._max_head:
                self._fail(
                    errors.UpstreamProtocolError(
                        f"upstream response head larger than {self._owner._max_head} bytes"
                    )
                )

    def eof_received(self) -> bool | None:
        if self._idle:
            self._discard()
        return None  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._transport = None
        self._owner._forget(self)
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        if self._active and self._error is None:
            tls_error = None
            if exc is not None and self._owner._tls is not None and not self._head_done:
                tls_error = tls_mod.map_error(exc)  # e.g. TLS 1.3: our client cert refused
            if tls_error is not None:
                self._error = tls_error
            elif self._ssl_ctx is not None and self._uses == 1 and not self._head_bytes:
                # A new TLS connection closed before a byte of the first answer: how a TLS
                # 1.3 upstream that refuses our client certificate looks when it does not
                # send the alert (the handshake completes on our side first).
                self._error = errors.TlsHandshakeFailed(
                    "the upstream closed the new TLS connection without answering "
                    "(did it refuse the client certificate?)"
                )
            elif not self._head_done:
                detail = f": {exc}" if exc is not None else ""
                self._error = errors.UpstreamReset(
                    f"upstream closed the connection before the response head{detail}"
                )
            elif not self._msg_done:
                if exc is None and not self._framed and not self._skip_body:
                    # A close-delimited body ends with the connection.
                    self._keep_alive = False
                    self._msg_done = True
                else:
                    detail = f": {exc}" if exc is not None else ""
                    self._error = errors.UpstreamReset(
                        f"upstream closed the connection mid-body{detail}"
                    )
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._msg_done:  # a second response in the same bytes: not ours to read
            raise errors.UpstreamProtocolError("upstream sent an unsolicited response")
        self._items = []
        self._reason = b""
        self._framed = False
        self._field_bytes = 0
        self._trailer_bytes = 0

    def on_status(self, status: bytes) -> None:
        reason = self._reason + status if self._reason else status
        if len(reason) > self._owner._max_line:
            raise errors.UpstreamProtocolError(
                f"upstream status line longer than {self._owner._max_line} bytes"
            )
        self._reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        owner = self._owner
        if self._head_done:  # a trailer field: bounded, then dropped
            self._trailer_bytes += len(name) + len(value)
            if self._trailer_bytes > owner._max_head:
                raise errors.UpstreamProtocolError("upstream trailer section too large")
            return
        if len(name) + len(value) > owner._max_field:
            raise errors.UpstreamProtocolError(
                f"upstream header field longer than {owner._max_field} bytes"
            )
        # Reads that complete the head are not counted in data_received: count the fields.
        self._field_bytes += len(name) + len(value) + 4
        if self._field_bytes > owner._max_head:
            raise errors.UpstreamProtocolError(
                f"upstream response head larger than {owner._max_head} bytes"
            )
        items = self._items
        if len(items) >= MAX_HEADERS:
            raise errors.UpstreamProtocolError(f"upstream sent more than {MAX_HEADERS} headers")
        n = len(name)
        if n == 14 or n == 17:
            lname = name.lower()
            if lname == b"content-length" or (
                lname == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked")
            ):
                self._framed = True
        items.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if not 100 <= status <= 599:  # RFC 9110 §15: three digits, classes 1xx to 5xx
            raise errors.UpstreamProtocolError(f"upstream status {status} is not 100-599")
        if status < 200:
            if status == 101:
                raise errors.UpstreamProtocolError("upstream switched protocols unasked")
            self._interim = True  # 100 Continue, 102, 103 Early Hints: skipped
            return
        # An answer before the whole request was written (an early 401/413/redirect) leaves
        # the rest of the body on the wire: the upstream may read those client-chosen bytes as
        # the start of its next request. Such a connection is never pooled again (as Envoy).
        self._keep_alive = parser.should_keep_alive() and self._write_done
        self._head_done = True
        self._timer_kind = _T_OFF
        self._resp = _Response(
            self,
            status,
            self._reason.decode("utf-8", "surrogateescape"),
            self._items,
            self._reused,
        )
        self._wake()
        if self._skip_body:
            raise _SkipBody

    def on_body(self, body: bytes) -> None:
        self._buf.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH_WATER and not self._reading_paused:
            transport = self._transport
            if transport is not None:
                transport.pause_reading()
                self._reading_paused = True
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._msg_done = True
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- timer ------------------------------------------------------------------------

    def _arm(self, kind: int, deadline: float) -> None:
        """Guard ``kind`` until ``deadline``. The timer handle is only replaced when it
        would fire too late; an early firing re-arms itself (no handle per request)."""
        self._timer_kind = kind
        self._deadline = deadline
        timer = self._timer
        if timer is None:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
        elif self._timer_at > deadline:
            timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        kind = self._timer_kind
        if kind == _T_OFF or self._closed:
            return
        deadline = self._deadline
        if self._loop.time() + _TIMER_SLACK < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
            return
        self._timer_kind = _T_OFF
        owner = self._owner
        if kind == _T_POOL:
            self._discard()
        elif kind == _T_HEAD:
            self._fail(
                errors.ResponseTimeout(f"upstream sent no response head within {owner._t_head:g}s")
            )
        elif kind == _T_READ:
            self._fail(
                errors.ResponseTimeout(f"upstream sent no body bytes for {owner._t_idle:g}s")
            )
        else:
            self._fail(
                errors.ResponseTimeout(
                    f"upstream accepted no request body bytes for {owner._t_idle:g}s"
                )
            )

    # -- state changes ----------------------------------------------------------------

    def _wake(self) -> None:
        for waiter in (self._head_waiter, self._read_waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _fail(self, err: errors.UpstreamError) -> None:
        """The exchange is broken: remember the first error, drop the connection."""
        if self._error is None:
            self._error = err
        self._discard()
        self._wake()

    def _discard(self) -> None:
        """Close the connection now and give its pool slot back."""
        self._closed = True
        transport = self._transport
        if transport is not None:
            transport.abort()
        self._owner._forget(self)

    def _resume_reading(self) -> None:
        self._reading_paused = False
        transport = self._transport
        if transport is not None:
            transport.resume_reading()

    def _finish(self, reuse: bool) -> None:
        """The response was released (``reuse``) or closed."""
        ctx = self._ssl_ctx
        if ctx is not None and self._msg_done and self._transport is not None:
            # The first complete exchange (TLS 1.3 tickets come after the handshake): keep
            # the session for the endpoint's next connection, pooled here or not.
            self._ssl_ctx = None
            obj = self._transport.get_extra_info("ssl_object")
            session = obj.session if obj is not None else None
            if session is not None:
                self._pool.session = (ctx, session)
        self._active = False
        self._resp = None
        task = self._pump_task
        if task is not None:
            self._pump_task = None
            if not task.done():
                task.cancel()
                reuse = False
        if (
            reuse
            and self._msg_done
            and self._write_done
            and self._keep_alive
            and self._error is None
            and not self._closed
            and not self._owner._closed
        ):
            if self._buf:
                self._buf.clear()
            self._buffered = 0
            if self._reading_paused:
                self._resume_reading()
            self._owner._park(self)
        else:
            self._discard()

    # -- one exchange -----------------------------------------------------------------

    async def exchange(
        self, head: bytes, body: AsyncIterable[bytes] | None, length: int, skip_body: bool
    ) -> _Response:
        self._active = True
        self._uses += 1
        self._reused = self._uses > 1
        self._resp = None
        self._head_done = False
        self._msg_done = False
        self._interim = False
        self._skip_body = skip_body
        self._sent = 0
        self._head_bytes = 0
        self._length = length
        self._remaining = length  # Content-Length bytes still to write
        self._timer_kind = _T_OFF  # the pool-idle guard is over
        transport = self._transport
        if self._closed or transport is None:
            self._active = False
            raise _stamp(
                errors.UpstreamReset("upstream closed the connection before the request"),
                0,
                self._reused,
            )
        try:
            if body is None:
                self._write_done = True
                transport.write(head)
                self._sent = len(head)
            else:
                self._write_done = False
                it = body.__aiter__()
                if await self._pump(it, head, True):
                    # A final response before the whole body: keep uploading alongside.
                    self._pump_task = self._loop.create_task(self._pump(it, None, False))
            if self._resp is None and self._error is None:
                self._arm(_T_HEAD, self._loop.time() + self._owner._t_head)
                waiter = self._head_waiter = self._loop.create_future()
                try:
                    await waiter
                finally:
                    self._head_waiter = None
                    if self._timer_kind == _T_HEAD:
                        self._timer_kind = _T_OFF
            resp = self._resp
            if resp is not None:
                return resp
            err = self._error
            if err is None:
                err = errors.UpstreamReset("upstream closed the connection before the head")
            raise _stamp(err, self._sent, self._reused)
        except BaseException:
            self._finish(False)
            raise

    async def _pump(self, it: AsyncIterator[bytes], head: bytes | None, inline: bool) -> bool:
        """Write the request body (and ``head`` with its first piece). Inline it returns
        True as soon as a final response head has arrived (the caller continues in a task);
        otherwise it runs to the end. Failures are recorded in ``_error``."""
        chunked = self._length == _CHUNKED
        try:
            while True:
                if self._error is not None or self._closed:
                    return False
                if inline and self._resp is not None:
                    if head is not None:  # nothing of the request went out yet
                        self._fail(
                            errors.UpstreamProtocolError(
                                "upstream answered before the request was sent"
                            )
                        )
                        return False
                    return True
                try:
                    chunk = await it.__anext__()
                except StopAsyncIteration:
                    break
                if self._error is not None or self._closed:
                    return False
                n = len(chunk)
                if not n:
                    continue
                if chunked:
                    size = b"%x\r\n" % n
                    if head is not None:
                        self._writelines((head, size, chunk, _CHUNK_END))
                        head = None
                    else:
                        self._writelines((size, chunk, _CHUNK_END))
                else:
                    if n > self._remaining:
                        self._fail(
                            errors.UpstreamError("request body longer than its Content-Length")
                        )
                        return False
                    self._remaining -= n
                    if head is not None:
                        self._writelines((head, chunk))
                        head = None
                    else:
                        self._write(chunk)
                if self._write_paused:
                    await self._drain(inline)
            if self._error is not None or self._closed:
                return False
            if chunked:
                self._writelines((head, _LAST_CHUNK) if head is not None else (_LAST_CHUNK,))
            elif self._remaining:
                self._fail(errors.UpstreamError("request body shorter than its Content-Length"))
                return False
            elif head is not None:
                self._write(head)
            self._write_done = True
            return False
        except Exception as exc:
            err = errors.UpstreamError(f"request body failed: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            self._fail(err)
            return False

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None:
            transport.write(data)
            self._sent += len(data)

    def _writelines(self, parts: tuple[bytes, ...]) -> None:
        transport = self._transport
        if transport is not None:
            transport.writelines(parts)
            self._sent += sum(map(len, parts))

    async def _drain(self, inline: bool) -> None:
        """Wait until the transport wants more bytes. Inline (nothing else guards the
        connection) a stall longer than ``timeouts.idle`` fails the exchange."""
        loop = self._loop
        while self._write_paused and not self._closed and self._error is None:
            if inline:
                if self._resp is not None:
                    return
                self._arm(_T_WRITE, loop.time() + self._owner._t_idle)
            waiter = self._drain_waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._drain_waiter = None
                if inline and self._timer_kind == _T_WRITE:
                    self._timer_kind = _T_OFF


def _request_head(
    method: str,
    target: str,
    headers: CIMultiDict[str],
    host_line: str,
    has_body: bool,
) -> tuple[bytes, int]:
    """The request head as bytes, and the body framing (``_NO_BODY``, ``_CHUNKED`` or the
    declared Content-Length)."""
    parts = [method, " ", target, _HTTP11]
    lines = len(headers) + 2
    if "Host" not in headers:
        parts.append(host_line)
        lines += 1
    declared = headers.get("Content-Length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise errors.BadRequest(f"invalid Content-Length {declared[:40]!r}")
        if has_body:
            length = int(declared)
        elif declared.strip("0"):
            raise errors.BadRequest("Content-Length announced without a body")
        else:
            length = _NO_BODY
    else:
        length = _CHUNKED if has_body else _NO_BODY
    if "Transfer-Encoding" in headers:  # framing is ours to choose
        headers = headers.copy()
        lines -= len(headers.popall("Transfer-Encoding"))
    for name, value in headers.items():
        parts += (name, ": ", value, "\r\n")
    if length == _CHUNKED:
        parts.append(_TE_CHUNKED)
        lines += 1
    parts.append("\r\n")
    text = "".join(parts)
    if text.count("\n") != lines or text.count("\r") != lines:
        raise errors.BadRequest("line break in the request target or a header")
    return text.encode("utf-8", "surrogateescape"), length


class H1Transport:
    """Pooled HTTP/1.1 keep-alive client for one cluster (see the module docstring)."""

    def __init__(
        self,
        cluster: cfg.Cluster,
        limits: cfg.Listen,
        *,
        pool_idle_timeout: float = POOL_IDLE_TIMEOUT,
        max_head_bytes: int | None = None,
        tls: tls_mod.Rotating | None = None,
    ) -> None:
        timeouts = cluster.timeouts
        self._tls = tls
        self._server_name = cluster.tls.server_name if cluster.tls is not None else None
        self._t_connect = timeouts.connect
        self._t_head = timeouts.response_headers
        self._t_idle = timeouts.idle
        self._max_conns = cluster.max_connections
        self._max_line = limits.max_line_size
        self._max_field = limits.max_field_size
        self._max_head = (
            max_head_bytes
            if max_head_bytes is not None
            else max(MAX_HEAD_BYTES, self._max_line + self._max_field + 4096)
        )
        self._pool_idle = pool_idle_timeout
        self._pools: dict[str, _Pool] = {}
        self._conns: set[_Conn] = set()
        self._open = 0  # connections holding a slot: connecting, busy or idle
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections currently holding a pool slot (connecting, busy or idle)."""
        return self._open

    def idle_connections(self, endpoint: Endpoint) -> int:
        pool = self._pools.get(endpoint.url)
        return len(pool.idle) if pool is not None else 0

    def tls_for(self, endpoint: Endpoint) -> tuple[ssl.SSLContext | None, str | None]:
        """What a connection to ``endpoint`` opened outside the pool (an upgrade,
        ``tunnel.open_upgrade``) uses: the cluster's current TLS context (None for
        ``http://``) and the SNI / verified name (None without TLS)."""
        if self._tls is None:
            return None, None
        return self._tls.context, self._server_name or endpoint.host

    async def send(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
    ) -> _Response:
        pool = self._pools.get(endpoint.url)
        if pool is None:
            pool = self._pools[endpoint.url] = _Pool(endpoint, self._server_name)
        head, length = _request_head(method, target, headers, pool.host_line, body is not None)
        idle = pool.idle
        if idle and not self._closed and not idle[-1]._closed:
            conn = idle.pop()
            conn._idle = False
        else:
            conn = await self._acquire(pool)
        return await conn.exchange(head, body, length, method == "HEAD")

    async def close(self) -> None:
        """Close every connection, idle or busy; later sends fail with ConnectFailed."""
        self._closed = True
        for conn in list(self._conns):
            conn._discard()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # -- pool -------------------------------------------------------------------------

    async def _acquire(self, pool: _Pool) -> _Conn:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._t_connect
        while True:
            if self._closed:
                raise _stamp(errors.ConnectFailed("upstream transport is closed"), 0, False)
            idle = pool.idle
            while idle:
                conn = idle.pop()
                conn._idle = False
                if not conn._closed:
                    return conn
            if self._open < self._max_conns or self._evict_idle():
                return await self._connect(pool, loop)
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken and timed out in one iteration: pass it on
                raise _stamp(
                    errors.ConnectTimeout(
                        f"no upstream connection free within {self._t_connect:g}s "
                        f"(max_connections {self._max_conns})"
                    ),
                    0,
                    False,
                ) from None
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the wake-up on
                raise

    async def _connect(self, pool: _Pool, loop: asyncio.AbstractEventLoop) -> _Conn:
        self._open += 1
        tls = self._tls
        ctx: ssl.SSLContext | None = None
        try:
            async with asyncio.timeout(self._t_connect):
                if tls is None:
                    _, conn = await loop.create_connection(
                        lambda: _Conn(self, pool, loop), pool.host, pool.port
                    )
                else:
                    ctx = tls.context
                    saved = pool.session
                    session = saved[1] if saved is not None and saved[0] is ctx else None
                    _, conn = await loop.create_connection(
                        lambda: _Conn(self, pool, loop),
                        pool.host,
                        pool.port,
                        ssl=tls_mod.connect_context(ctx, session),
                        server_hostname=pool.server_name,
                        ssl_handshake_timeout=self._t_connect,
                    )
                    conn._ssl_ctx = ctx
        except BaseException as exc:
            self._release_slot()
            mapped = map_connect_error(
                exc, pool.url, over_tls=tls is not None, timeout=self._t_connect
            )
            if mapped is None:
                raise
            raise _stamp(mapped, 0, False) from exc
        conn._counted = True
        if conn._closed:  # lost between connecting and now
            conn._counted = False
            self._release_slot()
            raise _stamp(
                errors.ConnectFailed(f"upstream {pool.url} closed the connection at once"),
                0,
                False,
            )
        self._conns.add(conn)
        return conn

    def _release_slot(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _evict_idle(self) -> bool:
        """Close the oldest idle connection of any endpoint to free a slot."""
        for pool in self._pools.values():
            if pool.idle:
                victim = pool.idle.popleft()
                victim._idle = False
                victim._discard()
                return True
        return False

    def _park(self, conn: _Conn) -> None:
        conn._idle = True
        conn._pool.idle.append(conn)
        conn._arm(_T_POOL, conn._loop.time() + self._pool_idle)
        if self._waiters:
            self._wake_one()

    def _forget(self, conn: _Conn) -> None:
        """``conn`` is closed: free its slot (once)."""
        if conn._idle:
            conn._idle = False
            with contextlib.suppress(ValueError):
                conn._pool.idle.remove(conn)
        if conn._counted:
            conn._counted = False
            self._conns.discard(conn)
            self._release_slot()
