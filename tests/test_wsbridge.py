"""WebSocket through the listener's hand-off (``Request.detach``) and ``wsbridge``: raw client
frames against the demo back end's echo, on real sockets."""

from __future__ import annotations

import asyncio
import base64
import os

import orjson

from proxy.server import ProxyServer
from proxy.wsbridge import accept_key

from .conftest import Harness, cluster


async def echo_proxy(harness: Harness) -> ProxyServer:
    b = await harness.backend("live", "tiktok")
    return await harness.proxy(
        {
            "clusters": {"live": cluster("tiktok", b.url)},
            "routes": [{"name": "live", "match": {}, "category": "promotion", "to": "live"}],
        }
    )


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    data = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + mask + data


def upgrade(key: str) -> bytes:
    return (
        f"GET /_sim/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    ).encode()


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    return b0 & 0x0F, await reader.readexactly(n)


async def test_fragments_and_pings_from_a_raw_client(harness: Harness) -> None:
    p = await echo_proxy(harness)
    key = base64.b64encode(os.urandom(16)).decode()
    reader, writer = await asyncio.open_connection("127.0.0.1", p.data_port)
    # A fragment sent with the head: the listener's leftover.
    writer.write(upgrade(key) + masked(0x1, b"hel", fin=False))
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert f"Sec-WebSocket-Accept: {accept_key(key)}\r\n".encode() in head
        assert b"Connection: close" not in head
        writer.write(masked(0x9, b"ping?") + masked(0x0, b"lo"))
        assert await read_frame(reader) == (0xA, b"ping?")  # pong, with the ping's data
        assert await read_frame(reader) == (0x1, b"hello")  # the echo, fragments joined
        writer.write(masked(0x8, (1000).to_bytes(2, "big")))
        opcode, _ = await read_frame(reader)
        assert opcode == 0x8
        assert await reader.read() == b""
    writer.close()


async def test_a_broken_handshake_is_400_before_any_upstream(harness: Harness) -> None:
    p = await echo_proxy(harness)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.data_port)
    writer.write(
        b"GET /_sim/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert orjson.loads(body)["reason"] == "websocket_handshake"
    assert harness.backends["live"].received == []


async def test_an_unmasked_client_frame_closes_with_1002(harness: Harness) -> None:
    p = await echo_proxy(harness)
    key = base64.b64encode(os.urandom(16)).decode()
    reader, writer = await asyncio.open_connection("127.0.0.1", p.data_port)
    writer.write(upgrade(key))
    async with asyncio.timeout(5):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        writer.write(bytes((0x81, 2)) + b"hi")
        assert await read_frame(reader) == (0x8, (1002).to_bytes(2, "big"))
        assert await reader.read() == b""
    writer.close()
