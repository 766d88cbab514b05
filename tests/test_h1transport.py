"""H1Transport on real loopback sockets: framing, pooling, timeouts, errors, streaming.

The transport-level tests run every scenario on both loops the proxy can use (stdlib
asyncio and uvloop), through the ``run`` fixture. The end-to-end tests at the bottom put a
real ``ProxyServer`` in front (the shared harness), whose clusters use ``H1Transport`` (the
default upstream transport; ``tests/test_proxy.py`` and the other proxy suites run on it
too).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy import config as cfg
from proxy import errors
from proxy.demo.backend import BackendSpec, start_backend
from proxy.h1transport import (
    READ_HIGH_WATER,
    H1Transport,
    _Response,
    connection_reused,
    request_bytes_sent,
)
from proxy.upstream import Endpoint, Transport

from .conftest import Harness, Runner, free_port, until

T = TypeVar("T")
MiB = 1024 * 1024


# -- a scripted upstream -------------------------------------------------------------

Handler = Callable[["Upstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A raw asyncio server on loopback that counts connections and records requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self.requests: list[tuple[str, list[tuple[str, str]], bytes]] = []
        self.closed_by_peer = asyncio.Event()  # a connection saw EOF from the client
        self.arrived = asyncio.Condition()  # notified on every request read
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Upstream:
        self.server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint.parse(f"http://127.0.0.1:{self.port}")

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def read_request(
        self, reader: asyncio.StreamReader
    ) -> tuple[str, list[tuple[str, str]], bytes]:
        """One request (Content-Length or chunked body), recorded."""
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = head.split("\r\n")
        headers = [(k, v.strip()) for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)]
        names = {k.lower(): v for k, v in headers}
        body = b""
        if names.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(data[:-2])
            body = b"".join(parts)
        elif "content-length" in names:
            body = await reader.readexactly(int(names["content-length"]))
        req = (lines[0], headers, body)
        self.requests.append(req)
        async with self.arrived:
            self.arrived.notify_all()
        return req

    async def wait_eof(self, reader: asyncio.StreamReader) -> None:
        """Block until the client closes this connection."""
        try:
            while await reader.read(65536):
                pass
        finally:
            self.closed_by_peer.set()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def answering(*responses: bytes) -> Handler:
    """Keep-alive upstream: answers request i on a connection with responses[i % n]."""

    async def handler(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        i = 0
        while True:
            try:
                await up.read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                up.closed_by_peer.set()
                return
            w.write(responses[i % len(responses)])
            await w.drain()
            i += 1

    return handler


def once_then(response: bytes, after: str) -> Handler:
    """Answer one request with ``response`` (maybe partial), then ``after``: "close"
    (FIN), "reset" (RST) or "hang" (keep the socket, send nothing more)."""

    async def handler(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.read_request(reader)
        if response:
            w.write(response)
            await w.drain()
        if after == "reset":
            _reset(w)
        elif after == "hang":
            await up.wait_eof(reader)

    return handler


def _reset(w: asyncio.StreamWriter) -> None:
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


def transport_for(
    port: int,
    *,
    connect: float = 2.0,
    head: float = 5.0,
    idle: float = 5.0,
    max_connections: int = 16,
    **kw: Any,
) -> tuple[H1Transport, Endpoint]:
    url = f"http://127.0.0.1:{port}"
    spec = cfg.Cluster(
        system="s",
        endpoints=[url],
        timeouts=cfg.Timeouts(connect=connect, response_headers=head, idle=idle),
        max_connections=max_connections,
    )
    return H1Transport(spec, cfg.Listen(), **kw), Endpoint.parse(url)


@contextlib.asynccontextmanager
async def scripted(
    handler: Handler, **transport: Any
) -> AsyncIterator[tuple[Upstream, H1Transport, Endpoint]]:
    """A scripted upstream and a transport to it (``transport_for``'s options), both closed
    when the block ends, whatever happened in it."""
    up = await Upstream(handler).start()
    t, ep = transport_for(up.port, **transport)
    try:
        yield up, t, ep
    finally:
        await t.close()
        up.close()


def hdrs(**extra: str) -> CIMultiDict[str]:
    h: CIMultiDict[str] = CIMultiDict({"Host": "upstream.test"})
    for k, v in extra.items():
        h.add(k.replace("_", "-"), v)
    return h


async def read_all(resp: _Response) -> bytes:
    parts: list[bytes] = []
    for _ in range(100_000):
        chunk = await resp.read_chunk()
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
    raise AssertionError("body did not end")


async def get(
    t: H1Transport,
    ep: Endpoint,
    target: str = "/",
    method: str = "GET",
    headers: CIMultiDict[str] | None = None,
    body: AsyncIterator[bytes] | None = None,
) -> tuple[_Response, bytes]:
    resp = await t.send(ep, method, target, headers if headers is not None else hdrs(), body)
    data = await read_all(resp)
    resp.release()
    return resp, data


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def _static_check(t: H1Transport) -> Transport:
    return t  # mypy: H1Transport satisfies upstream.Transport


# -- framing -------------------------------------------------------------------------


def test_content_length_body_and_duplicate_headers(run: Runner) -> None:
    async def scenario() -> None:
        async with scripted(
            answering(
                b"HTTP/1.1 201 Made It\r\nContent-Length: 5\r\nSet-Cookie: a=1\r\n"
                b"X-Cafe: \xc3\xa9t\xc3\xa9\r\nSet-Cookie: b=2\r\n\r\nhello"
            )
        ) as (_up, t, ep):
            resp, body = await get(t, ep)
            assert (resp.status, resp.reason, body) == (201, "Made It", b"hello")
            assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
            assert resp.header_items()[0] == ("Content-Length", "5")
            assert [k for k, _ in resp.header_items()] == [
                "Content-Length",
                "Set-Cookie",
                "X-Cafe",
                "Set-Cookie",
            ]
            assert resp.headers["x-cafe"] == "été"  # UTF-8 values, as aiohttp decodes them
            assert resp.request_bytes_sent > 0

    run(scenario())


def test_chunked_body_split_anywhere_then_reuse(run: Runner) -> None:
    pieces = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"lo\r\n6\r",
        b"\n world\r\n0\r\n",
        b"X-Trailer: t\r\n\r\n",
    ]

    async def handler(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await up.read_request(reader)
            for p in pieces:
                w.write(p)
                await w.drain()
        await up.wait_eof(reader)

    async def scenario() -> None:
        async with scripted(handler) as (up, t, ep):
            for _ in range(2):
                resp, body = await get(t, ep)
                assert body == b"hello world"
                assert "X-Trailer" not in resp.headers
            assert up.accepted == 1

    run(scenario())


def test_close_delimited_body_ends_with_the_connection_and_is_not_reused(run: Runner) -> None:
    async def scenario() -> None:
        async with scripted(once_then(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", "close")) as (
            up,
            t,
            ep,
        ):
            for _ in range(2):
                _, body = await get(t, ep)
                assert body == b"until the end"
            assert up.accepted == 2

    run(scenario())


def test_head_204_304_have_no_body_and_keep_the_connection_in_step(run: Runner) -> None:
    async def handler(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await up.read_request(reader)
            if line.startswith("HEAD"):
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            elif " /204 " in line:
                w.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif " /304 " in line:
                w.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\nETag: x\r\n\r\n")
            else:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()

    async def scenario() -> None:
        async with scripted(handler) as (up, t, ep):
            for method, target, status in (
                ("HEAD", "/h", 200),
                ("GET", "/204", 204),
                ("GET", "/304", 304),
                ("HEAD", "/h", 200),
            ):
                resp, body = await get(t, ep, target, method)
                assert (resp.status, body) == (status, b"")
            resp, body = await get(t, ep, "/x")
            assert body == b"ok"
            assert up.accepted == 1

    run(scenario())


def test_a_body_after_a_head_answer_takes_the_connection_out_of_the_pool(run: Runner) -> None:
    """An upstream that sends a body after a HEAD answer is out of step: those bytes would
    be read as the next answer. The connection is not pooled; the next request gets its own."""

    async def handler(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await up.read_request(reader)
            if line.startswith("HEAD"):
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nHTTP/1.1 ")
            else:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()

    async def scenario() -> None:
        async with scripted(handler) as (up, t, ep):
            resp, body = await get(t, ep, "/h", "HEAD")
            assert (resp.status, body) == (200, b"")
            resp, body = await get(t, ep, "/x")
            assert body == b"ok"
            assert up.accepted == 2

    run(scenario())


def test_interim_responses_are_skipped(run: Runner) -> None:
    async def scenario() -> None:
        async with scripted(
            answering(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"
            )
        ) as (up, t, ep):
            for _ in range(2):
                resp, body = await get(t, ep, body=chunks(b"x"), headers=hdrs(Content_Length="1"))
                assert (resp.status, body) == (200, b"body")
                assert "Link" not in resp.headers
            assert up.accepted == 1

    run(scenario())


# -- the request ---------------------------------------------------------------------


def test_request_head_is_as_given_and_host_added_only_when_absent(run: Runner) -> None:
    async def scenario() -> None:
        async with scripted(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) as (
            up,
            t,
            ep,
        ):
            h = hdrs(X_A="1", Cookie="c=1")
            h.add("X-A", "2")
            await get(t, ep, "/p?q=1", headers=h)
            await get(t, ep, "/none", headers=CIMultiDict({"X-B": "\u00e9"}))
            (line1, h1, _), (line2, h2, _) = up.requests
            assert line1 == "GET /p?q=1 HTTP/1.1"
            assert h1 == [("Host", "upstream.test"), ("X-A", "1"), ("Cookie", "c=1"), ("X-A", "2")]
            assert line2 == "GET /none HTTP/1.1"
            assert h2 == [("Host", f"127.0.0.1:{up.port}"), ("X-B", "\u00c3\u00a9")]  # UTF-8 bytes

    run(scenario())


def test_bodies_content_length_raw_chunked_otherwise(run: Runner) -> None:
    async def scenario() -> None:
        async with scripted(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) as (
            up,
            t,
            ep,
        ):
            await get(
                t, ep, "/cl", "PUT", hdrs(Content_Length="11"), chunks(b"hello", b"", b" world")
            )
            await get(t, ep, "/te", "POST", hdrs(), chunks(b"hello", b" ", b"chunked"))
            await get(t, ep, "/empty", "POST", hdrs(), chunks())
            await get(t, ep, "/zero", "POST", hdrs(Content_Length="0"))
            cl, te, empty, zero = up.requests
            assert cl[2] == b"hello world"
            assert ("Content-Length", "11") in cl[1]
            assert te[2] == b"hello chunked"
            assert ("Transfer-Encoding", "chunked") in te[1]
            assert empty[2] == b""
            assert ("Transfer-Encoding", "chunked") in empty[1]
            assert zero[1] == [("Host", "upstream.test"), ("Content-Length", "0")]
            assert up.accepted == 1

    run(scenario())


@pytest.mark.parametrize(
    "headers",
    [{"X-Evil": "a\r\nX-Injected: 1"}, {"X-Evil": "a\nb"}, {"X-Evil": "a\rb"}],
)
def test_line_breaks_in_headers_are_refused_before_connecting(
    run: Runner, headers: dict[str, str]
) -> None:
    async def scenario() -> None:
        async with scripted(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) as (
            up,
            t,
            ep,
        ):
            h = hdrs()
            h.update(headers)
            with pytest.raises(errors.BadRequest):
                await t.send(ep, "GET", "/", h, None)
            with pytest.raises(errors.BadRequest):
                await t.send(ep, "GET", "/a\r\nX: 1", hdrs(), None)
            assert up.accepted == 0
            assert t.open_connections == 0

    run(scenario())


def test_body_not_matching_content_length_fails_and_discards(run: Runner) -> None:
    async def handler(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await up.wait_eof(reader)

    async def scenario() -> None:
        async with scripted(handler) as (_up, t, ep):
            for body in (chunks(b"abc"), chunks(b"abcdef", b"xyz")):
                with pytest.raises(errors.UpstreamError, match="Content-Length") as info:
                    await t.send(ep, "POST", "/", hdrs(Content_Length="5"), body)
                assert type(info.value) is errors.UpstreamError
                assert t.open_connections == 0

    run(scenario())


def test_failing_request_body_becomes_an_upstream_error(run: Runner) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"abc"
        raise ConnectionResetError("client went away")

    async def handler(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.wait_eof(reader)

    async def scenario() -> None:
        async with scripted(handler) as (_up, t, ep):
            with pytest.raises(errors.UpstreamError, match="request body failed") as info:
                await t.send(ep, "POST", "/", hdrs(), broken())
            assert isinstance(info.value.__cause__, ConnectionResetError)
            assert request_bytes_sent(info.value) > 0
            assert t.open_connections == 0

    run(scenario())


def test_early_response_while_uploading_is_returned_and_not_reused(run: Runner) -> None:
    async def handler(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno")
        await w.drain()
        await up.wait_eof(reader)  # never reads the body

    async def endless() -> AsyncIterator[bytes]:
        block = b"u" * 65536
        for _ in range(100_000):  # far more than the socket buffers hold
            yield block

    async def scenario() -> None:
        async with scripted(handler, idle=30) as (up, t, ep):
            resp = await t.send(ep, "POST", "/", hdrs(), endless())
            assert resp.status == 413
            assert await read_all(resp) == b"no"
            resp.release()  # the upload is unfinished: the connection must go
            assert t.open_connections == 0
            async with asyncio.timeout(5):
                await up.closed_by_peer.wait()

    run(scenario())


def test_full_duplex_upload_continues_after_an_early_response_head(run: Runner) -> None:
    size = 8 * MiB  # far more than the socket buffers: the head arrives mid-upload

    async def handler(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nea")
        await w.drain()
        body = await reader.readexactly(size)  # the whole body, while answering
        up.requests.append(("body", [], hashlib.sha256(body).digest()))
        w.write(b"rly")
        await w.drain()
        await up.wait_eof(reader)

    async def upload() -> AsyncIterator[bytes]:
        for i in range(size // 65536):
            yield bytes([i % 256]) * 65536

    async def scenario() -> None:
        async with scripted(handler) as (up, t, ep):
            resp = await t.send(ep, "PUT", "/", hdrs(Content_Length=str(size)), upload())
            assert resp.status == 200
            assert await read_all(resp) == b"early"
            expected = hashlib.sha256(b"".join(bytes([i % 256]) * 65536 for i in range(128)))
            assert up.requests[0][2] == expected.digest()
            assert resp.request_bytes_sent > size
            resp.release()
            assert t.open_connections == 0  # answered before the request ended: never pooled

    run(scenario())


def test_an_early_answer_is_not_pooled_even_when_the_upload_completes(run: Runner) -> None:
    """The upstream answers 401 after the first body chunk and never reads the rest; the
    rest of the upload (small) still completes into the socket buffers. Pooling that
    connection would let the leftover, client-chosen body bytes prefix the next request."""

    async def handler(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(5)
        w.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno")
        await w.drain()
        await up.wait_eof(reader)  # the rest of the body is never read

    async def scenario() -> None:
        async with scripted(handler, idle=30) as (up, t, ep):

            async def upload() -> AsyncIterator[bytes]:
                yield b"first"
                # Only once the transport has parsed the 401 (white-box: its connection's
                # response), so the answer provably came before the end of the request.
                await until(lambda: any(c._resp is not None for c in t._conns))
                yield b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

            resp = await t.send(ep, "POST", "/", hdrs(Content_Length="40"), upload())
            assert resp.status == 401
            assert await read_all(resp) == b"no"
            conn = resp._conn
            assert conn is not None
            await until(lambda: conn._write_done)  # the upload completes into the socket buffers
            resp.release()
            assert t.open_connections == 0
            assert t.idle_connections(ep) == 0
            async with asyncio.timeout(5):
                await up.closed_by_peer.wait()

    run(scenario())


# -- the pool ------------------------------------------------------------------------


def test_sequential_requests_share_one_connection(run: Runner) -> None:
    async def scenario() -> None:
        async with scripted(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) as (
            up,
            t,
            ep,
        ):
            reused = []
            for _ in range(50):
                resp, body = await get(t, ep)
                assert body == b"ok"
                reused.append(resp.connection_reused)
            assert up.accepted == 1
            assert reused == [False] + [True] * 49
            assert t.open_connections == 1
            assert t.idle_connections(ep) == 1

    run(scenario())


def test_demo_backend_keep_alive_and_payloads(run: Runner) -> None:
    async def scenario() -> None:
        runner, port = await start_backend(BackendSpec(cluster="c", system="s"))
        t, ep = transport_for(port)
        try:
            for i in range(20):
                resp, body = await get(t, ep, f"/echo/{i}")
                assert resp.status == 200
                assert b'"path":"/echo/' in body
            resp, body = await get(t, ep, "/_sim/bytes/300000")
            assert body == (bytes(range(256)) * 1200)[:300000]
            resp, body = await get(t, ep, "/_sim/status/204")
            assert (resp.status, body) == (204, b"")
            resp, _ = await get(t, ep, "/_sim/set-cookie/a/1")
            assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/"]
            assert t.open_connections == 1
        finally:
            await t.close()
            await runner.cleanup()

    run(scenario())


@pytest.mark.parametrize(
    ("response", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", True),
    ],
)
def test_connection_reuse_follows_keep_alive_rules(
    run: Runner, response: bytes, reused: bool
) -> None:
    async def scenario() -> None:
        up = await Upstream(answering(response)).start()  # keeps every connection open
        t, ep = transport_for(up.port)
        for _ in range(3):
            _, body = await get(t, ep)
            assert body == b"x"
        assert up.accepted == (1 if reused else 3)
        await t.close()
        up.close()

    run(scenario())


def test_release_before_the_end_of_the_body_discards_the_connection(run: Runner) -> None:
    async def scenario() -> None:
        async with scripted(
            answering(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"z" * 200000)
        ) as (up, t, ep):
            resp = await t.send(ep, "GET", "/", hdrs(), None)
            assert await resp.read_chunk()
            resp.release()
            assert t.open_connections == 0
            _, body = await get(t, ep)
            assert len(body) == 200000
            assert up.accepted == 2

    run(scenario())


def test_pool_never_exceeds_max_connections(run: Runner) -> None:
    async def scenario() -> None:
        gate = asyncio.Event()

        async def handler(
            up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
        ) -> None:
            while True:
                try:
                    await up.read_request(reader)
                except asyncio.IncompleteReadError:
                    return
                await gate.wait()
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await w.drain()

        up = await Upstream(handler).start()
        t, ep = transport_for(up.port, max_connections=2)
        tasks = [asyncio.ensure_future(get(t, ep, f"/{i}")) for i in range(7)]
        async with asyncio.timeout(5), up.arrived:
            await up.arrived.wait_for(lambda: len(up.requests) == 2)
        assert t.open_connections == 2
        assert up.accepted == 2
        gate.set()
        results = await asyncio.gather(*tasks)
        assert [body for _, body in results] == [b"ok"] * 7
        assert up.max_open == 2
        assert up.accepted == 2
        await t.close()
        up.close()

    run(scenario())


def test_waiting_for_a_free_connection_times_out_as_connect_timeout(run: Runner) -> None:
    async def scenario() -> None:
        async with scripted(once_then(b"", "hang"), max_connections=1, connect=0.2, head=30) as (
            up,
            t,
            ep,
        ):
            first = asyncio.ensure_future(t.send(ep, "GET", "/", hdrs(), None))
            async with asyncio.timeout(5), up.arrived:
                await up.arrived.wait_for(lambda: len(up.requests) == 1)
            with pytest.raises(errors.ConnectTimeout, match="max_connections 1") as info:
                await t.send(ep, "POST", "/", hdrs(), chunks(b"x"))
            assert request_bytes_sent(info.value) == 0
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert t.open_connections == 0

    run(scenario())


def test_a_full_pool_makes_room_by_closing_another_endpoints_idle_connection(
    run: Runner,
) -> None:
    async def scenario() -> None:
        a = await Upstream(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")).start()
        b = await Upstream(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")).start()
        t, ep_a = transport_for(a.port, max_connections=1)
        assert (await get(t, ep_a))[1] == b"a"
        assert (await get(t, b.endpoint))[1] == b"b"
        assert t.open_connections == 1
        assert t.idle_connections(ep_a) == 0
        async with asyncio.timeout(5):
            await a.closed_by_peer.wait()
        await t.close()
        a.close()
        b.close()

    run(scenario())


def test_idle_connections_are_closed_after_the_idle_timeout(run: Runner) -> None:
    async def scenario() -> None:
        async with scripted(
            answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), pool_idle_timeout=0.05
        ) as (up, t, ep):
            await get(t, ep)
            async with asyncio.timeout(5):
                await up.closed_by_peer.wait()
            assert t.open_connections == 0
            assert t.idle_connections(ep) == 0
            await get(t, ep)
            assert up.accepted == 2

    run(scenario())


def test_unsolicited_bytes_on_an_idle_connection_drop_it(run: Runner) -> None:
    async def handler(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await w.drain()
        async with up.arrived:  # the client has released the response
            await up.arrived.wait_for(lambda: len(up.requests) == 2)
        w.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        await w.drain()
        await up.wait_eof(reader)

    async def scenario() -> None:
        async with scripted(handler) as (up, t, ep):
            await get(t, ep)
            async with up.arrived:
                up.requests.append(("released", [], b""))
                up.arrived.notify_all()
            async with asyncio.timeout(5):
                await up.closed_by_peer.wait()
            assert t.open_connections == 0

    run(scenario())


@pytest.mark.parametrize(
    "extra",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad", b"garbage"],
    ids=["second response", "garbage"],
)
def test_bytes_after_a_complete_response_never_reach_its_body(run: Runner, extra: bytes) -> None:
    async def scenario() -> None:
        async with scripted(
            answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + extra)
        ) as (up, t, ep):
            for _ in range(2):
                _, body = await get(t, ep)
                assert body == b"ok"
            assert up.accepted == 2

    run(scenario())


def test_close_closes_every_connection_and_refuses_new_sends(run: Runner) -> None:
    async def scenario() -> None:
        up = await Upstream(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")).start()
        t, ep = transport_for(up.port)
        await get(t, ep)
        await t.close()
        assert t.open_connections == 0
        async with asyncio.timeout(5):
            await up.closed_by_peer.wait()
        with pytest.raises(errors.ConnectFailed, match="closed"):
            await t.send(ep, "GET", "/", hdrs(), None)
        up.close()

    run(scenario())


# -- streaming with bounded memory ---------------------------------------------------


def test_64_mib_download_streams_with_bounded_memory(run: Runner) -> None:
    size = 64 * MiB

    async def scenario() -> None:
        runner, port = await start_backend(BackendSpec(cluster="c", system="s"))
        t, ep = transport_for(port)
        digest = hashlib.sha256()
        received = 0
        tracemalloc.start()
        try:
            resp = await t.send(ep, "GET", f"/_sim/bytes/{size}", hdrs(), None)
            while chunk := await resp.read_chunk():
                received += len(chunk)
                digest.update(chunk)
            resp.release()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            await t.close()
            await runner.cleanup()
        assert received == size
        expected = hashlib.sha256(bytes(range(256)) * (size // 256)).hexdigest()
        assert digest.hexdigest() == expected
        # Back end and client share this process; a buffered body would be >= 64 MiB.
        assert peak < 16 * MiB

    run(scenario())


def test_64_mib_upload_streams_with_bounded_memory(run: Runner) -> None:
    block = 256 * 1024
    count = 256  # 64 MiB

    async def body() -> AsyncIterator[bytes]:
        for i in range(count):
            yield bytes([i % 251]) * block  # a new object each time: leaks would show

    async def scenario() -> None:
        runner, port = await start_backend(BackendSpec(cluster="c", system="s"))
        t, ep = transport_for(port)
        tracemalloc.start()
        try:
            resp, data = await get(
                t, ep, "/up", "POST", hdrs(Content_Length=str(block * count)), body()
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            await t.close()
            await runner.cleanup()
        expected = hashlib.sha256()
        for i in range(count):
            expected.update(bytes([i % 251]) * block)
        echo = json.loads(data)
        assert resp.status == 200
        assert echo["body_bytes"] == block * count
        assert echo["body_sha256"] == expected.hexdigest()
        assert peak < 16 * MiB

    run(scenario())


def test_a_slow_consumer_pauses_reading_from_the_upstream(run: Runner) -> None:
    size = 64 * MiB
    block = b"s" * MiB

    async def scenario() -> None:
        sent_all = asyncio.Event()

        async def handler(
            up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
        ) -> None:
            await up.read_request(reader)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(size // len(block)):
                w.write(block)
                await w.drain()
            sent_all.set()
            await up.wait_eof(reader)

        up = await Upstream(handler).start()
        t, ep = transport_for(up.port)
        resp = await t.send(ep, "GET", "/", hdrs(), None)
        conn = resp._conn
        assert conn is not None
        # Not reading: the upstream must stall (kernel buffers hold far less than 64 MiB).
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await sent_all.wait()
        assert conn._reading_paused
        assert conn._buffered <= READ_HIGH_WATER + 256 * 1024
        received = len(await read_all(resp))
        resp.release()
        assert received == size
        assert sent_all.is_set()
        await t.close()
        up.close()

    run(scenario())


# -- errors --------------------------------------------------------------------------


def test_refused_connect_is_connect_failed_with_nothing_sent(run: Runner) -> None:
    async def scenario() -> None:
        t, ep = transport_for(free_port())
        with pytest.raises(errors.ConnectFailed) as info:
            await t.send(ep, "POST", "/", hdrs(), chunks(b"x"))
        assert isinstance(info.value, errors.ConnectRefused)
        assert request_bytes_sent(info.value) == 0
        assert info.value.request_bytes_sent == 0
        assert t.open_connections == 0
        await t.close()

    run(scenario())


def test_connect_timeout_against_a_full_accept_queue(run: Runner) -> None:
    async def scenario() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):  # fill the accept queue; later SYNs are dropped
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                fillers.append(s)
            t, ep = transport_for(port, connect=0.3, head=0.3)
            outcome: BaseException | None = None
            try:
                await t.send(ep, "GET", "/", hdrs(), None)
            except errors.UpstreamError as exc:
                outcome = exc
            if not isinstance(outcome, errors.ConnectTimeout):
                pytest.skip(f"the accept queue did not hold the connect back: {outcome!r}")
            assert request_bytes_sent(outcome) == 0
            assert t.open_connections == 0
            await t.close()
        finally:
            for s in fillers:
                s.close()
            listener.close()

    run(scenario())


def test_no_response_head_in_time_is_response_timeout(run: Runner) -> None:
    async def scenario() -> None:
        async with scripted(once_then(b"HTTP/1.1 200 OK\r\nContent-", "hang"), head=0.2) as (
            _up,
            t,
            ep,
        ):
            with pytest.raises(errors.ResponseTimeout, match="response head") as info:
                await t.send(ep, "GET", "/", hdrs(), None)
            assert request_bytes_sent(info.value) > 0
            assert connection_reused(info.value) is False
            assert t.open_connections == 0

    run(scenario())


def test_a_stalled_body_is_response_timeout_from_read_chunk(run: Runner) -> None:
    async def scenario() -> None:
        async with scripted(
            once_then(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", "hang"), idle=0.2
        ) as (_up, t, ep):
            resp = await t.send(ep, "GET", "/", hdrs(), None)
            assert await resp.read_chunk() == b"hello"
            with pytest.raises(errors.ResponseTimeout, match="body"):
                await resp.read_chunk()
            resp.close()
            assert t.open_connections == 0

    run(scenario())


@pytest.mark.parametrize("after", ["close", "reset"])
def test_closed_before_the_head_is_upstream_reset_after_bytes_sent(run: Runner, after: str) -> None:
    async def scenario() -> None:
        async with scripted(once_then(b"", after)) as (_up, t, ep):
            with pytest.raises(errors.UpstreamReset) as info:
                await t.send(ep, "GET", "/", hdrs(), None)
            assert request_bytes_sent(info.value) == len(
                b"GET / HTTP/1.1\r\nHost: upstream.test\r\n\r\n"
            )
            assert t.open_connections == 0

    run(scenario())


@pytest.mark.parametrize("after", ["close", "reset"])
@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
    ids=["content-length", "chunked"],
)
def test_closed_mid_body_is_upstream_reset_from_read_chunk(
    run: Runner, partial: bytes, after: str
) -> None:
    async def scenario() -> None:
        async with scripted(once_then(partial, after)) as (_up, t, ep):
            resp = await t.send(ep, "GET", "/", hdrs(), None)
            with pytest.raises(errors.UpstreamReset, match="mid-body") as info:
                await read_all(resp)
            assert resp.status == 200
            assert request_bytes_sent(info.value) > 0
            resp.close()
            assert t.open_connections == 0

    run(scenario())


LONG = b"x" * 9000
MALFORMED = {
    "bad status line": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "not http": b"SSH-2.0-OpenSSH\r\n\r\n",
    "cl and te": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "te and cl": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "differing content-lengths": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    ),
    "bad content-length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "bare lf": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "huge header": b"HTTP/1.1 200 OK\r\nX-Big: " + LONG + b"\r\nContent-Length: 0\r\n\r\n",
    "huge status line": b"HTTP/1.1 200 " + LONG + b"\r\nContent-Length: 0\r\n\r\n",
    "too many headers": b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 129 + b"\r\n",
    "head too large": b"HTTP/1.1 200 OK\r\n" + (b"X-A: " + b"a" * 6000 + b"\r\n") * 12,
    "switching protocols": b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
}


@pytest.mark.parametrize("response", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_responses_are_protocol_errors(run: Runner, response: bytes) -> None:
    async def scenario() -> None:
        async with scripted(once_then(response, "hang")) as (up, t, ep):
            with pytest.raises(errors.UpstreamProtocolError) as info:
                await get(t, ep)  # a bad chunk size is found in the body
            assert request_bytes_sent(info.value) > 0
            assert t.open_connections == 0
            async with asyncio.timeout(5):
                await up.closed_by_peer.wait()

    run(scenario())


# -- end to end: a real ProxyServer on H1Transport -----------------------------------


async def h1_proxy(h: Harness, **cluster: Any) -> tuple[int, H1Transport]:
    b = await h.backend("pay", "tokopedia")
    p = await h.proxy(
        {
            "clusters": {"pay": {"system": "tokopedia", "endpoints": [b.url], **cluster}},
            "routes": [
                {"name": "all", "match": {"prefix": "/"}, "category": "payment", "to": "pay"}
            ],
        }
    )
    assert p.forwarder is not None
    transport = p.forwarder.state.clusters["pay"].transport
    assert isinstance(transport, H1Transport)
    return p.data_port, transport


async def test_e2e_requests_stream_both_ways_on_one_upstream_connection(harness: Harness) -> None:
    port, transport = await h1_proxy(harness)
    base = f"http://127.0.0.1:{port}"
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def upload() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 100_000):
            yield payload[i : i + 100_000]

    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            async with s.get(f"{base}/api/x", headers={"X-Request-Id": "rid-1"}) as r:
                echo = await r.json()
                assert r.status == 200
                assert r.headers["x-request-id"] == "rid-1"
        names = {k.lower() for k, _ in echo["headers"]}
        assert {"x-forwarded-for", "via", "x-request-id", "host"} <= names
        async with s.post(f"{base}/up", data=payload) as r:
            echo = await r.json()
        assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()
        async with s.post(f"{base}/chunked", data=upload()) as r:
            echo = await r.json()
        assert echo["body_bytes"] == len(payload)
        assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()
        async with s.get(f"{base}/_sim/bytes/{8 * MiB}") as r:
            digest = hashlib.sha256()
            async for chunk in r.content.iter_chunked(65536):
                digest.update(chunk)
        assert digest.hexdigest() == hashlib.sha256(bytes(range(256)) * 32768).hexdigest()
        async with s.head(f"{base}/_sim/bytes/100") as r:
            assert r.status == 200
            assert await r.read() == b""
        async with s.get(f"{base}/_sim/status/204") as r:
            assert r.status == 204
    assert transport.open_connections == 1


async def test_e2e_upstream_errors_are_json_answers(harness: Harness) -> None:
    dead = free_port()
    p = await harness.proxy(
        {
            "clusters": {
                "dead": {"system": "tokopedia", "endpoints": [f"http://127.0.0.1:{dead}"]},
                "slow": {
                    "system": "tokopedia",
                    "endpoints": [(await harness.backend("slow", "tokopedia")).url],
                    "timeouts": {"response_headers": 0.2},
                },
            },
            "routes": [
                {"name": "dead", "match": {"prefix": "/dead"}, "category": "payment", "to": "dead"},
                {"name": "slow", "match": {"prefix": "/slow"}, "category": "payment", "to": "slow"},
            ],
        }
    )
    base = f"http://127.0.0.1:{p.data_port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/dead") as r:
            body = await r.json()
            assert r.status == 502
            assert body["kind"] == "connect"
        async with s.get(f"{base}/slow/_sim/delay/1000") as r:
            body = await r.json()
            assert r.status == 504
            assert body["kind"] == "timeout"
