"""A client's WebSocket, taken from the listener, bridged message by message to the upstream.

Interim (issue #20): until the byte tunnel (``tunnel.py``) carries upgrades, the upstream
side stays aiohttp's client WebSocket (public API) and the client side is this module: the
handshake answer (RFC 6455 section 4.2.2: ``Sec-WebSocket-Accept`` from the client's key, the
subprotocol the upstream chose), then, on the socket ``listener.Request.detach`` hands over,
the server side of the framing: masked client frames are read (fragments joined, at most
``max_message`` bytes per message), pings answered, text and binary messages passed on;
upstream messages are written as unmasked frames, honouring the client socket's flow
control. A protocol error closes with 1002, a message too large with 1009.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections import deque
from typing import Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["accept_key", "bridge", "handshake_problem", "switching_head"]

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
# Client messages waiting for the upstream before the client socket stops being read.
_QUEUED: Final = 16


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def handshake_problem(headers: CIMultiDictProxy[str]) -> str | None:
    """Why the client's opening handshake cannot be answered (None: it can)."""
    if "upgrade" not in headers.get("Connection", "").lower():
        return "WebSocket upgrade without Connection: upgrade"
    if headers.get("Sec-WebSocket-Version") != "13":
        return "unsupported Sec-WebSocket-Version (13 is served)"
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        return "invalid Sec-WebSocket-Key"
    return None


def switching_head(client_key: str, protocol: str | None, request_id: str) -> CIMultiDict[str]:
    """The ``101``'s fields for the client."""
    headers: CIMultiDict[str] = CIMultiDict(
        {
            "Upgrade": "websocket",
            "Connection": "upgrade",
            "Sec-WebSocket-Accept": accept_key(client_key),
            "x-request-id": request_id,
        }
    )
    if protocol:
        headers["Sec-WebSocket-Protocol"] = protocol
    return headers


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def _unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


class _Client(asyncio.Protocol):
    """The client's socket after the hand-over: frames in, frames out."""

    def __init__(self, transport: asyncio.Transport, max_message: int) -> None:
        self.transport = transport
        self.max_message = max_message
        self.buf = bytearray()
        self.fragments: list[bytes] = []
        self.fragment_op = 0
        self.size = 0
        self.messages: deque[tuple[int, bytes] | None] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.drained: asyncio.Future[None] | None = None
        self.paused = False
        self.gone = False

    # -- reading -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            self._parse()
        except ValueError as exc:
            code = 1009 if "too large" in str(exc) else 1002
            self.close(code)
            self._push(None)

    def _parse(self) -> None:
        buf = self.buf
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            if b0 & 0x70:
                raise ValueError("reserved bits set")
            if not b1 & 0x80:
                raise ValueError("unmasked client frame")
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, pos = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, pos = int.from_bytes(buf[2:10], "big"), 10
            if n > self.max_message:
                raise ValueError("message too large")
            if len(buf) < pos + 4 + n:
                return
            payload = _unmask(bytes(buf[pos + 4 : pos + 4 + n]), bytes(buf[pos : pos + 4]))
            del buf[: pos + 4 + n]
            self._frame(b0 & 0x80 != 0, b0 & 0x0F, payload)

    def _frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        if opcode >= 0x8:  # control frames: whole, short, between fragments
            if not fin or len(payload) > 125:
                raise ValueError("invalid control frame")
            if opcode == _PING:
                self.send(_PONG, payload)
            elif opcode == _CLOSE:
                self._push((_CLOSE, payload))
            return
        if opcode == _CONT:
            if not self.fragments:
                raise ValueError("continuation without a message")
        elif opcode in (_TEXT, _BINARY):
            if self.fragments:
                raise ValueError("new message inside a fragmented one")
            self.fragment_op = opcode
        else:
            raise ValueError("unknown opcode")
        self.size += len(payload)
        if self.size > self.max_message:
            raise ValueError("message too large")
        self.fragments.append(payload)
        if fin:
            data = b"".join(self.fragments)
            self.fragments, self.size = [], 0
            self._push((self.fragment_op, data))

    def _push(self, item: tuple[int, bytes] | None) -> None:
        self.messages.append(item)
        if len(self.messages) >= _QUEUED and not self.gone:
            self.transport.pause_reading()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self) -> tuple[int, bytes] | None:
        while not self.messages:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        item = self.messages.popleft()
        if len(self.messages) == _QUEUED // 2 and not self.gone:
            self.transport.resume_reading()
        return item

    def eof_received(self) -> bool | None:
        self._push(None)
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.gone = True
        self._push(None)
        drained = self.drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- writing -----------------------------------------------------------------------

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        drained = self.drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def send(self, opcode: int, payload: bytes) -> None:
        if self.gone:
            raise ConnectionResetError("client closed the WebSocket")
        self.transport.write(_frame(opcode, payload))

    async def drain(self) -> None:
        if self.paused and not self.gone:
            self.drained = asyncio.get_running_loop().create_future()
            await self.drained

    def close(self, code: int) -> None:
        if not self.gone:
            self.transport.write(_frame(_CLOSE, code.to_bytes(2, "big")))
            self.transport.close()
            self.gone = True


async def bridge(
    transport: asyncio.Transport,
    leftover: bytes,
    upstream: aiohttp.ClientWebSocketResponse,
    max_message: int,
) -> None:
    """Relay messages both ways until either side closes; both are closed on return."""
    client = _Client(transport, max_message)
    transport.set_protocol(client)
    if leftover:
        client.data_received(leftover)
    transport.resume_reading()

    async def client_to_upstream() -> None:
        while (item := await client.receive()) is not None:
            opcode, data = item
            if opcode == _TEXT:
                await upstream.send_str(data.decode("utf-8"))
            elif opcode == _BINARY:
                await upstream.send_bytes(data)
            else:  # close
                break
        await upstream.close()

    async def upstream_to_client() -> None:
        async for msg in upstream:
            if msg.type is aiohttp.WSMsgType.TEXT:
                client.send(_TEXT, msg.data.encode("utf-8"))
            elif msg.type is aiohttp.WSMsgType.BINARY:
                client.send(_BINARY, msg.data)
            else:
                break
            await client.drain()
        client.close(upstream.close_code or aiohttp.WSCloseCode.OK)

    tasks = [
        asyncio.ensure_future(client_to_upstream()),
        asyncio.ensure_future(upstream_to_client()),
    ]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            exc = t.exception()
            if exc is not None and not isinstance(
                exc, ConnectionError | aiohttp.ClientError | UnicodeDecodeError
            ):
                raise exc
    finally:
        await upstream.close()
        client.close(aiohttp.WSCloseCode.GOING_AWAY)
