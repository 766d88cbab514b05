"""Upgraded connections as a byte tunnel (``proxy.tunnel``), on real loopback sockets.

The upstream is a real WebSocket server (aiohttp's ``WebSocketResponse``) or a raw one
written here for what a real one would not do; TLS upstreams use ``trustme``
certificates and the cluster context of ``tls.for_cluster``. The client side is exactly
how the listener hands over: a tiny asyncio server whose protocol reads the request head,
calls ``open_upgrade``, writes the ``101`` itself and hands its transport to ``splice``.
Every test runs on asyncio's and uvloop's loops (``run``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy import config as cfg
from proxy import errors, tls
from proxy import tunnel as tn
from proxy.h1transport import H1Transport
from proxy.upstream import Endpoint

from .conftest import (
    Harness,
    RawUpstream,
    Runner,
    build_config,
    cluster,
    free_port,
    one_route,
    raw_upstream,
    until,
)

NAME = "live.internal"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MiB = 1024 * 1024
FLOOD_MESSAGE = 64 * 1024


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


# -- a real WebSocket upstream ---------------------------------------------------------------


@dataclass
class Upstream:
    runner: web.AppRunner
    port: int
    scheme: str = "http"
    events: list[Any] = field(default_factory=list)
    sent: list[int] = field(default_factory=lambda: [0])
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint.parse(f"{self.scheme}://127.0.0.1:{self.port}")


async def start_upstream(ctx: ssl.SSLContext | None = None) -> Upstream:
    holder: list[Upstream] = []

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0, protocols=("chat",))
        await ws.prepare(request)
        up = holder[0]
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
            up.events.append(("closed", ws.close_code))
        finally:
            up.closed.set()
        return ws

    async def ping(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        up = holder[0]
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.PING:
                up.events.append(("ping", msg.data))
                await ws.pong(msg.data)
                await ws.ping(b"from-upstream\x00\xff")
            elif msg.type is aiohttp.WSMsgType.PONG:
                up.events.append(("pong", msg.data))
        up.closed.set()
        return ws

    async def bye(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("bye")
        await ws.close(code=4000, message=b"done")
        holder[0].closed.set()
        return ws

    async def flood(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        up = holder[0]
        count = int(request.query["count"])
        chunk = b"\xab" * FLOOD_MESSAGE
        with contextlib.suppress(ConnectionError):
            for _ in range(count):
                await ws.send_bytes(chunk)
                up.sent[0] += 1
        up.closed.set()
        await ws.close()
        return ws

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": "not allowed here"}, status=403)

    async def refuse_chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=404, headers={"X-Why": "gone"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"no ")
        await resp.write(b"such stream")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/ws", echo)
    app.router.add_get("/ping", ping)
    app.router.add_get("/bye", bye)
    app.router.add_get("/flood", flood)
    app.router.add_get("/refuse", refuse)
    app.router.add_get("/refuse-chunked", refuse_chunked)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    up = Upstream(runner, int(runner.addresses[0][1]), "https" if ctx else "http")
    holder.append(up)
    return up


# -- the front: how the listener hands a client connection over ------------------------------

Outcome = tn.SpliceResult | tn.Upgraded | errors.ProxyError


@dataclass
class Front:
    endpoint: Endpoint
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    idle_timeout: float = 30.0
    max_bytes: int | None = None
    head_timeout: float = 5.0
    # Awaited between writing the 101 and splice (what may happen in between, on purpose).
    hold: Callable[[asyncio.Transport, tn.Upgraded], Awaitable[None]] | None = None
    outcomes: asyncio.Queue[Outcome] = field(default_factory=asyncio.Queue)
    clients: list[asyncio.Transport] = field(default_factory=list)
    upgraded: list[tn.Upgraded] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0

    async def handle(self, transport: asyncio.Transport, head: bytes, rest: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        target = lines[0].split(" ")[1]
        headers = [(k.strip(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)]
        try:
            up = await tn.open_upgrade(
                self.endpoint,
                self.ssl_context,
                self.server_hostname,
                target,
                headers,
                connect_timeout=2.0,
                head_timeout=self.head_timeout,
                max_head_bytes=8192,
            )
        except errors.ProxyError as exc:
            transport.write(
                f"HTTP/1.1 {exc.status} {exc.kind}\r\nContent-Length: 0\r\n\r\n".encode()
            )
            transport.close()
            self.outcomes.put_nowait(exc)
            return
        if not up.upgraded:
            line = f"HTTP/1.1 {up.status} {up.reason}\r\nContent-Length: {len(up.body)}\r\n\r\n"
            transport.write(line.encode() + up.body)
            transport.close()
            self.outcomes.put_nowait(up)
            return
        self.upgraded.append(up)
        relayed = "".join(
            f"{k}: {v}\r\n" for k, v in up.headers if k.lower().startswith("sec-websocket-")
        )
        upgrade = next(v for k, v in up.headers if k.lower() == "upgrade")
        transport.write(
            f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n"
            f"{relayed}\r\n".encode()
        )
        if self.hold is not None:
            await self.hold(transport, up)
        result = await tn.splice(
            transport, rest, up, idle_timeout=self.idle_timeout, max_bytes=self.max_bytes
        )
        self.outcomes.put_nowait(result)

    async def next(self, within: float = 10.0) -> Outcome:
        async with asyncio.timeout(within):
            return await self.outcomes.get()

    async def result(self, within: float = 10.0) -> tn.SpliceResult:
        outcome = await self.next(within)
        assert isinstance(outcome, tn.SpliceResult), outcome
        return outcome


class _FrontProtocol(asyncio.Protocol):
    def __init__(self, front: Front) -> None:
        self.front = front
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.front.clients.append(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.transport is None:
            return
        self.transport.pause_reading()  # the listener stops reading once it has a head
        head, rest = self.buf[:end], self.buf[end + 4 :]
        self.buf = b""
        task = asyncio.get_running_loop().create_task(self.front.handle(self.transport, head, rest))
        self.front.tasks.append(task)


@contextlib.asynccontextmanager
async def front_for(
    endpoint: Endpoint, listen_tls: ssl.SSLContext | None = None, **kw: Any
) -> AsyncIterator[Front]:
    front = Front(endpoint, **kw)
    loop = asyncio.get_running_loop()
    front.server = await loop.create_server(
        lambda: _FrontProtocol(front), "127.0.0.1", 0, ssl=listen_tls
    )
    front.port = front.server.sockets[0].getsockname()[1]
    try:
        yield front
    finally:
        front.server.close()
        for task in front.tasks:
            task.cancel()
        await asyncio.gather(*front.tasks, return_exceptions=True)
        for t in front.clients:
            t.abort()


@contextlib.asynccontextmanager
async def rig(**kw: Any) -> AsyncIterator[tuple[Upstream, Front]]:
    up = await start_upstream()
    try:
        async with front_for(up.endpoint, **kw) as front:
            yield up, front
    finally:
        await up.runner.cleanup()


# -- a raw WebSocket client ------------------------------------------------------------------


def frame(opcode: int, payload: bytes, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """A client frame (masked, FIN set)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """A server frame (unmasked): (first byte, payload), within 10 s."""
    async with asyncio.timeout(10):
        return await _read_frame(reader)


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    assert not b1 & 0x80, "server frames are not masked"
    return b0, await reader.readexactly(n)


def handshake(path: str, key: str, extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: live\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n{extra}\r\n"
    ).encode()


async def raw_client(
    port: int, path: str, *, rcvbuf: int | None = None, after_head: bytes = b"", extra: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """Connect, upgrade and read the 101 head; the head line and fields are returned."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
    key = new_key()
    writer.write(handshake(path, key, extra) + after_head)
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
    assert head.startswith("HTTP/1.1 101 "), head
    assert f"Sec-WebSocket-Accept: {accept_for(key)}" in head
    return reader, writer, head


WS = "Upgrade: websocket\r\nConnection: Upgrade\r\n"
ACCEPT = "Sec-WebSocket-Accept: {accept}\r\n"


async def switch(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, fields: str = WS + ACCEPT, after: bytes = b""
) -> None:
    """A raw upstream's side of the handshake: read the request head, answer 101 with
    ``fields`` (``{accept}``: the right Sec-WebSocket-Accept, ``{wrong}``: another key's)
    and ``after`` in the same write."""
    head = (await r.readuntil(b"\r\n\r\n")).decode("latin-1")
    key = next(
        ln.split(":", 1)[1].strip()
        for ln in head.split("\r\n")
        if ln.lower().startswith("sec-websocket-key")
    )
    text = fields.format(accept=accept_for(key), wrong=accept_for(key + "x"))
    w.write(f"HTTP/1.1 101 Switching Protocols\r\n{text}\r\n".encode() + after)


async def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    with contextlib.suppress(ConnectionError):
        return await asyncio.wait_for(reader.read(), 10)
    return b""


# -- echo, messages byte-exact ---------------------------------------------------------------


def test_text_binary_and_large_messages_cross_byte_exact(run: Runner) -> None:
    async def main() -> None:
        async with rig() as (up, front):
            url = f"http://127.0.0.1:{front.port}/ws"
            big = os.urandom(5 * MiB)
            text = "jalur \u2603 " * (300 * 1024)  # ~3.6 MiB of UTF-8
            async with (
                aiohttp.ClientSession() as s,
                s.ws_connect(url, protocols=("chat",), max_msg_size=0) as ws,
            ):
                assert ws.protocol == "chat"  # negotiated end to end
                await ws.send_str("hello")
                assert (await ws.receive(timeout=5)).data == "hello"
                await ws.send_bytes(b"\x00\x01binary\xff")
                assert (await ws.receive(timeout=5)).data == b"\x00\x01binary\xff"
                await ws.send_bytes(big)
                msg = await ws.receive(timeout=20)
                assert msg.type is aiohttp.WSMsgType.BINARY
                assert msg.data == big
                await ws.send_str(text)
                msg = await ws.receive(timeout=20)
                assert msg.type is aiohttp.WSMsgType.TEXT
                assert msg.data == text
            result = await front.result()
            assert result.reason in ("closed_by_client", "closed_by_upstream")
            assert result.client_bytes > len(big) + len(text.encode()) // 2  # may be deflated
            assert result.upstream_bytes > len(big)
            assert ("closed", aiohttp.WSCloseCode.OK) in up.events

    run(main())


def test_ping_and_pong_frames_pass_untouched(run: Runner) -> None:
    async def main() -> None:
        async with rig() as (up, front):
            reader, writer, _ = await raw_client(front.port, "/ping")
            writer.write(frame(0x9, b"p\x00ing\xff"))  # ping with binary payload
            assert await read_frame(reader) == (0x8A, b"p\x00ing\xff")  # its pong
            assert await read_frame(reader) == (0x89, b"from-upstream\x00\xff")  # upstream's ping
            writer.write(frame(0xA, b"from-upstream\x00\xff"))
            await until(lambda: len(up.events) == 2)
            assert up.events == [("ping", b"p\x00ing\xff"), ("pong", b"from-upstream\x00\xff")]
            writer.write(frame(0x8, struct.pack("!H", 1000)))
            assert await read_frame(reader) == (0x88, struct.pack("!H", 1000))
            assert await read_to_end(reader) == b""
            writer.close()
            result = await front.result()
            assert result.reason in ("closed_by_client", "closed_by_upstream")

    run(main())


def test_bytes_sent_with_the_heads_are_tunnelled(run: Runner) -> None:
    """The client's first frame in the same packet as its request head, the upstream's
    first frame in the same packet as its 101: both reach the other side."""

    async def upgrade_and_greet(raw: RawUpstream, r: asyncio.StreamReader, w: Any) -> None:
        await switch(r, w, after=b"\x81\x05hello")
        raw.requests.append(await r.readexactly(len(frame(0x1, b"early"))))
        w.close()

    async def main() -> None:
        raw = await raw_upstream(upgrade_and_greet)
        async with front_for(Endpoint.parse(raw.url)) as front:
            reader, writer, _ = await raw_client(front.port, "/x", after_head=frame(0x1, b"early"))
            assert await read_frame(reader) == (0x81, b"hello")
            assert await read_to_end(reader) == b""  # the upstream's FIN crossed over
            writer.close()  # the tunnel was half-open until now
            result = await front.result()
            assert raw.requests == [frame(0x1, b"early")]
            assert result.reason == "closed_by_upstream"
            assert (result.client_bytes, result.upstream_bytes) == (len(frame(0x1, b"early")), 7)
        raw.server.close()

    run(main())


def test_an_upstream_gone_before_the_splice_still_delivers_its_bytes(run: Runner) -> None:
    """The upstream sends its 101 and a first frame and closes before the handler gets to
    ``splice`` (reading it is paused meanwhile): the frame reaches the client, then the
    upstream's end."""
    gone = asyncio.Event()

    async def greet_and_go(raw: RawUpstream, r: asyncio.StreamReader, w: Any) -> None:
        await switch(r, w, after=b"\x88\x02\x03\xe8")  # close frame, 1000
        w.close()
        await w.wait_closed()
        gone.set()

    async def until_gone(transport: asyncio.Transport, up: tn.Upgraded) -> None:
        await asyncio.wait_for(gone.wait(), 5)

    async def main() -> None:
        raw = await raw_upstream(greet_and_go)
        async with front_for(Endpoint.parse(raw.url), hold=until_gone) as front:
            reader, writer, _ = await raw_client(front.port, "/x")
            assert await read_frame(reader) == (0x88, b"\x03\xe8")
            assert await read_to_end(reader) == b""
            writer.close()
            result = await front.result()
            assert (result.reason, result.upstream_bytes) == ("closed_by_upstream", 4)
        raw.server.close()

    run(main())


def test_a_client_connection_closed_before_the_splice_closes_the_upstream(run: Runner) -> None:
    async def close_client(transport: asyncio.Transport, up: tn.Upgraded) -> None:
        transport.close()

    async def main() -> None:
        async with rig(hold=close_client) as (up, front):
            reader, writer, _ = await raw_client(front.port, "/ws")
            assert await read_to_end(reader) == b""
            result = await front.result()
            assert result.reason == "closed_by_client"
            await asyncio.wait_for(up.closed.wait(), 5)
            writer.close()

    run(main())


# -- closing ---------------------------------------------------------------------------------


def test_close_from_the_upstream_reaches_the_client(run: Runner) -> None:
    async def main() -> None:
        async with rig() as (_, front):
            reader, writer, _ = await raw_client(front.port, "/bye")
            assert await read_frame(reader) == (0x81, b"bye")
            assert await read_frame(reader) == (0x88, struct.pack("!H", 4000) + b"done")
            writer.write(frame(0x8, struct.pack("!H", 4000)))  # the client's close reply
            assert await read_to_end(reader) == b""  # the upstream's FIN crossed over
            writer.close()
            result = await front.result()
            assert result.reason == "closed_by_upstream"

    run(main())


def test_client_closing_its_socket_closes_the_upstream(run: Runner) -> None:
    async def main() -> None:
        async with rig() as (up, front):
            reader, writer, _ = await raw_client(front.port, "/ws")
            writer.write(frame(0x1, b"one"))
            assert await read_frame(reader) == (0x81, b"one")
            writer.close()  # no close frame: just the TCP FIN
            result = await front.result()
            assert (result.reason, result.flag) == ("closed_by_client", "-")
            await asyncio.wait_for(up.closed.wait(), 5)

    run(main())


def test_half_close_keeps_the_other_direction_open(run: Runner) -> None:
    """A non-WebSocket upgrade: the client sends its data and shuts down its writing side;
    the upstream reads to EOF, then answers; the answer still reaches the client."""

    async def upper(raw: RawUpstream, r: asyncio.StreamReader, w: Any) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: upper/1\r\nConnection: upgrade\r\n\r\n"
        )
        data = await r.read()  # to EOF: the client's half-close crossed the tunnel
        w.write(data.upper())
        await w.drain()
        w.close()

    async def main() -> None:
        raw = await raw_upstream(upper)
        async with front_for(Endpoint.parse(raw.url)) as front:
            reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
            writer.write(
                b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: upper/1\r\n\r\n"
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            writer.write(b"some bytes")
            writer.write_eof()
            assert await read_to_end(reader) == b"SOME BYTES"
            result = await front.result()
            assert result.reason == "closed_by_client"
            assert (result.client_bytes, result.upstream_bytes) == (10, 10)
            writer.close()
        raw.server.close()

    run(main())


def test_upstream_reset_mid_stream_ends_the_tunnel(run: Runner) -> None:
    async def upgrade_then_reset(raw: RawUpstream, r: asyncio.StreamReader, w: Any) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: upgrade\r\n\r\n")
        await r.readexactly(4)
        w.write(b"pong")
        await w.drain()
        await reset(w)

    async def main() -> None:
        raw = await raw_upstream(upgrade_then_reset)
        async with front_for(Endpoint.parse(raw.url)) as front:
            reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
            writer.write(
                b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: raw\r\n\r\n"
            )
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"ping")
            assert await read_to_end(reader) == b"pong"  # what came before the reset
            result = await front.result()
            assert (result.reason, result.error_side, result.flag) == ("error", "upstream", "UC")
            assert "Reset" in (result.error or "")
            writer.close()
        raw.server.close()

    run(main())


def test_client_reset_mid_stream_closes_the_upstream(run: Runner) -> None:
    async def main() -> None:
        async with rig() as (up, front):
            reader, writer, _ = await raw_client(front.port, "/ws")
            writer.write(frame(0x2, b"\x01\x02"))
            assert await read_frame(reader) == (0x82, b"\x01\x02")
            await reset(writer)
            result = await front.result()
            assert (result.reason, result.error_side, result.flag) == ("error", "client", "DC")
            await asyncio.wait_for(up.closed.wait(), 5)

    run(main())


def test_cancelling_splice_aborts_both_connections(run: Runner) -> None:
    async def main() -> None:
        async with rig() as (up, front):
            reader, writer, _ = await raw_client(front.port, "/ws")
            await until(lambda: len(front.upgraded) == 1)
            front.tasks[0].cancel()
            assert await read_to_end(reader) == b""
            await asyncio.wait_for(up.closed.wait(), 5)
            writer.close()

    run(main())


# -- limits ------------------------------------------------------------------------------------


def test_idle_tunnel_is_closed_on_both_sides(run: Runner) -> None:
    async def main() -> None:
        async with rig(idle_timeout=0.3) as (up, front):
            reader, writer, _ = await raw_client(front.port, "/ws")
            writer.write(frame(0x1, b"still here"))
            assert await read_frame(reader) == (0x81, b"still here")
            assert await read_to_end(reader) == b""  # closed by the proxy, nothing sent
            result = await front.result()
            assert (result.reason, result.flag) == ("idle_timeout", "SI")
            # Not before the idle timeout (libuv's timers have millisecond granularity: one
            # may fire up to a millisecond early by the loop's float clock).
            assert result.duration >= 0.3 - 0.001
            await asyncio.wait_for(up.closed.wait(), 5)
            writer.close()

    run(main())


def test_traffic_keeps_an_idle_timeout_from_firing(run: Runner) -> None:
    async def main() -> None:
        async with rig(idle_timeout=0.5) as (_, front):
            reader, writer, _ = await raw_client(front.port, "/ws")
            loop = asyncio.get_running_loop()
            start = loop.time()
            n = 0
            while loop.time() - start < 1.5:  # three idle timeouts, never idle for one
                writer.write(frame(0x1, b"tick"))
                assert await read_frame(reader) == (0x81, b"tick")
                n += 1
                await asyncio.sleep(0.1)  # pacing of the traffic, not synchronisation
            assert front.outcomes.empty()
            writer.close()
            assert (await front.result()).reason == "closed_by_client"
            assert n >= 5

    run(main())


def test_byte_limit_ends_the_tunnel(run: Runner) -> None:
    async def main() -> None:
        async with rig(max_bytes=4096) as (_, front):
            reader, writer, _ = await raw_client(front.port, "/ws")
            writer.write(frame(0x2, b"a" * 1000))
            assert await read_frame(reader) == (0x82, b"a" * 1000)
            writer.write(frame(0x2, b"b" * 3000))  # 2 x 1008 + 3008 bytes > 4096
            assert await read_to_end(reader) == b""
            result = await front.result()
            assert result.reason == "limit"
            assert result.client_bytes + result.upstream_bytes <= 4096
            assert result.client_bytes == len(frame(0x2, b"a" * 1000))
            writer.close()

    run(main())


def test_a_client_that_does_not_read_pauses_the_upstream(run: Runner) -> None:
    """Flow control: the upstream floods, the client reads nothing. The proxy stops reading
    the upstream once the client's write buffer is over its high-water mark, so memory
    stays bounded and the upstream's own writes block; everything arrives once the client
    reads."""
    count = 48 * MiB // FLOOD_MESSAGE

    async def main() -> None:
        async with rig() as (up, front):
            reader, writer, _ = await raw_client(front.port, f"/flood?count={count}", rcvbuf=8192)
            await until(lambda: len(front.upgraded) == 1 and len(front.clients) == 1)
            upstream = front.upgraded[0].transport
            client = front.clients[0]
            assert upstream is not None
            seen: list[int] = []

            def paused() -> bool:
                seen.append(client.get_write_buffer_size())
                return not upstream.is_reading() and seen[-1] > tn.HIGH_WATER

            await until(paused, within=20)
            # Bounded: the high-water mark plus one socket read of the upstream.
            assert max(seen) <= tn.HIGH_WATER + 256 * 1024
            assert up.sent[0] < count  # the upstream is blocked, not finished
            assert not up.closed.is_set()
            total = 0
            while total < count * (FLOOD_MESSAGE + 10):
                opcode, payload = await asyncio.wait_for(read_frame(reader), 20)
                if opcode == 0x88:
                    break
                assert payload == b"\xab" * FLOOD_MESSAGE
                total += FLOOD_MESSAGE + 10
            assert up.sent[0] == count
            writer.close()
            result = await front.result()
            assert result.upstream_bytes >= count * (FLOOD_MESSAGE + 10)

    run(main())


def test_an_upstream_that_does_not_read_pauses_the_client(run: Runner) -> None:
    async def upgrade_and_stall(raw: RawUpstream, r: asyncio.StreamReader, w: Any) -> None:
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: upgrade\r\n\r\n")
        await w.drain()
        await asyncio.Event().wait()  # never reads again

    async def main() -> None:
        raw = await raw_upstream(upgrade_and_stall)
        async with front_for(Endpoint.parse(raw.url), idle_timeout=2.0) as front:
            reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
            writer.write(
                b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: raw\r\n\r\n"
            )
            await reader.readuntil(b"\r\n\r\n")
            await until(lambda: len(front.upgraded) == 1)
            upstream = front.upgraded[0].transport
            client = front.clients[0]
            assert upstream is not None
            chunk = b"x" * 65536

            async def flood() -> None:
                with contextlib.suppress(ConnectionError):
                    for _ in range(48 * 16):  # 48 MiB at most
                        writer.write(chunk)
                        await writer.drain()

            task = asyncio.create_task(flood())
            seen: list[int] = []

            def paused() -> bool:
                seen.append(upstream.get_write_buffer_size())
                return not client.is_reading() and seen[-1] > tn.HIGH_WATER

            await until(paused, within=20)
            assert max(seen) <= tn.HIGH_WATER + 256 * 1024
            assert not task.done()  # the client's own writes are blocked
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            # The client resets, but the proxy is not reading it (paused) so it cannot see
            # that; nothing moves either way, and the idle timeout ends the stalled tunnel,
            # dropping what it buffered for the upstream.
            await reset(writer)
            result = await front.result()
            assert result.reason == "idle_timeout"
            assert result.client_bytes <= 48 * MiB
        raw.server.close()

    run(main())


# -- the upstream's answer -------------------------------------------------------------------


def test_a_refused_upgrade_is_returned_to_be_relayed(run: Runner) -> None:
    async def main() -> None:
        async with rig() as (_, front):
            key = new_key()
            for path, status, body in (
                ("/refuse", 403, b'{"error": "not allowed here"}'),
                ("/refuse-chunked", 404, b"no such stream"),
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
                writer.write(handshake(path, key))
                answer = await read_to_end(reader)
                assert answer.startswith(f"HTTP/1.1 {status} ".encode())
                assert answer.endswith(body)
                outcome = await front.next()
                assert isinstance(outcome, tn.Upgraded)
                assert (outcome.upgraded, outcome.status, outcome.body) == (False, status, body)
                assert outcome.transport is None
                writer.close()

    run(main())


def test_a_close_delimited_refusal_is_read_to_the_end(run: Runner) -> None:
    async def refuse(raw: RawUpstream, r: asyncio.StreamReader, w: Any) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 503 Busy\r\nConnection: close\r\n\r\ntry later")
        await w.drain()

    async def main() -> None:
        raw = await raw_upstream(refuse)
        up = await tn.open_upgrade(
            Endpoint.parse(raw.url),
            None,
            None,
            "/",
            [("Upgrade", "websocket"), ("Sec-WebSocket-Key", new_key())],
            connect_timeout=2,
            head_timeout=2,
            max_head_bytes=4096,
        )
        assert (up.status, up.reason, up.body, up.upgraded) == (503, "Busy", b"try later", False)
        raw.server.close()

    run(main())


def test_upstream_requests_carry_the_client_handshake_fields(run: Runner) -> None:
    async def capture(raw: RawUpstream, r: asyncio.StreamReader, w: Any) -> None:
        raw.requests.append(await r.readuntil(b"\r\n\r\n"))
        w.write(b"HTTP/1.1 403 No\r\nContent-Length: 0\r\n\r\n")

    async def main() -> None:
        raw = await raw_upstream(capture)
        key = new_key()
        await tn.open_upgrade(
            Endpoint.parse(raw.url),
            None,
            None,
            "/live?room=1",
            [
                ("Host", "shop"),
                ("Connection", "keep-alive, Upgrade, X-Secret"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Key", key),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Protocol", "chat, superchat"),
                ("Sec-WebSocket-Extensions", "permessage-deflate"),
                ("Content-Length", "0"),  # no body: dropped
            ],
            connect_timeout=2,
            head_timeout=2,
            max_head_bytes=4096,
        )
        assert raw.requests == [
            b"GET /live?room=1 HTTP/1.1\r\nHost: shop\r\nUpgrade: websocket\r\n"
            + f"Sec-WebSocket-Key: {key}\r\n".encode()
            + b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat, superchat\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate\r\nConnection: Upgrade\r\n\r\n"
        ]
        raw.server.close()

    run(main())


def bad_101(fields: str) -> Callable[[RawUpstream, asyncio.StreamReader, Any], Awaitable[None]]:
    """An upstream answering 101 with ``fields`` (see ``switch``) and a first frame."""

    async def answer(raw: RawUpstream, r: asyncio.StreamReader, w: Any) -> None:
        await switch(r, w, fields, after=b"\x81\x02hi")
        await w.drain()
        await r.read()

    return answer


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        (WS + "Sec-WebSocket-Accept: {wrong}\r\n", "Accept"),
        (WS, "Accept"),
        (WS + ACCEPT + ACCEPT, "Accept"),
        (WS + ACCEPT + "Sec-WebSocket-Protocol: admin\r\n", "not offered"),
        (WS + ACCEPT + "Sec-WebSocket-Protocol: chat, v2\r\n", "not offered"),
        ("Upgrade: h2c\r\nConnection: Upgrade\r\n" + ACCEPT, "switched to"),
        ("Upgrade: websocket, h2c\r\nConnection: Upgrade\r\n" + ACCEPT, "switched to"),
        ("Connection: Upgrade\r\n" + ACCEPT, "switched to"),
        ("Upgrade: websocket\r\n" + ACCEPT, "Connection"),
    ],
    ids=[
        "wrong-accept",
        "no-accept",
        "two-accepts",
        "protocol-not-offered",
        "two-protocols",
        "other-token",
        "two-tokens",
        "no-upgrade",
        "no-connection",
    ],
)
def test_an_invalid_101_is_an_error_and_nothing_is_tunnelled(
    run: Runner, fields: str, detail: str
) -> None:
    async def main() -> None:
        raw = await raw_upstream(bad_101(fields))
        async with front_for(Endpoint.parse(raw.url)) as front:
            reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
            writer.write(handshake("/ws", new_key(), "Sec-WebSocket-Protocol: chat, v2\r\n"))
            answer = await read_to_end(reader)
            assert answer.startswith(b"HTTP/1.1 502 upgrade\r\n")
            assert b"hi" not in answer  # the upstream's first frame never reached the client
            err = await front.next()
            assert isinstance(err, errors.InvalidUpgrade)
            assert (err.status, err.flag, err.kind) == (502, "UPE", "upgrade")
            assert detail in err.message
            writer.close()
        raw.server.close()

    run(main())


def test_a_valid_101_with_a_subprotocol_offered_is_accepted(run: Runner) -> None:
    async def main() -> None:
        fields = "Upgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n" + ACCEPT
        raw = await raw_upstream(bad_101(fields + "Sec-WebSocket-Protocol: v2\r\n"))
        up = await tn.open_upgrade(
            Endpoint.parse(raw.url),
            None,
            None,
            "/",
            [
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Key", new_key()),
                ("Sec-WebSocket-Protocol", "chat, v2"),
            ],
            connect_timeout=2,
            head_timeout=2,
            max_head_bytes=4096,
        )
        assert (up.upgraded, up.status, up.protocol, up.leftover) == (
            True,
            101,
            "v2",
            b"\x81\x02hi",
        )
        up.close()
        raw.server.close()

    run(main())


# -- failures before the answer ----------------------------------------------------------------


async def upgrade_to(url: str, **kw: Any) -> tn.Upgraded:
    args: dict[str, Any] = {"connect_timeout": 2.0, "head_timeout": 0.5, "max_head_bytes": 4096}
    args.update(kw)
    return await tn.open_upgrade(
        Endpoint.parse(url),
        None,
        None,
        "/ws",
        [("Upgrade", "websocket"), ("Sec-WebSocket-Key", new_key())],
        **args,
    )


def test_connect_and_head_failures_map_to_the_error_tree(run: Runner) -> None:
    async def silent(raw: RawUpstream, r: asyncio.StreamReader, w: Any) -> None:
        await r.read()

    async def hang_up(raw: RawUpstream, r: asyncio.StreamReader, w: Any) -> None:
        await r.readuntil(b"\r\n\r\n")

    async def huge(raw: RawUpstream, r: asyncio.StreamReader, w: Any) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(
            b"HTTP/1.1 101 Switching Protocols\r\n"
            + b"X-Pad: "
            + b"a" * 3000
            + b"\r\n"
            + b"X-Pad: "
            + b"a" * 3000
            + b"\r\n\r\n"
        )
        await r.read()

    async def garbage(raw: RawUpstream, r: asyncio.StreamReader, w: Any) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await r.read()

    async def main() -> None:
        with pytest.raises(errors.ConnectRefused):
            await upgrade_to(f"http://127.0.0.1:{free_port()}")
        for handler, kind in (
            (silent, errors.ResponseTimeout),
            (hang_up, errors.UpstreamReset),
            (huge, errors.UpstreamProtocolError),
            (garbage, errors.UpstreamProtocolError),
        ):
            raw = await raw_upstream(handler)
            with pytest.raises(kind):
                await upgrade_to(raw.url)
            raw.server.close()

    run(main())


def test_requests_that_cannot_be_sent_are_refused_before_connecting(run: Runner) -> None:
    async def main() -> None:
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a connect would fail
        cases = [
            [("Upgrade", "websocket")],  # no key
            [("Upgrade", "websocket"), ("Sec-WebSocket-Key", "c2hvcnQ=")],  # not 16 bytes
            [("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAoAAAAAIAAAAA")],
            [("Sec-WebSocket-Key", new_key())],  # no Upgrade
            [("Upgrade", "websocket"), ("Sec-WebSocket-Key", new_key()), ("Content-Length", "5")],
            [
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Key", new_key()),
                ("Transfer-Encoding", "chunked"),
            ],
            [("Upgrade", "websocket"), ("Sec-WebSocket-Key", new_key()), ("X", "a\r\nInjected: 1")],
        ]
        for headers in cases:
            with pytest.raises(errors.BadRequest):
                await tn.open_upgrade(
                    Endpoint.parse(url),
                    None,
                    None,
                    "/",
                    headers,
                    connect_timeout=2,
                    head_timeout=2,
                    max_head_bytes=4096,
                )
        with pytest.raises(errors.BadRequest):
            await tn.open_upgrade(
                Endpoint.parse(url),
                None,
                None,
                "/a b\r\nX: y",
                [("Upgrade", "websocket"), ("Sec-WebSocket-Key", new_key())],
                connect_timeout=2,
                head_timeout=2,
                max_head_bytes=4096,
            )

    run(main())


# -- TLS upstream ------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: str
    server: ssl.SSLContext


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(NAME, "127.0.0.1").configure_cert(ctx)
    return Pki(ca, str(ca_file), ctx)


def cluster_context(port: int, ca_file: str) -> ssl.SSLContext:
    spec = cfg.Cluster(
        system="tiktok",
        endpoints=[f"https://127.0.0.1:{port}"],
        tls=cfg.UpstreamTls(ca_file=ca_file, server_name=NAME),
    )
    rotating = tls.for_cluster("live", spec)
    assert rotating is not None
    return rotating.context


def test_tls_upstream_tunnel_with_the_cluster_context(run: Runner, pki: Pki) -> None:
    async def main() -> None:
        up = await start_upstream(pki.server)
        ctx = cluster_context(up.port, pki.ca_file)
        try:
            async with front_for(up.endpoint, ssl_context=ctx, server_hostname=NAME) as front:
                big = os.urandom(3 * MiB)
                url = f"http://127.0.0.1:{front.port}/ws"
                async with aiohttp.ClientSession() as s, s.ws_connect(url, max_msg_size=0) as ws:
                    await ws.send_str("over tls")
                    assert (await ws.receive(timeout=5)).data == "over tls"
                    await ws.send_bytes(big)
                    assert (await ws.receive(timeout=20)).data == big
                result = await front.result()
                assert result.reason in ("closed_by_client", "closed_by_upstream")
                assert front.upgraded[0].transport is not None
                assert front.upgraded[0].transport.get_extra_info("ssl_object") is not None
                # half-close from a plain client towards a TLS upstream closes it instead
                reader, writer, _ = await raw_client(front.port, "/ws")
                writer.write(frame(0x1, b"x"))
                assert await read_frame(reader) == (0x81, b"x")
                writer.write_eof()
                assert await read_to_end(reader) == b""
                assert (await front.result()).reason == "closed_by_client"
                writer.close()
        finally:
            await up.runner.cleanup()

    run(main())


def test_tls_on_both_sides(run: Runner, pki: Pki) -> None:
    """A TLS listener's client connection spliced to a TLS upstream: both transports taken
    over are TLS transports (set_protocol on asyncio's and uvloop's SSL protocols)."""

    async def main() -> None:
        up = await start_upstream(pki.server)
        client_ctx = ssl.create_default_context()
        pki.ca.configure_trust(client_ctx)
        ctx = cluster_context(up.port, pki.ca_file)
        try:
            async with front_for(
                up.endpoint, listen_tls=pki.server, ssl_context=ctx, server_hostname=NAME
            ) as front:
                url = f"https://127.0.0.1:{front.port}/ws"  # the certificate names it too
                connector = aiohttp.TCPConnector(ssl=client_ctx)
                big = os.urandom(2 * MiB)
                async with (
                    aiohttp.ClientSession(connector=connector) as s,
                    s.ws_connect(url, max_msg_size=0) as ws,
                ):
                    for _ in range(3):
                        await ws.send_bytes(big)
                        assert (await ws.receive(timeout=20)).data == big
                    await ws.ping(b"tls ping")
                    await ws.send_str("done")
                    assert (await ws.receive(timeout=5)).data == "done"
                result = await front.result()
                assert result.reason in ("closed_by_client", "closed_by_upstream")
                assert result.client_bytes > 3 * 2 * MiB
                assert front.clients[0].get_extra_info("ssl_object") is not None
        finally:
            await up.runner.cleanup()

    run(main())


def test_the_pool_gives_upgrades_its_tls_context_and_name(run: Runner, pki: Pki) -> None:
    """``H1Transport.tls_for``: an upgrade to an https:// cluster uses the context (and
    name) the cluster's pooled connections use."""

    async def main() -> None:
        up = await start_upstream(pki.server)
        spec = cfg.Cluster(
            system="tiktok",
            endpoints=[f"https://127.0.0.1:{up.port}"],
            tls=cfg.UpstreamTls(ca_file=pki.ca_file, server_name=NAME),
        )
        pool = H1Transport(spec, cfg.Listen(), tls=tls.for_cluster("live", spec))
        plain = H1Transport(
            cfg.Cluster(system="tiktok", endpoints=["http://127.0.0.1:1"]), cfg.Listen()
        )
        assert plain.tls_for(up.endpoint) == (None, None)
        ctx, name = pool.tls_for(up.endpoint)
        assert name == NAME
        try:
            upgraded = await tn.open_upgrade(
                up.endpoint,
                ctx,
                name,
                "/ws",
                [
                    ("Upgrade", "websocket"),
                    ("Sec-WebSocket-Key", new_key()),
                    ("Sec-WebSocket-Version", "13"),
                ],
                connect_timeout=2,
                head_timeout=2,
                max_head_bytes=4096,
            )
            assert (upgraded.upgraded, upgraded.status) == (True, 101)
            upgraded.close()
        finally:
            await up.runner.cleanup()

    run(main())


def test_tls_upstream_not_trusted_is_refused(run: Runner, pki: Pki, tmp_path: Path) -> None:
    async def main() -> None:
        up = await start_upstream(pki.server)
        other = tmp_path / "other.pem"
        other.write_bytes(trustme.CA().cert_pem.bytes())
        try:
            with pytest.raises(errors.TlsVerifyFailed):
                await tn.open_upgrade(
                    up.endpoint,
                    cluster_context(up.port, str(other)),
                    NAME,
                    "/ws",
                    [("Upgrade", "websocket"), ("Sec-WebSocket-Key", new_key())],
                    connect_timeout=2,
                    head_timeout=2,
                    max_head_bytes=4096,
                )
            with pytest.raises(errors.TlsVerifyFailed):  # the right CA, the wrong name
                await tn.open_upgrade(
                    up.endpoint,
                    cluster_context(up.port, pki.ca_file),
                    "other.internal",
                    "/ws",
                    [("Upgrade", "websocket"), ("Sec-WebSocket-Key", new_key())],
                    connect_timeout=2,
                    head_timeout=2,
                    max_head_bytes=4096,
                )
        finally:
            await up.runner.cleanup()

    run(main())


# -- configuration -----------------------------------------------------------------------------


def test_upgrade_settings_default_envoy_like_and_are_checked() -> None:
    conf = build_config(one_route({"live": cluster("tiktok", "http://127.0.0.1:1")}, "live"))
    assert conf.clusters["live"].upgrade == cfg.Upgrade(idle_timeout=300.0, max_bytes=None)
    upgrade = {"idle_timeout": 30, "max_bytes": 1048576}
    conf = build_config(
        one_route({"live": cluster("tiktok", "http://127.0.0.1:1", upgrade=upgrade)}, "live")
    )
    assert conf.clusters["live"].upgrade == cfg.Upgrade(idle_timeout=30.0, max_bytes=1048576)
    for bad, path in (
        ({"idle_timeout": 0}, "$.clusters.live.upgrade.idle_timeout"),
        ({"max_bytes": 0}, "$.clusters.live.upgrade.max_bytes"),
        ({"idle": 5}, "$.clusters.live.upgrade.idle"),
    ):
        data = one_route({"live": cluster("tiktok", "http://127.0.0.1:1", upgrade=bad)}, "live")
        with pytest.raises(cfg.ConfigError) as info:
            build_config(data)
        assert [e.path for e in info.value.errors] == [path], info.value.errors


# -- through the proxy as it is wired today ----------------------------------------------------


async def test_a_websocket_client_may_send_more_than_max_head_bytes(harness: Harness) -> None:
    b = await harness.backend("live", "tiktok")
    p = await harness.proxy(one_route({"live": cluster("tiktok", b.url)}, "live"))
    reader, writer, _ = await raw_client(p.data_port, "/_sim/ws")
    try:
        payload = b"x" * 1024
        for _ in range(100):  # 100 KiB in all, over the default 64 KiB head limit
            writer.write(frame(0x2, payload))
            assert await read_frame(reader) == (0x82, payload)
    finally:
        writer.close()
