"""Resource isolation against slow and bloated clients (issue #19), as deployed: `jalur run`
as a subprocess, raw sockets for the attackers, real payments alongside.

- Request buffering: a bounded payment body is read whole before an upstream connection or
  a cluster slot is taken, so 1,000 clients dripping payment bodies hold nothing of the
  commerce cluster; ``listen.body_timeout`` ends them all in bounded time.
- Head size: ``listen.max_head_bytes`` bounds a request head as a whole; 600 connections
  holding unfinished maximal heads cost a bounded amount of memory, returned when they go.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import Harness
from .test_hostile_clients import Jalur, jalur_run, poll, raise_fd_limit

DRIPPERS = 1000
DRIP_EVERY = 1.0  # seconds between two bytes of one dripping client
BODY_IDLE = 3.0  # listen.body_idle_timeout: a dripper stays within it
BODY_TIMEOUT = 5.0  # listen.body_timeout: ... but not within this
PAYMENTS = 40  # real payments made while the drippers hold their connections
HEADS = 600
# What 600 unfinished 60 KiB heads may add to the proxy (the bytes themselves are 35 MiB;
# before max_head_bytes, 600 heads of ~800 KB took the proxy from 495 to 1,140 MiB).
HEADS_RSS_BUDGET = 96 * 1024 * 1024
# What may stay of that once the connections are gone.
HEADS_RSS_LEFT = 24 * 1024 * 1024


def payment_config(backend: str, **listen: Any) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0, **listen},
        "clusters": {
            "tokopedia-pay": {
                "system": "tokopedia",
                "endpoints": [backend],
                # A small cluster: 1,000 drippers would hold it many times over.
                "max_connections": 64,
                "max_pending": 64,
                "max_requests": 128,
            }
        },
        "routes": [
            {
                "name": "payment",
                "match": {"prefix": "/api/payment"},
                "category": "payment",
                "to": "tokopedia-pay",
            }
        ],
    }


async def drip(port: int, results: list[bytes]) -> None:
    """A payment whose 100-byte body arrives one byte every DRIP_EVERY seconds; records the
    answer (bounded: stops when answered, or after 100 bytes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /api/payment HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n"
        )
        answer = asyncio.ensure_future(reader.read(65536))
        for _ in range(100):
            writer.write(b"x")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            done, _ = await asyncio.wait({answer}, timeout=DRIP_EVERY)
            if done:
                break
        results.append(await answer)
    except ConnectionError:
        results.append(b"reset")
    finally:
        writer.close()


async def pay(s: aiohttp.ClientSession, port: int, i: int) -> int:
    async with s.post(
        f"http://127.0.0.1:{port}/api/payment/{i}", json={"amount": 125000, "order": i}
    ) as r:
        await r.read()
        return r.status


async def test_dripping_payment_uploads_do_not_starve_real_payments(
    harness: Harness, tmp_path: Path
) -> None:
    raise_fd_limit(2 * DRIPPERS + 1000)
    b = await harness.backend("tokopedia-pay", "tokopedia")
    conf = payment_config(
        b.url, body_idle_timeout=BODY_IDLE, body_timeout=BODY_TIMEOUT, header_read_timeout=30
    )
    async with jalur_run(tmp_path, conf) as j:
        results: list[bytes] = []
        started = time.monotonic()
        drippers = [asyncio.ensure_future(drip(j.data_port, results)) for _ in range(DRIPPERS)]
        try:
            # Every dripper is connected and has sent its head before payments start.
            await poll(lambda: j.fds() >= DRIPPERS, 20, "drippers connected")
            statuses = []
            async with aiohttp.ClientSession() as s:
                for i in range(PAYMENTS):
                    statuses.append(await pay(s, j.data_port, i))
            payments_took = time.monotonic() - started
            async with asyncio.timeout(BODY_TIMEOUT + 20):
                await asyncio.gather(*drippers)
            drip_took = time.monotonic() - started
        finally:
            for t in drippers:
                t.cancel()
        timeouts = await j.metric("jalur_requests_rejected_total", reason="body_timeout")
    print(
        f"{DRIPPERS} drippers: {PAYMENTS} payments answered {sorted(set(statuses))} within "
        f"{payments_took:.1f} s; every dripper answered within {drip_took:.1f} s "
        f"(body_timeout {BODY_TIMEOUT:g} s)"
    )
    assert statuses == [200] * PAYMENTS
    assert len(results) == DRIPPERS
    cut = [r for r in results if r.startswith(b"HTTP/1.1 408 ")]
    assert len(cut) == DRIPPERS, {r[:40] for r in results}
    assert all(b'"reason":"body_timeout"' in r for r in cut)
    assert timeouts == DRIPPERS
    # None of them reached the back end: only the real payments did.
    assert len(b.received) == PAYMENTS


def unfinished_head(size: int) -> bytes:
    """A request head of ``size`` bytes that never ends (no blank line), in header lines
    each within max_field_size."""
    head = b"GET /api/payment HTTP/1.1\r\nHost: shop\r\n"
    i = 0
    while len(head) < size:
        line = b"X-Pad-%d: " % i
        head += line + b"a" * min(7000, size - len(head) - len(line) - 2) + b"\r\n"
        i += 1
    return head[:size]


async def hold(port: int, head: bytes, writers: list[asyncio.StreamWriter]) -> None:
    """Open a connection, send ``head`` (unfinished) and keep the connection."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writers.append(writer)
    writer.write(head)
    await writer.drain()


async def answer_of(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read(65536)
    finally:
        writer.close()


async def test_unfinished_maximal_heads_cost_bounded_memory_that_returns(
    harness: Harness, tmp_path: Path
) -> None:
    raise_fd_limit(2 * HEADS + 1000)
    b = await harness.backend("tokopedia-pay", "tokopedia")
    conf = payment_config(b.url, header_read_timeout=60)
    async with jalur_run(tmp_path, conf) as j:
        async with aiohttp.ClientSession() as s:
            assert await pay(s, j.data_port, 0) == 200
        base = j.rss()
        # Over the limit (the 100 headers of 8 KB): refused at once, 431.
        for _ in range(5):
            refused = await answer_of(j.data_port, unfinished_head(800_000))
            assert refused.startswith(b"HTTP/1.1 431 "), refused[:80]
            assert b'"reason":"head_too_large"' in refused
        writers: list[asyncio.StreamWriter] = []
        maximal = unfinished_head(64 * 1024 - 64)
        try:
            async with asyncio.timeout(60):
                for start in range(0, HEADS, 100):
                    await asyncio.gather(
                        *(hold(j.data_port, maximal, writers) for _ in range(start, start + 100))
                    )
            await poll(lambda: j.fds() >= HEADS, 20, "heads held")
            held = await settled_rss(j)  # every byte is in: RSS stops moving
            async with aiohttp.ClientSession() as s:
                assert await pay(s, j.data_port, 1) == 200  # still serving
        finally:
            for w in writers:
                w.close()
        await poll(lambda: j.fds() < HEADS // 10, 20, "connections closed")
        with contextlib.suppress(AssertionError):  # the assertion below says by how much
            await poll(lambda: j.rss() - base < HEADS_RSS_LEFT, 10, "memory returned")
        after = j.rss()
        rejected = await j.metric("jalur_requests_rejected_total", reason="head_too_large")
    print(
        f"{HEADS} unfinished {len(maximal)}-byte heads: RSS {base / 2**20:.1f} -> "
        f"{held / 2**20:.1f} MiB held -> {after / 2**20:.1f} MiB after they closed"
    )
    assert rejected == 5
    assert held - base < HEADS_RSS_BUDGET
    assert after - base < HEADS_RSS_LEFT


async def settled_rss(j: Jalur) -> int:
    """RSS once two samples 0.2 s apart differ by under 1 MiB (at most 10 s)."""
    last = j.rss()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # sampling interval of a measurement, not synchronisation
        now = j.rss()
        if abs(now - last) < 2**20:
            return now
        last = now
    return last
