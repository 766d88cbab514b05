"""Upgraded connections (WebSocket and other ``Upgrade`` protocols) as a byte tunnel.

After the upstream's validated ``101 Switching Protocols`` Jalur stops speaking HTTP on
that connection: the bytes of both sockets are copied as they come, in both directions,
with flow control, half-close, an idle timeout and an optional byte limit. Nothing is
re-framed: WebSocket frames, masks, pings, pongs, close frames and extensions
(``permessage-deflate``) pass untouched, negotiated end to end between client and upstream
(the client's ``Sec-WebSocket-Key`` goes upstream, so the upstream's
``Sec-WebSocket-Accept`` is the right answer for the client too).

API (two calls; the handler owns routing, policy, header filtering and reporting)::

    up = await tunnel.open_upgrade(
        endpoint, ssl_context, server_hostname, target, headers,   # headers: (name, value)
        connect_timeout=t.connect, head_timeout=t.response_headers,
        max_head_bytes=MAX_HEAD_BYTES,
    )                                        # raises errors.ProxyError (see Errors)
    if not up.upgraded:                      # the upstream refused: an ordinary answer,
        relay(up.status, up.reason, up.headers, up.body)      # body already read (bounded)
    else:
        write_101(client_transport, up.headers)   # filtered by the handler, see below
        result = await tunnel.splice(client_transport, client_leftover, up,
                                     idle_timeout=u.idle_timeout, max_bytes=u.max_bytes)
        report(result.reason, result.flag, result.client_bytes, result.upstream_bytes)

``open_upgrade`` connects (plain, or TLS with the cluster's context: ``ssl_context`` is
``tls.for_cluster(...).context``, ``server_hostname`` the SNI and verified name), sends
``GET target HTTP/1.1`` with ``headers`` as given -- they must hold the client's
``Upgrade`` (one or more tokens) and, for ``websocket``, its ``Sec-WebSocket-Key``,
``-Version``, ``-Protocol`` and ``-Extensions``; any ``Connection`` field is replaced by
``Connection: Upgrade``; ``Host`` is the endpoint's when absent; a request announcing a
body is refused -- and reads the response head with llhttp (``httptools``), skipping
interim ``1xx`` answers.

A ``101`` is accepted only when: its ``Upgrade`` names exactly one of the tokens asked;
its ``Connection`` lists ``upgrade``; for ``websocket``, ``Sec-WebSocket-Accept`` equals
base64(SHA-1(key + RFC 6455 GUID)) and a ``Sec-WebSocket-Protocol`` (at most one) is one the
client offered. Anything else raises ``errors.InvalidUpgrade`` (502, flag UPE, kind
``upgrade``) and the connection is closed. ``h2c`` is refused before connecting
(``BadRequest``): an HTTP/2 tunnel would carry further requests past routing and the
boundary checks.

The upstream answering anything else (a ``403``, a ``404``, a redirect) is *returned*,
not raised: ``up.upgraded`` is False, ``up.body`` holds its whole body (Content-Length,
chunked or close-delimited; at most ``max_body_bytes``, 64 KiB by default, beyond which
it is an ``UpstreamProtocolError``) and the connection is already closed. The handler
relays it like any answer (it is what the upstream said, as Envoy does), and counts it
under its status.

``up.headers`` is the response head as (name, value) pairs, duplicates and order kept,
for the handler to filter: it must send ``Connection: Upgrade`` and ``Upgrade`` itself
(hop-by-hop fields are its business) and should relay ``Sec-WebSocket-Accept``,
``-Protocol`` and ``-Extensions`` unchanged. ``up.close()`` drops an upgraded connection
that is not spliced (the client went away meanwhile).

``splice(client, client_leftover, up, ...)`` takes both transports over with
``transport.set_protocol`` (asyncio and uvloop, plain and TLS transports), first writes
``client_leftover`` (bytes the listener read after the client's request head) upstream and
the upstream's own leftover (bytes after its ``101`` head) to the client, and returns a
``SpliceResult`` once both connections are closed. The listener must not read from or
write to ``client`` after handing it over, and must not close it. Cancelling ``splice``
aborts both connections.

Wiring (for the request handler and the listener)
    ``headers``: the request's end-to-end fields after the boundary scrub, *keeping*
    ``Upgrade`` and every ``Sec-WebSocket-*`` field (today's aiohttp path drops the key,
    version and extensions because its client makes its own). ``ssl_context,
    server_hostname = cluster.transport.tls_for(endpoint)`` (``H1Transport``): the
    cluster's current TLS context and name, as its pooled connections use them. Timeouts:
    ``cluster.timeouts.connect`` and ``.response_headers``; ``idle_timeout`` and
    ``max_bytes``: ``cluster.upgrade``. ``(client, client_leftover)``: what the listener's
    ``Request.detach()`` returns after the ``101`` was written (llhttp's
    ``HttpParserUpgrade(offset)`` marks where the leftover starts; reading is paused and
    ``splice`` resumes it). Drain: cancel the ``splice`` tasks still running when
    ``drain.timeout`` ends (both connections are aborted).

Behaviour of the tunnel
-----------------------
Flow control
    Each transport's write buffer has a high-water mark of ``HIGH_WATER`` bytes. When the
    side being written to is over it (``pause_writing``), the other side's reading is
    paused until it drained below a quarter of it (``resume_writing``): a client that stops
    reading stops the upstream being read, so a tunnel holds at most ``HIGH_WATER`` plus
    one socket read per direction (over TLS, plus the TLS layer's own bounded read
    buffer), whatever the upstream sends. A side whose reading is paused is not watched:
    its reset is seen at the next write to it or at the idle timeout.
Half-close
    A side's EOF becomes ``write_eof`` on the other side when its transport supports it
    (plain TCP); bytes still flow the other way until that side ends too. Transports
    without half-close (TLS) are closed instead, after their buffered bytes are written.
Closing
    When one side is closed or reset, the other is closed once it has written what it
    buffered; a side that does not take those bytes within ``CLOSE_TIMEOUT`` (or the idle
    timeout, if shorter) is aborted.
Idle timeout
    No byte in either direction for ``idle_timeout`` seconds: both connections are
    aborted (``idle_timeout``). One timer handle per tunnel, re-armed only when it fires
    early (each chunk only stores the loop time).
Byte limit
    ``max_bytes`` (None: none) bounds the bytes of both directions together, leftovers
    included; the chunk that would cross it is not forwarded and both connections are
    aborted (``limit``).
Result
    ``reason`` is what ended the tunnel first: ``closed_by_client`` /
    ``closed_by_upstream`` (an EOF or orderly close), ``idle_timeout``, ``limit``, or
    ``error`` (a connection reset or failed; ``error_side`` and ``error`` say which and
    how, for the log). ``client_bytes`` went client to upstream, ``upstream_bytes``
    upstream to client; ``flag`` is Envoy's response flag for the access log (``SI``,
    ``UC``, ``DC`` or ``-``).

Errors (``open_upgrade``; mapped here, at this one boundary)
    connect refused / unreachable / timed out / TLS handshake or verification:
    ``upstream.map_connect_error`` (``ConnectRefused``, ``ConnectFailed``,
    ``ConnectTimeout``, ``TlsHandshakeFailed``, ``TlsVerifyFailed``) as for every other
    request; no complete head within ``head_timeout`` after the request was written:
    ``ResponseTimeout``; closed or reset before the head: ``UpstreamReset`` (a TLS alert:
    its TLS error); malformed head, or a head over ``max_head_bytes``:
    ``UpstreamProtocolError``; an invalid ``101``: ``InvalidUpgrade``; a request header or
    target holding CR, LF or NUL, a WebSocket upgrade without a valid key: ``BadRequest``;
    ``h2c``, or an upgrade request with a body (``Transfer-Encoding``, a ``Content-Length``
    other than 0): ``BadRequest`` with reason ``upgrade_refused`` (nothing connected).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, cast

import httptools

from . import errors, tls
from .upstream import map_connect_error

if TYPE_CHECKING:
    from .upstream import Endpoint

__all__ = [
    "CLOSE_TIMEOUT",
    "HIGH_WATER",
    "MAX_BODY_BYTES",
    "Reason",
    "SpliceResult",
    "Upgraded",
    "open_upgrade",
    "splice",
]

# Write-buffer high-water mark of each tunnelled transport: what one direction of a tunnel
# may hold in memory (plus one socket read) when its reader is slower than its writer.
HIGH_WATER: Final = 64 * 1024
# Seconds a closing tunnel may spend writing what it buffered towards a side that does not
# read it; then that side is aborted (a dead peer cannot pin the buffer for the idle timeout).
CLOSE_TIMEOUT: Final = 10.0
# Largest body of a refused upgrade (a 403 page) read and returned to be relayed: a refusal
# is small; a bigger one is an upstream error rather than memory held per refused client.
MAX_BODY_BYTES: Final = 64 * 1024
# Most header fields in the upstream's answer (as ``h1transport.MAX_HEADERS``).
MAX_HEADERS: Final = 128
# RFC 6455 §1.3: appended to the key before hashing.
WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# A header name, value or target without CR, LF or NUL (the bytes that could split a head).
_SAFE: Final = re.compile(r"[^\r\n\0]*").fullmatch
# A timer may fire up to a clock tick early; within this it counts as expired.
_TIMER_SLACK: Final = 0.001

Reason = Literal["closed_by_client", "closed_by_upstream", "idle_timeout", "limit", "error"]


# -- the handshake ---------------------------------------------------------------------------


class _Handshake(asyncio.Protocol):
    """Reads the upstream's answer to the upgrade request; after a ``101`` it holds the
    connection (reading paused) until ``splice`` takes it over."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_head: int, max_body: int) -> None:
        self.loop = loop
        self.max_head = max_head
        self.max_body = max_body
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] = loop.create_future()
        self.status = 0
        self.reason = b""
        self.items: list[tuple[str, str]] = []
        self.field_bytes = 0
        self.head_bytes = 0  # raw bytes read while the head was incomplete
        self.interim = False
        self.head_done = False  # a final (or 101) head is complete
        self.framed = False  # the final answer's body has Content-Length / chunked
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.done = False  # 101 seen, or the refusal's body complete
        self.upgraded = False
        self.after: list[bytes] = []  # bytes after the 101 head, until splice
        self.eof = False
        self.lost = False
        self.lost_exc: Exception | None = None
        self.error: errors.UpstreamError | None = None
        self.over_tls = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is only alike

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            self.after.append(data)  # reading is paused: at most one read lands here
            return
        if self.done or self.error is not None:
            return
        if not self.head_done:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._switched(data[offset:])
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, errors.UpstreamError):
                self._fail(cause)
            else:
                self._fail(errors.UpstreamProtocolError(f"invalid upstream response: {exc}"))
            return
        except httptools.HttpParserError as exc:
            if self.status == 101 and self.head_done:
                # llhttp pauses on any 101, with or without ``Connection: upgrade``; the
                # validation of the head says what is wrong with it.
                self._switched(b"")
            else:
                self._fail(errors.UpstreamProtocolError(f"invalid upstream response: {exc}"))
            return
        if not self.head_done and self.head_bytes > self.max_head:
            self._fail(
                errors.UpstreamProtocolError(
                    f"upstream response head larger than {self.max_head} bytes"
                )
            )

    def eof_received(self) -> bool | None:
        self.eof = True
        return None  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        self.transport = None
        if self.done or self.error is not None:
            return
        if self.head_done and not self.framed and exc is None:
            self._finish()  # a close-delimited refusal body ends with the connection
            return
        mapped = tls.map_error(exc) if exc is not None and self.over_tls else None
        if mapped is None and self.over_tls and not self.head_bytes:
            mapped = errors.TlsHandshakeFailed(
                "the upstream closed the new TLS connection without answering "
                "(did it refuse the client certificate?)"
            )
        detail = f": {exc}" if exc is not None else ""
        self._fail(
            mapped
            or errors.UpstreamReset(f"upstream closed the connection before its answer{detail}")
        )

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.items = []
        self.reason = b""
        self.field_bytes = 0

    def on_status(self, status: bytes) -> None:
        self.reason += status
        if len(self.reason) > self.max_head:
            raise errors.UpstreamProtocolError("upstream status line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:  # a trailer of a chunked refusal: dropped
            return
        self.field_bytes += len(name) + len(value) + 4
        if self.field_bytes > self.max_head:
            raise errors.UpstreamProtocolError(
                f"upstream response head larger than {self.max_head} bytes"
            )
        if len(self.items) >= MAX_HEADERS:
            raise errors.UpstreamProtocolError(f"upstream sent more than {MAX_HEADERS} headers")
        lname = name.lower()
        if lname == b"content-length" or lname == b"transfer-encoding":
            self.framed = True
        self.items.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:
            raise errors.UpstreamProtocolError(f"upstream status {status} is not 100-599")
        if 100 <= status < 200 and status != 101:
            self.interim = True  # 100 Continue, 103 Early Hints: skipped
            return
        self.status = status
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > self.max_body:
            raise errors.UpstreamProtocolError(
                f"upstream refused the upgrade with a body over {self.max_body} bytes"
            )
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.status != 101:
            self._finish()
        # a 101 is complete at its head; llhttp pauses right after (HttpParserUpgrade)

    # state

    def _switched(self, rest: bytes) -> None:
        self.upgraded = True
        if rest:
            self.after.append(rest)
        transport = self.transport
        if transport is not None:
            transport.pause_reading()  # until splice: bounded to what one read gave
        self._finish()

    def _finish(self) -> None:
        self.done = True
        if not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, err: errors.UpstreamError) -> None:
        if self.error is None:
            self.error = err
        transport = self.transport
        if transport is not None:
            transport.abort()
        if not self.waiter.done():
            self.waiter.set_result(None)


class Upgraded:
    """The upstream's answer to an upgrade request (see the module docstring)."""

    __slots__ = ("_hs", "body", "headers", "protocol", "reason", "status", "transport")

    def __init__(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        body: bytes,
        transport: asyncio.Transport | None,
        protocol: str | None,
        hs: _Handshake,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # as sent, duplicates and order kept
        self.body = body  # a refusal's whole body; b"" after a 101
        self.transport = transport  # the upgraded connection; None when refused
        self.protocol = protocol  # the WebSocket subprotocol the upstream chose, if any
        self._hs = hs

    @property
    def upgraded(self) -> bool:
        return self.transport is not None

    @property
    def leftover(self) -> bytes:
        """Bytes the upstream sent after its ``101`` head (its first frames)."""
        return b"".join(self._hs.after)

    def close(self) -> None:
        """Drop an upgraded connection that will not be spliced."""
        transport = self.transport
        if transport is not None:
            transport.abort()


def _tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",") if t.strip()]


def _request(
    endpoint: Endpoint, target: str, headers: Iterable[tuple[str, str]]
) -> tuple[bytes, list[str], str | None, list[str]]:
    """The request head, and what the answer is checked against: the upgrade tokens asked,
    the WebSocket key and the subprotocols offered."""
    if not _SAFE(target):
        raise errors.BadRequest("line break or NUL in the request target")
    parts = ["GET ", target, " HTTP/1.1\r\n"]
    asked: list[str] = []
    key: str | None = None
    offered: list[str] = []
    host = False
    for name, value in headers:
        if not (_SAFE(name) and _SAFE(value)):
            raise errors.BadRequest("line break or NUL in a request header")
        lname = name.lower()
        if lname == "connection":
            continue  # replaced: only the upgrade is asked for, no other hop-by-hop name
        if lname == "upgrade":
            asked += _tokens(value)
        elif lname == "sec-websocket-key":
            key = value.strip()
        elif lname == "sec-websocket-protocol":
            offered += [t.strip() for t in value.split(",") if t.strip()]
        elif lname == "host":
            host = True
        elif lname == "transfer-encoding" or lname == "content-length":
            if lname == "content-length" and value.strip() == "0":
                continue  # no body: nothing to announce
            # Body bytes would reach the upstream only after its 101, as tunnel bytes: what
            # the upstream took for a body could be the client's next request (smuggling).
            raise errors.BadRequest("an upgrade request with a body", reason="upgrade_refused")
        parts += (name, ": ", value, "\r\n")
    if not host:
        h = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        parts.append(f"Host: {h}:{endpoint.port}\r\n")
    parts.append("Connection: Upgrade\r\n\r\n")
    if not asked:
        raise errors.BadRequest("an upgrade request without an Upgrade header")
    if "h2c" in asked:
        raise errors.BadRequest("h2c upgrades are not proxied", reason="upgrade_refused")
    if "websocket" in asked:
        try:
            raw = base64.b64decode(key or "", validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) != 16:
            raise errors.BadRequest("a WebSocket upgrade without a valid Sec-WebSocket-Key")
    return "".join(parts).encode("utf-8", "surrogateescape"), asked, key, offered


def _check_101(
    items: list[tuple[str, str]], asked: list[str], key: str | None, offered: list[str]
) -> str | None:
    """Raise ``InvalidUpgrade`` unless the ``101`` answers what was asked; the chosen
    WebSocket subprotocol."""
    upgrade = [v for n, v in items if n.lower() == "upgrade"]
    chosen = _tokens(upgrade[0]) if len(upgrade) == 1 else []
    if len(chosen) != 1 or chosen[0] not in asked:
        raise errors.InvalidUpgrade(f"upstream switched to {upgrade!r}, asked {asked!r}")
    connection = [t for n, v in items if n.lower() == "connection" for t in _tokens(v)]
    if "upgrade" not in connection:
        raise errors.InvalidUpgrade("upstream 101 without Connection: upgrade")
    if chosen[0] != "websocket":
        return None
    assert key is not None  # checked by _request
    expected = base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode()
    accept = [v.strip() for n, v in items if n.lower() == "sec-websocket-accept"]
    if accept != [expected]:
        raise errors.InvalidUpgrade("upstream 101 with a wrong Sec-WebSocket-Accept")
    protocols = [v.strip() for n, v in items if n.lower() == "sec-websocket-protocol"]
    if not protocols:
        return None
    if len(protocols) != 1 or protocols[0] not in offered:
        raise errors.InvalidUpgrade(f"upstream chose subprotocol {protocols!r}, not offered")
    return protocols[0]


async def open_upgrade(
    endpoint: Endpoint,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    target: str,
    headers: Iterable[tuple[str, str]],
    *,
    connect_timeout: float,
    head_timeout: float,
    max_head_bytes: int,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Upgraded:
    """Ask ``endpoint`` to switch protocols (see the module docstring)."""
    head, asked, key, offered = _request(endpoint, target, headers)
    loop = asyncio.get_running_loop()
    hs = _Handshake(loop, max_head_bytes, max_body_bytes)
    over_tls = hs.over_tls = ssl_context is not None
    try:
        async with asyncio.timeout(connect_timeout):
            if ssl_context is None:
                transport, _ = await loop.create_connection(
                    lambda: hs, endpoint.host, endpoint.port
                )
            else:
                transport, _ = await loop.create_connection(
                    lambda: hs,
                    endpoint.host,
                    endpoint.port,
                    ssl=ssl_context,
                    server_hostname=server_hostname or endpoint.host,
                    ssl_handshake_timeout=connect_timeout,
                )
    except Exception as exc:
        mapped = map_connect_error(exc, endpoint.url, over_tls=over_tls, timeout=connect_timeout)
        if mapped is None:
            raise
        raise mapped from exc
    try:
        if hs.error is None and not hs.lost:
            transport.write(head)
        try:
            async with asyncio.timeout(head_timeout):
                await hs.waiter
        except TimeoutError:
            raise errors.ResponseTimeout(
                f"upstream sent no answer to the upgrade within {head_timeout:g}s"
            ) from None
        if hs.error is not None:
            raise hs.error
        if not hs.done:  # lost with no error recorded: cannot happen, but never hang
            raise errors.UpstreamReset("upstream closed the connection before its answer")
        reason = hs.reason.decode("utf-8", "surrogateescape")
        if not hs.upgraded:
            transport.close()
            return Upgraded(hs.status, reason, hs.items, b"".join(hs.body), None, None, hs)
        protocol = _check_101(hs.items, asked, key, offered)
        return Upgraded(101, reason, hs.items, b"", transport, protocol, hs)
    except BaseException:
        transport.abort()
        raise


# -- the tunnel ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpliceResult:
    reason: Reason  # what ended the tunnel first
    client_bytes: int  # client -> upstream, the client's leftover included
    upstream_bytes: int  # upstream -> client, the upstream's leftover included
    duration: float  # seconds from the takeover until both connections were closed
    error_side: Literal["client", "upstream"] | None = None  # for reason "error"
    error: str | None = None  # what failed, for the log only (may name an errno)

    @property
    def flag(self) -> str:
        """Envoy's response flag for the access log: ``SI`` idle timeout, ``UC`` upstream
        reset, ``DC`` client reset, ``-`` otherwise (an orderly close, the byte limit)."""
        if self.reason == "idle_timeout":
            return "SI"
        if self.reason == "error":
            return "DC" if self.error_side == "client" else "UC"
        return "-"


class _Side(asyncio.Protocol):
    """One connection of a tunnel: what it reads is written to ``peer``."""

    __slots__ = (
        "bytes",
        "closed",
        "eof",
        "name",
        "paused",
        "peer",
        "shut",
        "transport",
        "tunnel",
        "wrote_eof",
    )

    def __init__(self, tunnel: _Tunnel, transport: asyncio.Transport, name: str) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.name = name
        self.peer: _Side = self
        self.bytes = 0  # read from this side (and written to the peer)
        self.closed = False  # connection_lost seen (or known to have happened)
        self.eof = False  # this side sent EOF
        self.wrote_eof = False  # we sent EOF to this side
        self.shut = False  # close() or abort() called: write nothing more
        self.paused = False  # this side's write buffer is over its high-water mark

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel.aborted:
            return
        n = len(data)
        limit = tunnel.limit
        if limit is not None and tunnel.total + n > limit:
            tunnel.end("limit", abort=True)
            return
        tunnel.total += n
        self.bytes += n
        tunnel.last = tunnel.loop.time()
        peer = self.peer
        if not (peer.shut or peer.wrote_eof or peer.closed):
            peer.transport.write(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        tunnel = self.tunnel
        tunnel.first(self.closer)
        peer = self.peer
        if not (peer.closed or peer.shut):
            if peer.transport.can_write_eof():
                peer.wrote_eof = True
                peer.transport.write_eof()
                if peer.eof:  # both directions done
                    peer.close()
            else:
                peer.close()
        # Stay open for the other direction only while the peer is half-open and this
        # transport can be (a TLS transport closes itself at EOF whatever we return).
        keep = (
            peer.wrote_eof
            and not peer.shut
            and not self.wrote_eof
            and self.transport.can_write_eof()
        )
        if keep:
            return True
        self.shut = True
        tunnel.closing()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = self.shut = True
        tunnel = self.tunnel
        if exc is not None:
            tunnel.fail(self, exc)
        else:
            tunnel.first(self.closer)
        peer = self.peer
        if not peer.closed and not peer.shut:
            peer.close()
        if peer.closed:
            tunnel.finished()

    def pause_writing(self) -> None:
        self.paused = True
        peer = self.peer
        if not peer.closed and not peer.shut:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        peer = self.peer
        if not peer.closed and not peer.shut and not peer.eof:
            peer.transport.resume_reading()

    @property
    def closer(self) -> Reason:
        return "closed_by_client" if self.name == "client" else "closed_by_upstream"

    def close(self) -> None:
        """Close after the buffered bytes are written (bounded by the closing timer)."""
        if not self.shut:
            self.shut = True
            self.transport.close()
        self.tunnel.closing()


class _Tunnel:
    __slots__ = (
        "aborted",
        "client",
        "close_at",
        "done",
        "error",
        "error_side",
        "idle",
        "last",
        "limit",
        "loop",
        "reason",
        "timer",
        "timer_at",
        "total",
        "upstream",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, idle: float, limit: int | None) -> None:
        self.loop = loop
        self.idle = idle
        self.limit = limit
        self.total = 0
        self.last = loop.time()
        self.reason: Reason | None = None
        self.error: str | None = None
        self.error_side: Literal["client", "upstream"] | None = None
        self.aborted = False
        self.close_at: float | None = None  # set once the tunnel is closing
        self.done: asyncio.Future[None] = loop.create_future()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.client: _Side
        self.upstream: _Side

    def first(self, reason: Reason) -> None:
        if self.reason is None:
            self.reason = reason

    def fail(self, side: _Side, exc: BaseException) -> None:
        if self.reason is None:
            self.reason = "error"
            self.error_side = "client" if side.name == "client" else "upstream"
            self.error = f"{type(exc).__name__}: {exc}"

    def end(self, reason: Reason, abort: bool) -> None:
        self.first(reason)
        if abort:
            self.abort()

    def abort(self) -> None:
        self.aborted = True
        for side in (self.client, self.upstream):
            if not side.closed:
                side.shut = True
                side.transport.abort()

    def closing(self) -> None:
        """Bound how long the rest may take to flush."""
        if self.close_at is None:
            self.close_at = self.loop.time() + min(self.idle, CLOSE_TIMEOUT)
            self.arm()

    def finished(self) -> None:
        timer = self.timer
        if timer is not None:
            timer.cancel()
            self.timer = None
        if not self.done.done():
            self.done.set_result(None)

    def deadline(self) -> float:
        close_at = self.close_at
        idle_at = self.last + self.idle
        return idle_at if close_at is None else min(close_at, idle_at)

    def arm(self) -> None:
        deadline = self.deadline()
        timer = self.timer
        if timer is None or self.timer_at > deadline:
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(deadline, self.on_timer)
            self.timer_at = deadline

    def on_timer(self) -> None:
        self.timer = None
        if self.done.done():
            return
        deadline = self.deadline()
        if self.loop.time() + _TIMER_SLACK < deadline:
            self.timer = self.loop.call_at(deadline, self.on_timer)
            self.timer_at = deadline
            return
        self.first("idle_timeout")  # a closing tunnel has its reason already
        self.abort()


async def splice(
    client: asyncio.Transport,
    client_leftover: bytes,
    up: Upgraded,
    *,
    idle_timeout: float,
    max_bytes: int | None,
) -> SpliceResult:
    """Tunnel bytes between ``client`` and the upgraded upstream connection until both are
    closed (see the module docstring)."""
    upstream = up.transport
    if upstream is None:
        raise ValueError("splice needs an upgraded connection (status 101)")
    loop = asyncio.get_running_loop()
    start = loop.time()
    tunnel = _Tunnel(loop, idle_timeout, max_bytes)
    c = tunnel.client = _Side(tunnel, client, "client")
    u = tunnel.upstream = _Side(tunnel, upstream, "upstream")
    c.peer, u.peer = u, c
    hs = up._hs
    for side in (c, u):
        transport = side.transport
        transport.set_protocol(side)
        transport.set_write_buffer_limits(high=HIGH_WATER)
        side.paused = transport.get_write_buffer_size() > HIGH_WATER
    tunnel.arm()
    try:
        # What each side sent before the takeover, then its state at that moment.
        for side, data in ((c, client_leftover), (u, up.leftover)):
            if data:
                side.data_received(data)
        if hs.lost:
            u.connection_lost(hs.lost_exc)
        elif hs.eof:
            u.eof_received()
        if client.is_closing() and not c.closed:
            c.connection_lost(None)  # the listener saw it go; no callback will follow
        for side in (c, u):
            idle = not (side.closed or side.shut or side.eof or side.peer.paused)
            if idle and not side.transport.is_reading():
                side.transport.resume_reading()
        await asyncio.shield(tunnel.done)
    except BaseException:
        tunnel.first("error")
        tunnel.abort()
        tunnel.finished()
        raise
    reason = tunnel.reason or "error"
    return SpliceResult(
        reason=reason,
        client_bytes=c.bytes,
        upstream_bytes=u.bytes,
        duration=loop.time() - start,
        error_side=tunnel.error_side,
        error=tunnel.error,
    )
