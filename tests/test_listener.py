"""The data listener on its own (``proxy.listener``): real loopback sockets, raw bytes, and a
tiny handler whose behaviour the request path selects. No proxy, no upstream."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy import accept
from proxy import config as cfg
from proxy.boundary import request_cookies
from proxy.listener import Connection, Listener, Request, Response, Stream

from .conftest import until
from .test_boundary import boundary
from .wire import Conversation, converse


@dataclass
class Served:
    listener: Listener
    port: int
    acceptor: accept.Acceptor
    errors: list[str] = field(default_factory=list)
    seen: list[Request] = field(default_factory=list)
    active: int = 0  # handlers running now
    most_active: int = 0
    most_queued: int = 0
    read_paused: bool = False  # reading was paused while a handler waited
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    events: list[str] = field(default_factory=list)
    detached: list[tuple[asyncio.Transport, bytes]] = field(default_factory=list)


def _json(status: int, data: Any) -> Response:
    return Response(status, orjson.dumps(data), content_type="application/json")


async def _read_all(request: Request) -> bytes:
    parts = []
    while chunk := await request.read():
        parts.append(chunk)
    return b"".join(parts)


def _connection(request: Request) -> Connection:
    conn = request._conn
    return conn


async def handler(s: Served, request: Request) -> Response | Stream:
    s.seen.append(request)
    s.active += 1
    s.most_active = max(s.most_active, s.active)
    conn = _connection(request)
    s.most_queued = max(s.most_queued, len(conn.queue))
    try:
        path = request.raw_path
        if path.startswith("/echo"):
            body = await _read_all(request)
            return _json(
                200,
                {
                    "method": request.method,
                    "path": path,
                    "version": list(request.version),
                    "body": body.decode(),
                    "headers": list(request.headers.items()),
                    "remote": request.remote,
                    "cookies": request.cookies,
                },
            )
        if path == "/nobody":
            return _json(404, {"path": path})
        if path == "/refuse":
            request.linger = 1.0
            answer = _json(413, {"error": "too large"})
            answer.force_close()
            return answer
        if path == "/crash":
            raise RuntimeError("handler bug")
        if path == "/gate":
            await s.gate.wait()
            return _json(200, {"path": path})
        if path == "/slow-reader":
            # Reads only once the gate opens: the body waits in the listener meanwhile.
            await s.gate.wait()
            s.read_paused = conn._read_paused
            body = await _read_all(request)
            return _json(200, {"length": len(body)})
        if path == "/read-fails":
            try:
                await _read_all(request)
            except Exception as exc:
                s.events.append(type(exc).__name__)
                raise
            return _json(200, {})
        if path.startswith("/stream"):
            headers: CIMultiDict[str] = CIMultiDict({"X-Kind": "stream"})
            if path == "/stream-sized":
                headers["Content-Length"] = "10"
            out = request.stream(200, headers)
            await out.write(b"hello")
            await out.write(b"world")
            return out
        if path == "/big":
            out = request.stream(200, CIMultiDict())
            chunk = b"x" * 65536
            try:
                for _ in range(200):  # 12.5 MiB: more than any socket buffer holds
                    await out.write(chunk)
            except ConnectionError:
                s.events.append("write-failed")
                raise
            return out
        if path == "/ws":
            out = request.stream(101, CIMultiDict({"Upgrade": "x-test", "Connection": "upgrade"}))
            out.send_head()
            transport, tail = request.detach()
            s.detached.append((transport, tail))
            return out
        return _json(200, {"path": path})
    finally:
        s.active -= 1


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    started: list[Served] = []

    async def start(**limits: Any) -> Served:
        sock = accept.bind("127.0.0.1", 0, 128)
        box: list[Served] = []

        async def handle(request: Request) -> Response | Stream:
            return await handler(box[0], request)

        listen = cfg.Listen(host="127.0.0.1", port=0, **limits)
        s = Served(Listener(handle, listen), sock.getsockname()[1], None)  # type: ignore[arg-type]
        s.listener.on_error = s.errors.append
        s.acceptor = accept.Acceptor(sock, s.listener)
        await s.acceptor.start_serving()
        box.append(s)
        started.append(s)
        return s

    yield start
    for s in started:
        s.gate.set()
        s.acceptor.close()
        await s.listener.shutdown(1.0)


def get(path: str, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET " + path.encode() + b" " + version + b"\r\nHost: x\r\n" + extra + b"\r\n"


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path.encode(),
        len(body),
        extra,
        body,
    )


def assert_refusal(talk: Conversation, status: int, reason: str) -> None:
    assert talk.statuses == [status], talk.raw[:300]
    answer = talk.responses[0]
    body = orjson.loads(answer.body)
    assert body["reason"] == reason
    assert body["error"]
    assert body["request_id"] == answer.header("x-request-id")
    assert answer.header("connection") == "close"
    assert talk.closed


# -- keep-alive and versions ---------------------------------------------------------------


async def test_http11_keeps_the_connection_and_answers_are_plain(serve: Any) -> None:
    s = await serve()
    talk = await converse(s.port, get("/a"), responses=2, followup=get("/b"), linger=0.3)
    assert talk.statuses == [200, 200]
    assert not talk.closed
    first = talk.responses[0]
    assert first.header("connection") is None
    assert first.header("server") is None  # no version banner
    assert first.header("date") is not None
    assert first.header("content-length") == str(len(first.body))
    assert talk.raw.count(b"\r\nDate: ") == 2
    assert [r.raw_path for r in s.seen] == ["/a", "/b"]


async def test_http10_closes_unless_keep_alive_is_asked(serve: Any) -> None:
    s = await serve()
    plain = await converse(s.port, get("/a", version=b"HTTP/1.0"), linger=3)
    assert plain.statuses == [200]
    assert plain.closed
    kept = await converse(
        s.port,
        get("/a", b"Connection: keep-alive\r\n", b"HTTP/1.0"),
        responses=2,
        followup=get("/b", version=b"HTTP/1.0"),
        linger=3,
    )
    assert kept.statuses == [200, 200]
    assert kept.responses[0].header("connection") == "keep-alive"
    assert kept.closed  # the second did not ask
    assert s.seen[0].version == (1, 0)


async def test_connection_close_from_the_client_is_the_last_answer(serve: Any) -> None:
    s = await serve()
    talk = await converse(
        s.port, get("/a", b"Connection: close\r\n") + get("/never"), responses=2, linger=3
    )
    assert talk.statuses == [200]
    assert talk.responses[0].header("connection") == "close"
    assert talk.closed
    assert [r.raw_path for r in s.seen] == ["/a"]


async def test_server_header_only_when_configured(serve: Any) -> None:
    s = await serve(server_header="jalur")
    talk = await converse(s.port, get("/a"))
    assert talk.responses[0].header("server") == "jalur"


async def test_head_answer_has_no_body(serve: Any) -> None:
    s = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(get("/a").replace(b"GET", b"HEAD") + get("/b"))
    async with asyncio.timeout(5):
        first = await reader.readuntil(b"\r\n\r\n")
        second = await reader.readuntil(b"\r\n\r\n")  # right after: no body between
    writer.close()
    assert first.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: " in first
    assert second.startswith(b"HTTP/1.1 200 ")


# -- pipelining ----------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order_one_at_a_time(serve: Any) -> None:
    s = await serve(max_pipelined=4)
    data = b"".join(get(f"/p{i}") for i in range(20))
    talk = await converse(s.port, data, responses=20)
    assert [orjson.loads(r.body)["path"] for r in talk.responses] == [f"/p{i}" for i in range(20)]
    assert s.most_active == 1


async def test_deep_pipelining_pauses_reading(serve: Any) -> None:
    """Many more requests than max_pipelined in one write: the parsed queue stays bounded
    (what one feed slice holds beyond the limit), all are answered in order."""
    s = await serve(max_pipelined=2)
    data = b"".join(get(f"/q{i}", b"X-Pad: " + b"p" * 200 + b"\r\n") for i in range(300))
    assert len(data) > 60_000
    talk = await converse(s.port, data, responses=300, wait=10)
    assert len(talk.responses) == 300
    assert orjson.loads(talk.responses[-1].body)["path"] == "/q299"
    assert s.most_queued <= 2 + 4096 // 230 + 1, s.most_queued


# -- limits --------------------------------------------------------------------------------


async def test_head_deadline_is_a_counted_json_408(serve: Any) -> None:
    s = await serve(header_read_timeout=0.3)
    talk = await converse(s.port, b"GET /x HTTP/1.1\r\nHost: x\r\nX-Half: ", linger=3)
    assert_refusal(talk, 408, "header_timeout")
    assert s.errors == ["header_timeout"]
    assert s.seen == []


async def test_a_silent_connection_gets_the_408_too(serve: Any) -> None:
    s = await serve(header_read_timeout=0.3)
    talk = await converse(s.port, b"", linger=3)
    assert_refusal(talk, 408, "header_timeout")


async def test_an_idle_keep_alive_connection_is_closed_silently(serve: Any) -> None:
    s = await serve(keepalive_timeout=0.3, header_read_timeout=5)
    talk = await converse(s.port, get("/a"), linger=3)
    assert talk.statuses == [200]
    assert talk.closed
    assert s.errors == []


async def test_max_head_bytes_is_431_before_parsing(serve: Any) -> None:
    s = await serve(max_head_bytes=2048)
    talk = await converse(s.port, get("/a", b"X-Pad: " + b"p" * 3000 + b"\r\n"), linger=3)
    assert_refusal(talk, 431, "head_too_large")
    assert s.errors == ["head_too_large"]
    # A head sent in small pieces is summed.
    pieces = [b"GET /a HTTP/1.1\r\nHost: x\r\n"] + [b"X-P: " + b"p" * 500 + b"\r\n"] * 5
    talk = await converse(s.port, pieces, linger=3)
    assert_refusal(talk, 431, "head_too_large")
    # The body does not count.
    big = post("/echo", b"b" * 10_000)
    talk = await converse(s.port, big)
    assert talk.statuses == [200]


async def test_connections_beyond_max_connections_are_closed_unread(serve: Any) -> None:
    s = await serve(max_connections=2)
    held = [await asyncio.open_connection("127.0.0.1", s.port) for _ in range(2)]
    for reader, writer in held:
        writer.write(get("/a"))
        await reader.readuntil(b"\r\n\r\n")
    talk = await converse(s.port, get("/b"), linger=3)
    assert talk.statuses == []
    assert talk.closed
    assert s.errors == ["max_connections"]
    assert s.listener.open_connections == 2
    for _, writer in held:
        writer.close()
    await until(lambda: s.listener.open_connections == 0)


async def test_max_requests_per_connection(serve: Any) -> None:
    s = await serve(max_requests_per_connection=2)
    talk = await converse(s.port, get("/a") + get("/b") + get("/c"), responses=3, linger=3)
    assert talk.statuses == [200, 200]
    assert talk.responses[0].header("connection") is None
    assert talk.responses[1].header("connection") == "close"
    assert talk.closed


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
        ("bare-lf", b"GET / HTTP/1.1\nHost: x\n\n"),
        ("no-host", b"GET / HTTP/1.1\r\n\r\n"),
        ("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        ("te-on-1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("long-target", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("long-field", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n"),
        ("many-fields", b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: a\r\n" * 101 + b"\r\n"),
        ("cl-and-te", post("/", b"0\r\n\r\n", b"Transfer-Encoding: chunked\r\n")),
    ],
)
async def test_malformed_requests_are_a_json_400_and_closed(
    serve: Any, name: str, data: bytes
) -> None:
    s = await serve()
    talk = await converse(s.port, data + get("/smuggled"), linger=3)
    assert_refusal(talk, 400, "malformed")
    assert s.errors == ["malformed"]
    assert s.seen == []


async def test_a_malformed_request_behind_a_good_one_is_refused_in_its_turn(serve: Any) -> None:
    s = await serve()
    talk = await converse(s.port, get("/gate") + b"GET / HTTP/1.1\nbad\n\n", responses=2, linger=1)
    assert talk.statuses == []  # the first is still being served: nothing answered early
    s.gate.set()
    s2 = await converse(s.port, get("/a") + b"GET / HTTP/1.1\nbad\n\n", responses=2, linger=3)
    assert s2.statuses == [200, 400]
    assert s2.closed


async def test_a_trailer_repeating_host_refuses_the_request(serve: Any) -> None:
    """Sent in one piece, the bad trailer is seen before the handler starts: a 400. Sent
    after the handler began reading, the body read fails (``MalformedBody``), counted."""
    s = await serve()
    head = b"POST /read-fails HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"3\r\nabc\r\n0\r\nHost: evil\r\n\r\n"
    talk = await converse(s.port, head + body, linger=3)
    assert_refusal(talk, 400, "malformed")
    assert s.seen == []
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(head + b"3\r\nabc\r\n")
    await until(lambda: len(s.seen) == 1)
    writer.write(b"0\r\nHost: evil\r\n\r\n")
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 500 ")  # the tiny handler does not catch it
    assert s.events == ["MalformedBody"]
    assert s.errors == ["malformed", "malformed", "internal"]


async def test_a_handler_crash_is_a_json_500_without_details(serve: Any) -> None:
    s = await serve()
    talk = await converse(s.port, get("/crash") + get("/a"), responses=2, linger=3)
    assert_refusal(talk, 500, "internal")
    assert b"handler bug" not in talk.raw
    assert s.errors == ["internal"]


# -- bodies --------------------------------------------------------------------------------


async def test_a_chunked_request_body_is_read_and_ends_the_connection(serve: Any) -> None:
    s = await serve()
    body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
    data = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    talk = await converse(s.port, data + get("/never"), responses=2, linger=3)
    assert talk.statuses == [200]
    echoed = orjson.loads(talk.responses[0].body)
    assert echoed["body"] == "hello world"
    assert ["X-Trailer", "1"] not in echoed["headers"]
    assert talk.responses[0].header("connection") == "close"
    assert talk.closed


async def test_streamed_answers_are_chunked_for_11_and_close_delimited_for_10(
    serve: Any,
) -> None:
    s = await serve()
    talk = await converse(s.port, get("/stream") + get("/a"), responses=2, linger=0.3)
    assert talk.statuses == [200, 200]
    assert talk.responses[0].body == b"helloworld"
    assert talk.responses[0].header("transfer-encoding") == "chunked"
    old = await converse(s.port, get("/stream", b"Connection: keep-alive\r\n", b"HTTP/1.0"))
    assert old.raw.endswith(b"\r\n\r\nhelloworld")  # no chunk framing
    assert old.closed
    assert b"\r\nConnection: close\r\n" in old.raw
    sized = await converse(s.port, get("/stream-sized"))
    assert sized.raw.endswith(b"\r\n\r\nhelloworld")
    assert sized.responses[0].header("transfer-encoding") is None


async def test_100_continue_only_when_the_handler_reads(serve: Any) -> None:
    s = await serve()
    expect = b"Expect: 100-continue\r\n"
    refused = await converse(
        s.port, b"POST /nobody HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n" + expect + b"\r\n",
        linger=3,
    )  # fmt: skip
    assert refused.statuses == [404]
    assert b"100 Continue" not in refused.raw
    assert refused.closed  # the body was never invited: the connection cannot go on
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n" + expect + b"\r\n")
    async with asyncio.timeout(5):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.close()


async def test_a_refused_body_lingers_then_closes(serve: Any) -> None:
    """The handler refuses without reading and asks for a linger: what the client still
    sends is read and discarded (no reset destroys the answer), then the connection closes."""
    s = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
    writer.write(b"z" * 200_000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ")
        assert b"Connection: close" in head
        for _ in range(20):  # still sending while the proxy lingers: no reset
            writer.write(b"z" * 10_000)
            await writer.drain()
        rest = await reader.read()
    assert rest.endswith(b"}")
    assert loop.time() - started < 3
    writer.close()


async def test_an_unread_body_closes_after_the_answer(serve: Any) -> None:
    s = await serve()
    talk = await converse(
        s.port, b"POST /nobody HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc", linger=3
    )
    assert talk.statuses == [404]
    assert talk.responses[0].header("connection") == "close"
    assert talk.closed


async def test_a_fully_received_unread_body_keeps_the_connection(serve: Any) -> None:
    s = await serve()
    talk = await converse(s.port, post("/nobody", b"abc") + get("/a"), responses=2, linger=0.3)
    assert talk.statuses == [404, 200]
    assert not talk.closed


async def test_body_flow_control_pauses_reading_until_the_handler_reads(serve: Any) -> None:
    s = await serve()
    body = bytes(range(256)) * 4096  # 1 MiB
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(b"POST /slow-reader HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
    writer.write(body)
    await until(lambda: bool(s.seen) and s.seen[0]._conn._read_paused)
    buffered = s.seen[0]._size
    assert buffered < 2 * 256 * 1024  # bounded, not the whole MiB
    s.gate.set()
    async with asyncio.timeout(5):
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        answer = orjson.loads(await reader.readexactly(length))
    assert s.read_paused
    assert answer == {"length": len(body)}
    writer.close()


async def test_write_flow_control_and_a_client_that_goes_away(serve: Any) -> None:
    """A client that does not read: the handler's writes wait (pause_writing) instead of
    buffering 12 MiB; when the client goes away, the waiting write raises."""
    s = await serve()
    sock = socket.create_connection(("127.0.0.1", s.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(get("/big"))
    await until(lambda: bool(s.seen) and s.seen[0]._conn.write_paused)
    await asyncio.sleep(0.2)  # the handler gets a chance to write on (it must not)
    assert s.active == 1  # still waiting on the drain
    transport = s.seen[0]._conn.transport
    assert transport is not None
    assert transport.get_write_buffer_size() < 2 * 1024 * 1024
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # reset
    await until(lambda: "write-failed" in s.events)
    await until(lambda: s.listener.open_connections == 0)


async def test_a_client_gone_mid_body_fails_the_read(serve: Any) -> None:
    s = await serve()
    _, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(b"POST /read-fails HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    await until(lambda: bool(s.seen))
    writer.close()
    await until(lambda: bool(s.events))
    assert s.events == ["ConnectionResetError"]
    await until(lambda: s.listener.open_connections == 0)


async def test_cookies_are_read_as_the_boundary_forwards_them(serve: Any) -> None:
    s = await serve()
    cookie = b'Cookie: a=1; bad pair; b="q"; a=2\r\nCookie: c=3;; d=x y\r\n'
    talk = await converse(s.port, get("/echo", cookie))
    assert orjson.loads(talk.responses[0].body)["cookies"] == {"a": "1", "b": "q", "c": "3"}


# -- drain and upgrades --------------------------------------------------------------------


async def test_draining_closes_idle_connections_and_ends_busy_ones_after_the_answer(
    serve: Any,
) -> None:
    s = await serve()
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", s.port)
    busy_r, busy_w = await asyncio.open_connection("127.0.0.1", s.port)
    busy_w.write(get("/gate"))
    await until(lambda: s.active == 1 and s.listener.open_connections == 2)
    drain = asyncio.ensure_future(s.listener.shutdown(5))
    async with asyncio.timeout(5):
        assert await idle_r.read() == b""
        s.gate.set()
        answer = await busy_r.read()
        await drain
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"Connection: close\r\n" in answer
    idle_w.close()
    busy_w.close()


async def test_detach_hands_over_the_socket_and_what_followed(serve: Any) -> None:
    s = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: x-test\r\n\r\nEARLY"
    )
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        await until(lambda: bool(s.detached))
    transport, tail = s.detached[0]
    assert tail == b"EARLY"
    # Not drained by the listener any more, still counted (until Request.tunnel_ended).
    assert not s.listener.connections
    assert s.listener.open_connections == 1
    received = asyncio.get_running_loop().create_future()

    class Echo(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            transport.write(data.upper())
            if not received.done():
                received.set_result(data)

    transport.set_protocol(Echo())
    transport.resume_reading()
    writer.write(b"later")
    async with asyncio.timeout(5):
        assert await received == b"later"
        assert await reader.readexactly(5) == b"LATER"
    transport.close()
    writer.close()


async def test_an_upgrade_not_switched_closes_after_its_answer(serve: Any) -> None:
    s = await serve()
    data = get("/a", b"Connection: Upgrade\r\nUpgrade: h2c\r\n") + get("/smuggled")
    talk = await converse(s.port, data, responses=2, linger=3)
    assert talk.statuses == [200]
    assert talk.closed
    assert [r.raw_path for r in s.seen] == ["/a"]
    body = post("/echo", b"hello", b"Connection: Upgrade\r\nUpgrade: h2c\r\n") + get("/smuggled")
    talk = await converse(s.port, body, responses=2, linger=3)
    assert talk.statuses == [200]
    assert orjson.loads(talk.responses[0].body)["body"] == "hello"
    assert talk.closed


async def test_input_split_anywhere_is_read_alike(serve: Any) -> None:
    """The same pipelined requests (a sized body, a chunked one last) written whole, in
    1-byte pieces and in odd pieces: the same answers in the same order."""
    s = await serve(max_pipelined=2)
    chunked = (
        b"POST /echo/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: 1\r\n\r\n"
    )
    data = get("/echo/a") + post("/echo/b", b"hello") + get("/echo/d") + chunked
    bodies = []
    for step in (len(data), 1, 7, 64):
        pieces = [data[i : i + step] for i in range(0, len(data), step)]
        talk = await converse(s.port, pieces, responses=4, linger=3)
        assert talk.closed  # after the chunked one
        bodies.append(
            [(orjson.loads(r.body)["path"], orjson.loads(r.body)["body"]) for r in talk.responses]
        )
    expected = [("/echo/a", ""), ("/echo/b", "hello"), ("/echo/d", ""), ("/echo/c", "abcde")]
    assert bodies == [expected] * 4


async def test_body_bytes_never_count_as_head_bytes(serve: Any) -> None:
    """Bodies far larger than max_head_bytes, sized and chunked, in big writes, one after
    the other on one connection (a body's end and the next head share a read)."""
    s = await serve(max_head_bytes=1024)
    body = b"y" * 300_000
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (50_000, body[i : i + 50_000]) for i in range(0, 300_000, 50_000)
    )
    data = (
        post("/echo/1", body)
        + post("/echo/2", body)
        + (
            b"POST /echo/3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked
            + b"0\r\n\r\n"
        )
    )
    talk = await converse(s.port, data, responses=3, wait=10)
    assert talk.statuses == [200, 200, 200], talk.raw[:200]
    assert [len(orjson.loads(r.body)["body"]) for r in talk.responses] == [300_000] * 3
    # A body whose last read holds nothing more, then the next head on its own.
    talk = await converse(s.port, post("/echo/4", body), responses=2, followup=get("/echo/5"))
    assert talk.statuses == [200, 200], talk.raw[:200]


async def test_a_client_half_close_still_gets_its_answers(serve: Any) -> None:
    s = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(get("/gate") + get("/b"))
    writer.write_eof()
    await until(lambda: bool(s.seen) and s.seen[0]._conn._broken)  # the EOF was read
    s.gate.set()
    async with asyncio.timeout(5):
        answers = await reader.read()
    writer.close()
    assert answers.count(b"HTTP/1.1 200 ") == 2
    assert answers.count(b"Connection: close") == 1
    await until(lambda: s.listener.open_connections == 0)


_PAIR = st.builds(
    "{}={}".format,
    st.sampled_from(["a", "b", "tt_session", "TT_Session", "x.y", "_SID_Tokopedia_", ""]),
    st.text(alphabet='ab"= ,1', max_size=6),
)
_COOKIE_TEXT = st.one_of(
    st.text(alphabet='ab_ST=;" ,\t.%$x1', max_size=30),
    st.builds(
        lambda pairs, sep: sep.join(pairs),
        st.lists(_PAIR, max_size=4),
        st.sampled_from(["; ", ";", " ; "]),
    ),
)


@given(st.lists(_COOKIE_TEXT, min_size=1, max_size=3))
def test_request_cookies_are_what_the_boundary_forwards(lines: list[str]) -> None:
    """Sticky routing, hashing and rate-limit keys read ``Request.cookies``: the same
    cookies, with the same values, that the upstream gets after ``scrub`` (the first of a
    repeated name, as back ends read it), minus what the system may not see."""
    headers: CIMultiDict[str] = CIMultiDict([("Cookie", line) for line in lines])
    boundary().scrub(headers, "tokopedia")  # tokopedia may not see tt_session
    forwarded: dict[str, str] = {}
    for pair in headers.get("Cookie", "").split("; "):
        if pair:
            name, _, value = pair.partition("=")
            forwarded.setdefault(name, value[1:-1] if value.startswith('"') else value)
    read = {k: v for k, v in request_cookies(lines).items() if k.lower() != "tt_session"}
    assert read == forwarded
