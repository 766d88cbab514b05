"""How a client connection ends (issue #19): the answer that ends it says
``Connection: close`` -- the request limit, a drain -- and a request accepted before the end
is served, its body read to the end, never dropped with a reset."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.server import ProxyServer

from .conftest import Harness, until


class Client:
    """One keep-alive client connection, read one answer at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(10):
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            lines = head.split("\r\n")
            headers = {
                k.strip().lower(): v.strip()
                for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)
            }
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(lines[0].split()[1]), headers, body

    async def closed_by_peer(self) -> bool:
        async with asyncio.timeout(10):
            return await self.reader.read(1) == b""

    def close(self) -> None:
        self.writer.close()


GET = b"GET /api/x HTTP/1.1\r\nHost: shop\r\n\r\n"
BODY = b'{"amount": 125000, "currency": "IDR"}'


def post_head(length: int = len(BODY)) -> bytes:
    return (
        b"POST /api/pay HTTP/1.1\r\nHost: shop\r\nExpect: 100-continue\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n\r\n"
    )


async def proxy(h: Harness, **listen: Any) -> ProxyServer:
    b = await h.backend("pay", "tokopedia")
    return await h.proxy(
        {
            "listen": {"host": "127.0.0.1", "port": 0, "body_idle_timeout": 2, **listen},
            "drain": {"delay": 0, "timeout": 5},
            "clusters": {"pay": {"system": "tokopedia", "endpoints": [b.url]}},
            "routes": [{"name": "all", "match": {}, "category": "payment", "to": "pay"}],
        }
    )


async def post_after_continue(c: Client) -> tuple[int, dict[str, str], bytes]:
    """A POST whose body is sent only once the proxy asked for it (100 Continue): the body
    surely arrives after the head, in bytes of its own."""
    await c.send(post_head())
    async with asyncio.timeout(10):
        interim = await c.reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100"), interim
    await c.send(BODY)
    return await c.answer()


async def test_the_answer_reaching_the_request_limit_says_close_and_is_served(
    harness: Harness,
) -> None:
    p = await proxy(harness, max_requests_per_connection=3)
    c = await Client.open(p.data_port)
    try:
        for _ in range(2):
            await c.send(GET)
            status, headers, _ = await c.answer()
            assert status == 200
            assert headers.get("connection", "").lower() != "close"
        status, headers, body = await post_after_continue(c)  # the third: the last
        assert status == 200, body
        assert headers["connection"].lower() == "close"
        assert await c.closed_by_peer()
    finally:
        c.close()
    received = harness.backends["pay"].received
    assert len(received) == 3
    assert received[-1].body_bytes == len(BODY)


async def test_a_drain_tells_keepalive_clients_to_close_on_their_next_answer(
    harness: Harness,
) -> None:
    p = await proxy(harness)
    idle = await Client.open(p.data_port)
    await idle.send(GET)
    assert (await idle.answer())[0] == 200
    stopping = asyncio.create_task(p.stop(drain_delay=30))  # serving while not ready
    try:
        await until(lambda: p.status.draining)
        await idle.send(GET)
        status, headers, _ = await idle.answer()
        assert status == 200
        assert headers["connection"].lower() == "close"
        assert await idle.closed_by_peer()
        # A new connection during the delay is served, and told to close as well.
        fresh = await Client.open(p.data_port)
        status, headers, body = await post_after_continue(fresh)
        assert status == 200, body
        assert headers["connection"].lower() == "close"
        assert await fresh.closed_by_peer()
        fresh.close()
    finally:
        idle.close()
        stopping.cancel()


async def test_a_body_still_uploading_when_the_listener_stops_is_read_and_answered(
    harness: Harness,
) -> None:
    """SIGTERM's last step closes every connection; a request whose body is still on its
    way is part of what is in flight and must be served."""
    p = await proxy(harness)
    c = await Client.open(p.data_port)
    try:
        await c.send(post_head())
        async with asyncio.timeout(10):
            assert (await c.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
        assert p._data_server is not None
        server = p._data_server
        stopping = asyncio.create_task(p.stop(drain_delay=0))
        await until(lambda: server.draining)
        await c.send(BODY)
        status, headers, body = await c.answer()
        assert status == 200, body
        assert headers["connection"].lower() == "close"
        await stopping
    finally:
        c.close()
    assert harness.backends["pay"].received[-1].body_bytes == len(BODY)


async def test_every_closing_error_says_close(harness: Harness) -> None:
    p = await proxy(harness, max_body_bytes=8)
    for request in (
        b"GET /a b HTTP/1.1\r\nHost: shop\r\n\r\n",  # malformed request line
        b"GET /api/x HTTP/1.1\r\nHost: shop\r\nX_Under: 1\r\n\r\n",  # refused header
        post_head(100),  # over the body limit (413)
        b"GET /api/%252e HTTP/1.1\r\nHost: shop\r\n\r\n",  # double encoding (400)
    ):
        c = await Client.open(p.data_port)
        try:
            await c.send(request)
            status, headers, _ = await c.answer()
            assert status >= 400
            assert headers["connection"].lower() == "close", (request, status)
            assert await c.closed_by_peer()
        finally:
            c.close()


async def test_a_closed_connection_is_freed_without_the_cycle_collector(
    harness: Harness,
) -> None:
    """Per-connection state must not form reference cycles: bursts of connections would
    then stay in memory until the collector's next full pass (RSS grew ~1 MiB per 300
    connections when the listener kept the last request body, which refers back to it)."""
    import gc
    import weakref

    p = await proxy(harness)
    server = p._data_server
    assert server is not None
    gc.collect()
    gc.disable()
    try:
        for body in (BODY, b""):  # a request with a body, one without
            c = await Client.open(p.data_port)
            head = post_head(len(body)).replace(b"Expect: 100-continue\r\n", b"")
            await until(lambda: len(server.connections) == 1)
            refs = [weakref.ref(conn) for conn in server.connections]
            await c.send(head.replace(b"Host: shop\r\n", b"Host: shop\r\nConnection: close\r\n"))
            await c.send(body)
            assert (await c.answer())[0] == 200
            assert await c.closed_by_peer()
            c.close()
            await until(lambda: not server.connections)
            await until(lambda: all(r() is None for r in refs))  # noqa: B023
    finally:
        gc.enable()
