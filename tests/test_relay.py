"""The response relay writes a small answer's head and body together, yet never holds the
head back waiting for body bytes the upstream has not sent."""

from __future__ import annotations

import asyncio

from .conftest import Harness, RawUpstream, cluster, one_route, raw_upstream, read_request


async def test_head_is_relayed_before_a_slow_body(harness: Harness) -> None:
    release = asyncio.Event()

    async def handler(
        up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: 1\r\n\r\n")
        await writer.drain()
        await release.wait()  # the body only once the client has seen the head
        writer.write(b"hello")
        await writer.drain()

    up = await raw_upstream(handler)
    p = await harness.proxy(one_route({"raw": cluster("tokopedia", up.url)}, "raw"))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.data_port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"x-up: 1" in head.lower()
        release.set()
        async with asyncio.timeout(5):
            assert await reader.readexactly(5) == b"hello"
    finally:
        release.set()
        writer.close()
        up.server.close()


async def test_small_answer_and_empty_answer_are_relayed_whole(harness: Harness) -> None:
    async def handler(
        up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            line, _, _ = await read_request(reader)
            if line.startswith("GET /empty"):
                writer.write(b"HTTP/1.1 204 No Content\r\nX-Up: 2\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    up = await raw_upstream(handler)
    p = await harness.proxy(one_route({"raw": cluster("tokopedia", up.url)}, "raw"))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.data_port)
    try:
        async with asyncio.timeout(5):
            for _ in range(3):  # keep-alive: each answer is complete and framed
                writer.write(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                assert await reader.readexactly(2) == b"ok"
                writer.write(b"GET /empty HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 204")
                assert b"x-up: 2" in head.lower()
    finally:
        writer.close()
        up.server.close()
