"""Simulated back ends: real sockets, real aiohttp client, no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from proxy.demo.backend import (
    CHUNK_SIZE,
    MAX_RECEIVED,
    RECEIVED,
    BackendSpec,
    Received,
    make_app,
    start_backend,
)

Started = tuple[web.AppRunner, str]
StartFn = Callable[[BackendSpec], Awaitable[Started]]


@pytest.fixture
async def start() -> AsyncIterator[StartFn]:
    """Start back ends on free ports; clean them all up after the test."""
    runners: list[web.AppRunner] = []

    async def _start(spec: BackendSpec) -> Started:
        runner, port = await start_backend(spec, port=0)
        runners.append(runner)
        return runner, f"http://127.0.0.1:{port}"

    yield _start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def feed(start: StartFn) -> Started:
    return await start(BackendSpec(cluster="feed", system="tiktok"))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def _headers_named(echo: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in echo["headers"] if key.lower() == name.lower()]


async def test_start_backend_returns_actual_bound_port(feed: Started) -> None:
    runner, base = feed
    port = int(base.rsplit(":", 1)[1])
    assert port != 0
    assert runner.addresses[0][1] == port


async def test_echo_reports_method_raw_path_and_raw_query(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    url = URL(f"{base}/api/feed/a%2Fb/c%20d/%E2%82%AC?x=1&x=2&y=%41%2b", encoded=True)
    async with session.request("PATCH", url) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        echo = await response.json()
    assert echo["cluster"] == "feed"
    assert echo["system"] == "tiktok"
    assert echo["method"] == "PATCH"
    assert echo["path"] == "/api/feed/a%2Fb/c%20d/%E2%82%AC"
    assert echo["query"] == "x=1&x=2&y=%41%2b"


async def test_echo_reports_empty_query_without_question_mark(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    async with session.get(f"{base}/plain") as response:
        echo = await response.json()
    assert echo["path"] == "/plain"
    assert echo["query"] == ""
    assert echo["body_bytes"] == 0
    assert echo["body_sha256"] == hashlib.sha256(b"").hexdigest()


async def test_echo_keeps_duplicate_headers_in_received_order(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    sent = [("X-Dup", "first"), ("X-Other", "between"), ("X-Dup", "second")]
    async with session.get(f"{base}/h", headers=sent) as response:
        echo = await response.json()
    names = [name for name, _ in echo["headers"]]
    assert _headers_named(echo, "x-dup") == ["first", "second"]
    assert names.index("X-Dup") < names.index("X-Other")
    assert len(names) - names[::-1].index("X-Dup") - 1 > names.index("X-Other")
    assert all(isinstance(pair, list) and len(pair) == 2 for pair in echo["headers"])


async def test_echo_counts_and_hashes_posted_body(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    body = bytes(range(256)) * 4099 + b"tail"  # not a multiple of the chunk size
    async with session.post(f"{base}/upload", data=body) as response:
        echo = await response.json()
    assert echo["method"] == "POST"
    assert echo["body_bytes"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_echo_counts_and_hashes_chunked_body(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    parts = [b"a" * 1000, b"", b"b" * 70_000, b"c"]

    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with session.put(f"{base}/chunked", data=chunks()) as response:
        echo = await response.json()
    assert _headers_named(echo, "transfer-encoding") == ["chunked"]
    assert echo["body_bytes"] == sum(map(len, parts))
    assert echo["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


async def test_backend_headers_on_every_response(
    start: StartFn, session: aiohttp.ClientSession
) -> None:
    _, base = await start(BackendSpec(cluster="payments", system="commerce"))
    for path in ("/any", "/_sim/bytes/3", "/_sim/status/418", "/_sim/status/204"):
        async with session.get(f"{base}{path}") as response:
            await response.read()
            assert response.headers["x-backend-cluster"] == "payments", path
            assert response.headers["x-backend-system"] == "commerce", path


async def test_sim_bytes_has_exact_length_and_content_length(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    size = 3 * CHUNK_SIZE + 17
    async with session.get(f"{base}/api/feed/_sim/bytes/{size}") as response:
        assert response.status == 200
        assert response.content_type == "application/octet-stream"
        assert response.headers["Content-Length"] == str(size)
        assert "Transfer-Encoding" not in response.headers
        body = await response.read()
    assert len(body) == size
    assert body == bytes(i % 256 for i in range(size))


async def test_sim_bytes_zero_is_empty(feed: Started, session: aiohttp.ClientSession) -> None:
    _, base = feed
    async with session.get(f"{base}/_sim/bytes/0") as response:
        assert response.headers["Content-Length"] == "0"
        assert await response.read() == b""


async def test_sim_bytes_head_sends_length_but_no_body(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    async with session.head(f"{base}/_sim/bytes/1000") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == "1000"
        assert await response.read() == b""
    # The connection is still usable: a HEAD body would have corrupted the next response.
    async with session.get(f"{base}/after-head") as response:
        assert (await response.json())["path"] == "/after-head"


async def test_sim_bytes_rejects_non_numeric_and_oversized(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    for path in ("/_sim/bytes/abc", "/_sim/bytes/-1", f"/_sim/bytes/{1024**3 + 1}"):
        async with session.get(f"{base}{path}") as response:
            assert response.status == 400, path
            assert "error" in await response.json()


async def test_sim_bytes_is_streamed_not_buffered(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    size = 64 * 1024 * 1024
    received = 0
    tracemalloc.start()
    try:
        async with session.get(f"{base}/_sim/bytes/{size}") as response:
            async for chunk in response.content.iter_chunked(CHUNK_SIZE):
                received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == size
    # Client and server share this process; a buffered body would show up as >= 64 MiB.
    assert peak < 16 * 1024 * 1024


async def test_upload_is_streamed_not_buffered(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    chunk = b"z" * CHUNK_SIZE
    count = 1024  # 64 MiB

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield chunk

    tracemalloc.start()
    try:
        async with session.post(f"{base}/big", data=body()) as response:
            echo = await response.json()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(chunk)
    assert echo["body_bytes"] == CHUNK_SIZE * count
    assert echo["body_sha256"] == expected.hexdigest()
    assert peak < 16 * 1024 * 1024


async def test_sim_status_418_answers_with_echo(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    async with session.post(f"{base}/api/feed/_sim/status/418?q=1", data=b"abc") as response:
        assert response.status == 418
        echo = await response.json()
    assert echo["path"] == "/api/feed/_sim/status/418"
    assert echo["query"] == "q=1"
    assert echo["body_bytes"] == 3


async def test_sim_status_204_and_304_have_no_body(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    for code in (204, 304):
        async with session.get(f"{base}/_sim/status/{code}") as response:
            assert response.status == code
            assert await response.read() == b""
            assert "Content-Length" not in response.headers or (
                response.headers["Content-Length"] == "0"
            )


async def test_sim_status_rejects_out_of_range(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    for code in ("101", "600", "x"):
        async with session.get(f"{base}/_sim/status/{code}") as response:
            assert response.status == 400, code


async def test_sim_delay_waits_at_least_the_delay(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    began = time.monotonic()
    async with session.get(f"{base}/_sim/delay/120") as response:
        assert response.status == 200
        echo = await response.json()
    assert time.monotonic() - began >= 0.12
    assert echo["path"] == "/_sim/delay/120"


async def test_latency_is_added_before_answering(
    start: StartFn, session: aiohttp.ClientSession
) -> None:
    _, base = await start(BackendSpec(cluster="feed", system="tiktok", latency=0.1))
    began = time.monotonic()
    async with session.get(f"{base}/slow") as response:
        assert response.status == 200
    assert time.monotonic() - began >= 0.1


async def test_sim_ws_echoes_text_and_binary(feed: Started, session: aiohttp.ClientSession) -> None:
    _, base = feed
    async with session.ws_connect(f"{base}/api/feed/_sim/ws") as ws:
        await ws.send_str("hello ✓")
        text = await ws.receive(timeout=5)
        assert text.type is aiohttp.WSMsgType.TEXT
        assert text.data == "hello ✓"
        await ws.send_bytes(b"\x00\x01\xff")
        binary = await ws.receive(timeout=5)
        assert binary.type is aiohttp.WSMsgType.BINARY
        assert binary.data == b"\x00\x01\xff"
        await ws.close()
    assert ws.closed
    assert ws.close_code == aiohttp.WSCloseCode.OK


async def test_sim_ws_handshake_carries_backend_headers(feed: Started) -> None:
    _, base = feed
    handshakes: list[aiohttp.TraceRequestEndParams] = []

    async def on_request_end(
        _session: aiohttp.ClientSession,
        _context: SimpleNamespace,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        handshakes.append(params)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    async with (
        aiohttp.ClientSession(trace_configs=[trace]) as client,
        client.ws_connect(f"{base}/_sim/ws") as ws,
    ):
        await ws.close()
    [handshake] = handshakes
    assert handshake.response.status == 101
    assert handshake.response.headers["x-backend-cluster"] == "feed"
    assert handshake.response.headers["x-backend-system"] == "tiktok"


async def test_sim_ws_without_upgrade_is_400(feed: Started, session: aiohttp.ClientSession) -> None:
    _, base = feed
    async with session.get(f"{base}/_sim/ws") as response:
        assert response.status == 400


async def test_sim_set_cookie(feed: Started, session: aiohttp.ClientSession) -> None:
    _, base = feed
    async with session.get(f"{base}/api/feed/_sim/set-cookie/sid/abc123") as response:
        assert response.status == 200
        assert response.headers.getall("Set-Cookie") == ["sid=abc123; Path=/"]
        echo = await response.json()
    assert echo["path"] == "/api/feed/_sim/set-cookie/sid/abc123"


async def test_sim_set_cookie_rejects_header_unsafe_value(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    # Used raw (not percent-decoded): ";" and "," would split or extend the cookie.
    for value in ("a;b", "a,b", 'a"b'):
        url = URL(f"{base}/_sim/set-cookie/sid/{value}", encoded=True)
        async with session.get(url) as response:
            assert response.status == 400, value
            assert "Set-Cookie" not in response.headers, value


async def test_failure_rate_one_gives_503_json(
    start: StartFn, session: aiohttp.ClientSession
) -> None:
    _, base = await start(BackendSpec(cluster="cart", system="commerce", failure_rate=1.0))
    for path in ("/any", "/_sim/bytes/10", "/_sim/status/200"):
        async with session.get(f"{base}{path}") as response:
            assert response.status == 503, path
            assert response.content_type == "application/json"
            assert await response.json() == {"error": "simulated failure"}
            assert response.headers["x-backend-cluster"] == "cart"


async def test_failure_rate_is_deterministic_with_seed(
    start: StartFn, session: aiohttp.ClientSession
) -> None:
    spec = BackendSpec(cluster="feed", system="tiktok", failure_rate=0.5, seed=7)
    outcomes: list[list[int]] = []
    for _ in range(2):
        _, base = await start(spec)
        statuses = []
        for _ in range(40):
            async with session.get(f"{base}/x") as response:
                await response.read()
                statuses.append(response.status)
        outcomes.append(statuses)
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0]) == {200, 503}


async def test_received_records_requests(feed: Started, session: aiohttp.ClientSession) -> None:
    runner, base = feed
    received = runner.app[RECEIVED]
    assert received == []
    async with session.post(
        URL(f"{base}/a%20b?k=v", encoded=True), data=b"12345", headers={"X-Trace": "t1"}
    ) as response:
        await response.read()
    async with session.delete(f"{base}/_sim/status/204") as response:
        await response.read()

    assert [(r.method, r.path, r.query, r.body_bytes) for r in received] == [
        ("POST", "/a%20b", "k=v", 5),
        ("DELETE", "/_sim/status/204", "", 0),
    ]
    assert ("X-Trace", "t1") in received[0].headers
    assert isinstance(received[0].headers, tuple)


async def test_received_keeps_only_the_most_recent(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    runner, base = feed
    received = runner.app[RECEIVED]
    filler = Received("GET", "/filler", "", (), 0)
    received.extend([filler] * MAX_RECEIVED)
    for index in range(2):
        async with session.get(f"{base}/real/{index}") as response:
            await response.read()
    assert len(received) == MAX_RECEIVED
    assert [r.path for r in received[-2:]] == ["/real/0", "/real/1"]
    assert received[0] is filler


def test_make_app_records_spec_and_empty_received() -> None:
    app = make_app(BackendSpec(cluster="checkout", system="commerce"))
    assert app[RECEIVED] == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cluster": ""},
        {"system": "bad\r\nx: y"},
        {"latency": -1.0},
        {"latency": float("nan")},
        {"failure_rate": 1.5},
        {"failure_rate": -0.1},
        {"reset_rate": 1.01},
        {"reset_rate": -0.5},
    ],
)
def test_spec_rejects_invalid_values(kwargs: dict[str, Any]) -> None:
    values: dict[str, Any] = {"cluster": "feed", "system": "tiktok", **kwargs}
    with pytest.raises(ValueError, match=r"cluster|system|latency|failure_rate|reset_rate"):
        BackendSpec(**values)


async def test_concurrent_requests_are_all_answered(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    runner, base = feed

    async def one(index: int) -> int:
        async with session.get(f"{base}/_sim/delay/20?i={index}") as response:
            echo = await response.json()
            return int(echo["query"].removeprefix("i="))

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert sorted(results) == list(range(50))
    assert len(runner.app[RECEIVED]) == 50


async def test_keyed_executions_are_counted_and_a_duplicate_shows(
    feed: Started, session: aiohttp.ClientSession
) -> None:
    _, base = feed
    seen = []
    for key in ("k-1", "k-1", "k-2"):
        async with session.post(
            base + "/api/payment/charge", data=b"{}", headers={"Idempotency-Key": key}
        ) as resp:
            seen.append(resp.headers["x-sim-executions"])
    async with session.get(base + "/api/payment/charge") as resp:
        assert "x-sim-executions" not in resp.headers  # no key, no count
    async with session.get(base + "/_sim/executions") as resp:
        counts = await resp.json()
    assert seen == ["1", "2", "1"]
    assert counts == {"keyed": 3, "duplicates": 1}


async def test_reset_rate_resets_before_executing_and_is_counted(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    journal_path = tmp_path / "journal.jsonl"
    with journal_path.open("ab") as journal:
        app = make_app(BackendSpec(cluster="pay", system="commerce", reset_rate=1.0), journal)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            # A raw socket sees no response byte at all: the connection is reset (or closed).
            reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
            writer.write(b"GET /api/feed HTTP/1.1\r\nHost: x\r\nX-Request-Id: r-1\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(5):
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
            writer.close()
            with pytest.raises(aiohttp.ClientConnectionError):
                async with session.post(
                    base + "/api/payment/charge", data=b"{}", headers={"Idempotency-Key": "k-1"}
                ) as resp:
                    await resp.read()
            # The counters are never reset, so a soak can always read them.
            async with session.get(base + "/_sim/faults") as resp:
                assert await resp.json() == {"resets": 2, "failures": 0}
            async with session.get(base + "/_sim/executions") as resp:
                assert await resp.json() == {"keyed": 0, "duplicates": 0}  # reset: not executed
        finally:
            await runner.cleanup()
    lines = [orjson.loads(line) for line in journal_path.read_bytes().splitlines()]
    assert [(e["event"], e["method"], e["request_id"]) for e in lines] == [
        ("reset", "GET", "r-1"),
        ("reset", "POST", None),
    ]


async def test_reset_rate_is_deterministic_with_seed_and_journals_executions(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    spec = BackendSpec(cluster="pay", system="commerce", reset_rate=0.3, seed=11)
    outcomes: list[list[str]] = []
    for run in range(2):
        journal_path = tmp_path / f"journal-{run}.jsonl"
        with journal_path.open("ab") as journal:
            runner = web.AppRunner(make_app(spec, journal), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            base = f"http://127.0.0.1:{runner.addresses[0][1]}"
            seen = []
            try:
                for i in range(30):
                    try:
                        async with session.post(
                            base + "/pay", data=b"{}", headers={"Idempotency-Key": f"k-{i}"}
                        ) as resp:
                            await resp.read()
                            seen.append(str(resp.status))
                    except aiohttp.ClientConnectionError:
                        seen.append("reset")
            finally:
                await runner.cleanup()
        outcomes.append(seen)
        events = [orjson.loads(line) for line in journal_path.read_bytes().splitlines()]
        executed = [e["key"] for e in events if e["event"] == "executed"]
        assert executed == [f"k-{i}" for i, o in enumerate(seen) if o == "200"]
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0]) == {"200", "reset"}
