"""Listener limits: connection cap, requests per connection, header count, pipelining,
and the refusal to run on aiohttp's pure-Python parser."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from proxy import accept
from proxy.server import DataListener, ProxyServer

from .conftest import (
    SYSTEMS,
    Harness,
    RawUpstream,
    descriptors_left,
    raw_request,
    raw_upstream,
    until,
)
from .wire import Conversation, WireUpstream, converse, wire_upstream

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


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


async def test_out_of_descriptors_pauses_accepting_then_serves_the_queued_clients(
    harness: Harness,
) -> None:
    """With no file descriptor left the proxy cannot accept: it counts that once, stops
    polling the listener for a second (the kernel keeps the connections queued) and then
    serves every queued client; nothing else is disturbed."""
    port = await limited(harness)
    ok = await raw_request(port, b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ok.status == 200
    metrics = harness.proxies[0].services.metrics

    def paused() -> float:
        value = metrics.registry.get_sample_value(
            "jalur_requests_rejected_total", {"reason": "accept_failed"}
        )
        return value or 0.0

    queued = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    with descriptors_left(0):
        await until(lambda: paused() == 1)
    for sock in queued:
        sock.setblocking(False)
    clients = [await asyncio.open_connection(sock=sock) for sock in queued]
    for _, writer in clients:
        writer.write(b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(accept.ACCEPT_RETRY_DELAY + 5):
        for reader, writer in clients:
            assert (await reader.read()).startswith(b"HTTP/1.1 200")
            writer.close()
    assert paused() == 1


async def test_an_ipv6_listener_serves_ipv6_only(harness: Harness) -> None:
    """``listen.host: ::1`` serves over IPv6; the socket is IPv6-only (as NGINX's default), so
    the same port on 127.0.0.1 is not Jalur's."""
    port = await limited(harness, host="::1")
    reader, writer = await asyncio.open_connection("::1", port)
    writer.write(b"GET /v6 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(5):
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


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


# -- body limits ------------------------------------------------------------------------

SMALL = 100  # routes[small].max_body_bytes
DEFAULT = 1000  # listen.max_body_bytes


async def body_limited(h: Harness, up: WireUpstream, **listen: Any) -> ProxyServer:
    return await h.proxy(
        {
            "listen": {"host": "127.0.0.1", "port": 0, "max_body_bytes": DEFAULT, **listen},
            "clusters": {
                "c": {"system": "tokopedia", "endpoints": [up.url]},
                "pay": {"system": "tokopedia", "endpoints": [up.url]},
            },
            "routes": [
                {
                    "name": "small",
                    "match": {"prefix": "/small"},
                    "category": "promotion",
                    "to": "c",
                    "max_body_bytes": SMALL,
                },
                {"name": "pay", "match": {"prefix": "/pay"}, "category": "payment", "to": "pay"},
                {"name": "all", "match": {"prefix": "/"}, "category": "promotion", "to": "c"},
            ],
        }
    )


def rejected(p: ProxyServer, reason: str) -> float:
    value = p.services.metrics.registry.get_sample_value(
        "jalur_requests_rejected_total", {"reason": reason}
    )
    return 0.0 if value is None else value


def upstream_errors(p: ProxyServer) -> float:
    reg = p.services.metrics.registry
    return sum(
        s.value
        for metric in reg.collect()
        if metric.name == "jalur_upstream_errors"
        for s in metric.samples
        if s.name == "jalur_upstream_errors_total"
    )


def post(target: str, length: int, body: bytes = b"", extra: str = "") -> bytes:
    head = f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n{extra}\r\n"
    return head.encode() + body


def assert_json_error(talk: Conversation, status: int, reason: str) -> None:
    assert talk.statuses == [status], talk.raw[:300]
    answer = talk.responses[0]
    body = orjson.loads(answer.body)
    assert body["reason"] == reason
    assert body["error"]
    assert body["request_id"] == answer.header("x-request-id")
    assert talk.closed, "the connection stayed open after the refusal"


async def test_a_content_length_over_the_limit_is_413_before_any_upstream_connection(
    harness: Harness,
) -> None:
    up = await wire_upstream()
    p = await body_limited(harness, up)
    over_route = await converse(
        p.data_port, post("/small", SMALL + 1, b"x" * (SMALL + 1)), linger=3
    )
    assert_json_error(over_route, 413, "body_too_large")
    over_listener = await converse(p.data_port, post("/big", DEFAULT + 1), linger=3)
    assert_json_error(over_listener, 413, "body_too_large")
    assert up.connections == 0
    assert not up.received
    assert rejected(p, "body_too_large") == 2
    # At the limit it is forwarded, on each route.
    at_route = await converse(p.data_port, post("/small", SMALL, b"x" * SMALL))
    at_listener = await converse(p.data_port, post("/big", DEFAULT, b"y" * DEFAULT))
    assert at_route.statuses == at_listener.statuses == [200]
    assert [len(m.body) for m in up.messages] == [SMALL, DEFAULT]
    up.close()


async def test_a_chunked_body_growing_past_the_limit_is_cut(harness: Harness) -> None:
    up = await wire_upstream()
    p = await body_limited(harness, up, buffer_body_bytes=0)  # streamed, not buffered
    reader, writer = await asyncio.open_connection("127.0.0.1", p.data_port)
    head = b"POST /small HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    writer.write(head + b"3c\r\n" + b"a" * 60 + b"\r\n")
    await up.until(lambda u: b"a" * 60 in u.received)  # the upload is under way upstream
    writer.write(b"3c\r\n" + b"b" * 60 + b"\r\n")  # 120 bytes: over the route's 100
    async with asyncio.timeout(5):
        answer = await reader.read()  # the 413, then the proxy closes
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"reason":"body_too_large"' in answer
    await up.until(lambda u: u.closed == 1)  # the upstream request was aborted
    assert b"b" * 60 not in up.received  # nothing past the limit
    assert not up.messages  # never a whole request
    assert rejected(p, "body_too_large") == 1
    assert upstream_errors(p) == 0  # the client's fault, not the upstream's
    up.close()


async def test_a_chunked_body_past_the_limit_of_a_payment_route_is_cut_before_upstream(
    harness: Harness,
) -> None:
    """The idempotency gate reads the body first: the limit holds there too."""
    up = await wire_upstream()
    p = await body_limited(harness, up, max_body_bytes=SMALL)
    chunk = b"64\r\n" + b"z" * 100 + b"\r\n"
    head = (
        b"POST /pay HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    talk = await converse(p.data_port, head + chunk + chunk + b"0\r\n\r\n", linger=3)
    assert_json_error(talk, 413, "body_too_large")
    assert up.connections == 0
    assert rejected(p, "body_too_large") == 1


async def test_a_stalled_body_is_408_and_the_upstream_request_aborted(harness: Harness) -> None:
    up = await wire_upstream()
    p = await body_limited(harness, up, body_idle_timeout=0.3, buffer_body_bytes=0)
    talk = await converse(p.data_port, post("/x", 50, b"only ten b"), linger=3)
    assert_json_error(talk, 408, "body_timeout")
    await up.until(lambda u: u.connections == 1 and u.closed == 1)
    assert not up.messages  # the upstream never got a whole request
    assert rejected(p, "body_timeout") == 1
    assert upstream_errors(p) == 0
    up.close()


async def test_a_stalled_buffered_body_is_408_without_any_upstream_connection(
    harness: Harness,
) -> None:
    """A bounded body is read whole before an upstream connection is taken (issue #19):
    a stalled one never reaches the upstream at all."""
    up = await wire_upstream()
    p = await body_limited(harness, up, body_idle_timeout=0.3)
    talk = await converse(p.data_port, post("/x", 50, b"only ten b"), linger=3)
    assert_json_error(talk, 408, "body_timeout")
    assert up.connections == 0
    assert rejected(p, "body_timeout") == 1


async def test_a_body_dripping_within_the_idle_timeout_is_cut_by_body_timeout(
    harness: Harness,
) -> None:
    """One byte every 0.2 s never trips body_idle_timeout (0.5 s); body_timeout (1 s) ends
    it, buffered or streamed."""
    for buffered in (65536, 0):
        up = await wire_upstream()
        p = await body_limited(
            harness, up, body_idle_timeout=0.5, body_timeout=1, buffer_body_bytes=buffered
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", p.data_port)
        writer.write(post("/x", 100))
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = asyncio.ensure_future(reader.read())
        for _ in range(50):  # bounded: 10 s of dripping at most
            writer.write(b"x")
            done, _ = await asyncio.wait({answer}, timeout=0.2)
            if done:
                break
        took = loop.time() - started
        writer.close()
        data = answer.result()
        assert data.startswith(b"HTTP/1.1 408 "), data[:100]
        assert b"body_timeout" in data
        assert 0.9 < took < 3, took
        assert not up.messages
        up.close()


async def test_expect_100_continue_is_answered_after_routing(harness: Harness) -> None:
    up = await wire_upstream()
    p = await body_limited(harness, up)
    # Over the route's limit: 413 at once, no 100 Continue, the body never invited.
    refused = await converse(
        p.data_port, post("/small", SMALL * 10, extra="Expect: 100-continue\r\n"), linger=3
    )
    assert not refused.raw.startswith(b"HTTP/1.1 100")
    assert_json_error(refused, 413, "body_too_large")
    assert up.connections == 0
    # Within it (and through the idempotency gate, which reads the body first): the
    # client waits for 100 Continue before sending the body.
    for target, extra in (("/small", ""), ("/pay", "Idempotency-Key: k2\r\n")):
        reader, writer = await asyncio.open_connection("127.0.0.1", p.data_port)
        writer.write(post(target, 5, extra=extra + "Expect: 100-continue\r\n"))
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"hello")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        writer.close()
    assert [m.body for m in up.messages] == [b"hello", b"hello"]
    assert all(m.header("Expect") == [] for m in up.messages)
    up.close()


async def test_a_body_over_the_limit_after_the_answer_started_aborts_the_client(
    harness: Harness,
) -> None:
    """The upstream answers while the upload goes on; the upload then passes the limit:
    the head is out, so the client connection is cut (never a clean short response)."""
    connections: list[int] = []
    upstream_eof = asyncio.Event()

    async def early_answer(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        connections.append(1)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        while await reader.read(65536):
            pass
        upstream_eof.set()

    raw = await raw_upstream(early_answer)
    p = await harness.proxy(
        {
            "clusters": {"c": {"system": "tokopedia", "endpoints": [raw.url]}},
            "routes": [
                {
                    "name": "all",
                    "match": {},
                    "category": "promotion",
                    "to": "c",
                    "max_body_bytes": SMALL,
                    "buffer_body_bytes": 0,  # streamed: the answer starts mid-upload
                }
            ],
        }
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", p.data_port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
    got = b""
    async with asyncio.timeout(5):
        # One byte at a time until the relayed head arrives (the proxy notices the
        # upstream's answer between two pieces of the upload).
        while b"first" not in got:
            try:
                async with asyncio.timeout(0.05):
                    got += await reader.read(65536)
            except TimeoutError:
                writer.write(b"1\r\na\r\n")
        assert got.startswith(b"HTTP/1.1 200 ")
        writer.write(b"64\r\n" + b"b" * 100 + b"\r\n")
        try:
            while chunk := await reader.read(65536):
                got += chunk
        except ConnectionResetError:
            pass
        await upstream_eof.wait()
    writer.close()
    assert not got.endswith(b"0\r\n\r\n")  # cut, not a clean end of the response
    assert len(connections) == 1
    assert rejected(p, "body_too_large") == 1
    assert upstream_errors(p) == 0
    raw.server.close()


async def test_a_head_not_received_in_time_is_a_counted_json_408(harness: Harness) -> None:
    port = await limited(harness, header_read_timeout=0.3)
    talk = await converse(port, b"GET /x HTTP/1.1\r\nHost: x\r\nX-Half: ", linger=3)
    assert_json_error(talk, 408, "header_timeout")
    assert rejected(harness.proxies[-1], "header_timeout") == 1


async def test_a_burst_of_idle_connections_is_all_accepted(harness: Harness) -> None:
    """400 clients connect at once and send nothing: the listen backlog (NGINX's 511) holds
    them until accepted. (With aiohttp's default of 128, the kernel drops the final ACK of
    the overflow and those idle clients are never accepted.)"""
    port = await limited(harness, header_read_timeout=30)
    server = harness.proxies[-1]._data_server
    assert isinstance(server, DataListener)
    results = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", port) for _ in range(400))
    )
    try:
        await until(lambda: server.open_connections == 400)
    finally:
        for _, writer in results:
            writer.close()


async def test_max_head_bytes_bounds_the_head_not_the_body(harness: Harness) -> None:
    """A head just within ``max_head_bytes`` followed in the same write by a body many
    times that size, and a request pipelined behind it: all served. One header line over
    the limit: 431 and close (issue #19)."""
    up = await wire_upstream()
    p = await body_limited(harness, up, max_head_bytes=4096, max_body_bytes=1_000_000)
    pad = "X-Pad: " + "p" * 3900 + "\r\n"
    big = post("/x", 300_000, b"b" * 300_000, extra=pad)
    assert big.index(b"\r\n\r\n") + 4 < 4096
    talk = await converse(p.data_port, big + b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n", responses=2)
    assert talk.statuses == [200, 200], talk.raw[:300]
    assert [len(m.body) for m in up.messages] == [300_000, 0]
    over = await converse(p.data_port, post("/x", 0, extra=pad + pad), linger=3)
    assert_json_error(over, 431, "head_too_large")
    assert rejected(p, "head_too_large") == 1
    up.close()
