"""Listener limits: connection cap, requests per connection, header count, pipelining,
and the refusal to run on aiohttp's pure-Python parser."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import yaml

from .conftest import SYSTEMS, Harness, raw_request


async def limited(h: Harness, **listen: Any) -> int:
    b = await h.backend("pay", "tokopedia")
    p = await h.proxy(
        {
            "listen": {"host": "127.0.0.1", "port": 0, **listen},
            "clusters": {"pay": {"system": "tokopedia", "endpoints": [b.url]}},
            "routes": [{"name": "all", "match": {}, "category": "promotion", "to": "pay"}],
        }
    )
    return p.data_port


async def test_connections_beyond_the_cap_are_closed_and_counted(harness: Harness) -> None:
    port = await limited(harness, max_connections=3)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    # Each held connection is known to the proxy once it answered a request on it.
    for reader, writer in held:
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # closed without an answer
    writer.close()
    metrics = harness.proxies[0].services.metrics
    assert (
        metrics.registry.get_sample_value(
            "jalur_requests_rejected_total", {"reason": "max_connections"}
        )
        == 1
    )
    _, w0 = held.pop()
    w0.close()
    await w0.wait_closed()
    async with asyncio.timeout(5):
        while True:  # poll with a deadline until the proxy has seen the close
            r = await raw_request(port, b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if r.status == 200:
                break
    for _, w in held:
        w.close()


async def test_connection_closes_after_max_requests(harness: Harness) -> None:
    port = await limited(harness, max_requests_per_connection=2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses = []
    for i in range(2):
        writer.write(f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        statuses.append(head.split(b" ")[1])
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # the proxy closed after the second
    writer.close()
    assert statuses == [b"200", b"200"]


async def test_too_many_headers_is_a_json_400(harness: Harness) -> None:
    port = await limited(harness, max_headers=10)
    headers = "".join(f"X-H{i}: v\r\n" for i in range(20))
    r = await raw_request(port, f"GET / HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    assert r.status == 400
    assert orjson.loads(r.body)["reason"] == "malformed"
    assert not harness.backends["pay"].received


async def test_pipelined_requests_are_all_answered_in_order(harness: Harness) -> None:
    port = await limited(harness, max_pipelined=4)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"".join(f"GET /p{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(20)))
    await writer.drain()
    paths = []
    async with asyncio.timeout(10):
        for _ in range(20):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            body = orjson.loads(await reader.readexactly(length))
            paths.append(body["path"])
    writer.close()
    assert paths == [f"/p{i}" for i in range(20)]


async def test_refuses_to_start_on_the_python_parser(tmp_path: Path) -> None:
    conf: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "systems": SYSTEMS,
        "clusters": {"pay": {"system": "tokopedia", "endpoints": ["http://127.0.0.1:9"]}},
        "routes": [{"name": "all", "match": {}, "category": "promotion", "to": "pay"}],
    }
    path = tmp_path / "jalur.yaml"
    path.write_text(yaml.safe_dump(conf))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", str(path),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        env={**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}, cwd=str(tmp_path),
    )  # fmt: skip
    async with asyncio.timeout(20):
        _, err = await proc.communicate()
    assert proc.returncode == 1
    assert b"C HTTP parser is not in use" in err
