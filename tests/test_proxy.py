"""The core data path on real loopback sockets: routing, headers, errors, streaming, WebSocket."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

from proxy.accesslog import AccessLog

from .conftest import (
    Harness,
    RawUpstream,
    build_config,
    cluster,
    free_port,
    one_route,
    raw_request,
    raw_upstream,
    read_head,
    read_request,
    until,
)


async def routing_setup(h: Harness) -> int:
    """Clusters a..f on their own echo back ends; routes exercising every matcher kind."""
    for name in "abcdefg":
        await h.backend(name, "tokopedia")
    clusters = {n: cluster("tokopedia", b.url) for n, b in h.backends.items()}
    routes = [
        {"name": "exact", "match": {"exact": "/exact"}, "category": "promotion", "to": "a"},
        {
            "name": "regex",
            "match": {"regex": r"/orders/[0-9]+"},
            "category": "promotion",
            "to": "b",
        },
        {
            "name": "host",
            "match": {"prefix": "/", "host": "*.shop.test"},
            "category": "promotion",
            "to": "c",
        },
        {
            "name": "header",
            "match": {
                "prefix": "/api",
                "headers": [
                    {"name": "x-canary", "exact": "1"},
                    {"name": "x-block", "present": True, "invert": True},
                ],
            },
            "category": "promotion",
            "to": "d",
        },
        {
            "name": "post-only",
            "match": {"prefix": "/api/pay", "methods": ["POST"]},
            "category": "promotion",
            "to": "e",
        },
        {
            "name": "ci",
            "match": {"prefix": "/API/CART", "case_sensitive": False},
            "category": "promotion",
            "to": "f",
        },
        {"name": "api", "match": {"prefix": "/api"}, "category": "promotion", "to": "g"},
    ]
    p = await h.proxy({"clusters": clusters, "routes": routes})
    return p.data_port


@pytest.mark.parametrize(
    ("method", "path", "headers", "expected"),
    [
        ("GET", "/exact", {}, "a"),
        ("GET", "/orders/42", {}, "b"),
        ("GET", "/api/x", {"Host": "m.shop.test"}, "c"),
        ("GET", "/api/x", {"Host": "m.shop.test:8080"}, "c"),
        ("GET", "/api/x", {"x-canary": "1"}, "d"),
        ("GET", "/api/x", {"x-canary": "1", "x-block": "yes"}, "g"),
        ("POST", "/api/pay", {}, "e"),
        ("GET", "/api/pay", {}, "g"),
        ("GET", "/api/cart/1", {}, "f"),
        ("GET", "/api/x", {}, "g"),
    ],
)
async def test_each_matcher_kind_and_first_match_wins(
    harness: Harness, method: str, path: str, headers: dict[str, str], expected: str
) -> None:
    port = await routing_setup(harness)
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, f"http://127.0.0.1:{port}{path}", headers=headers) as r,
    ):
        assert r.status == 200
        assert r.headers["x-backend-cluster"] == expected


@pytest.mark.parametrize("path", ["/exact/more", "/orders/42x", "/other", "/"])
async def test_no_route_is_404_json_and_nothing_forwarded(harness: Harness, path: str) -> None:
    port = await routing_setup(harness)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        assert r.status == 404
        body = await r.json()
    assert body["error"] == "no route matches this request"
    assert body["request_id"] == r.headers["x-request-id"]
    assert all(not b.received for b in harness.backends.values())


async def simple_proxy(h: Harness, **cluster_extra: Any) -> tuple[int, str]:
    b = await h.backend("pay", "tokopedia")
    p = await h.proxy(
        {
            "clusters": {"pay": cluster("tokopedia", b.url, **cluster_extra)},
            "routes": [
                {"name": "all", "match": {"prefix": "/"}, "category": "payment", "to": "pay"}
            ],
        }
    )
    return p.data_port, b.url


@pytest.mark.parametrize(
    ("raw", "forwarded"),
    [
        ("/api/a/./b/../c", "/api/a/c"),
        ("/api//feed///x", "/api/feed/x"),
        ("/api/%7Euser/%41", "/api/~user/A"),
        ("/api/%2e%2e/x", "/x"),
        ("/api/q?a=%2F&b=1", "/api/q"),
    ],
)
async def test_the_canonical_path_is_what_is_forwarded(
    harness: Harness, raw: str, forwarded: str
) -> None:
    port, _ = await simple_proxy(harness)
    r = await raw_request(port, f"GET {raw} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert r.status == 200
    got = harness.backends["pay"].received[-1]
    assert got.path == forwarded
    if "?" in raw:
        assert got.query == raw.split("?", 1)[1]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("/api/a%2Fb", "encoded-slash"),
        ("/api/a%5cb", "encoded-backslash"),
        ("/api/%252e", "double-encoding"),
        ("/api/pay;jsessionid=1", "path-parameter"),
        ("/api/%C0%AE%C0%AE/x", "invalid-utf8"),
        ("/../etc", "dot-segment-above-root"),
        ("http://evil.test/api", "authority-mismatch"),
    ],
)
async def test_ambiguous_paths_are_400_json_and_nothing_forwarded(
    harness: Harness, raw: str, reason: str
) -> None:
    port, _ = await simple_proxy(harness)
    r = await raw_request(port, f"GET {raw} HTTP/1.1\r\nHost: shop.test\r\n\r\n".encode())
    assert r.status == 400
    import orjson

    body = orjson.loads(r.body)
    assert body["reason"] == reason
    assert body["request_id"] == r.header("x-request-id")
    assert not harness.backends["pay"].received


async def test_hop_by_hop_and_connection_named_headers_are_stripped(harness: Harness) -> None:
    port, _ = await simple_proxy(harness)
    req = (
        b"GET /x HTTP/1.1\r\nHost: shop.test\r\n"
        b"Connection: keep-alive, X-Secret-Hop\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: x-t\r\n"
        b"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\n"
        b"X-Secret-Hop: 1\r\nX-Kept: yes\r\n\r\n"
    )
    r = await raw_request(port, req)
    assert r.status == 200
    names = {k.lower() for k, _ in harness.backends["pay"].received[-1].headers}
    for hop in (
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "proxy-connection",
        "proxy-authorization",
        "x-secret-hop",
    ):
        assert hop not in names
    assert "x-kept" in names


async def test_response_hop_by_hop_headers_are_stripped(harness: Harness) -> None:
    async def handler(
        up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Internal\r\n"
            b"X-Internal: secret\r\nKeep-Alive: timeout=1\r\nX-Public: ok\r\n\r\nok"
        )
        await writer.drain()

    up = await raw_upstream(handler)
    p = await harness.proxy(one_route({"raw": cluster("tokopedia", up.url)}, "raw"))
    r = await raw_request(p.data_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    up.server.close()
    assert r.status == 200
    assert r.body == b"ok"
    assert r.header("x-public") == "ok"
    assert r.header("x-internal") is None
    assert r.header("keep-alive") is None


async def test_forwarded_headers_via_and_request_id(harness: Harness) -> None:
    port, _ = await simple_proxy(harness)
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"http://127.0.0.1:{port}/x",
            headers={"X-Forwarded-For": "203.0.113.7", "Host": "shop.test", "Via": "1.0 edge"},
        ) as r:
            assert r.status == 200
            generated = r.headers["x-request-id"]
            echo = await r.json()
        async with s.get(f"http://127.0.0.1:{port}/x", headers={"X-Request-Id": "abc-123"}) as r2:
            assert r2.headers["x-request-id"] == "abc-123"
        async with s.get(
            f"http://127.0.0.1:{port}/x", headers={"X-Request-Id": "bad id\twith spaces"}
        ) as r3:
            assert r3.headers["x-request-id"] != "bad id\twith spaces"
            assert len(r3.headers["x-request-id"]) == 36
    sent = {k.lower(): v for k, v in echo["headers"]}
    # xff_num_trusted_hops 0 (the default): the peer replaces what the client claimed.
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["x-forwarded-proto"] == "http"
    assert sent["x-forwarded-host"] == "shop.test"
    assert sent["host"] == "shop.test"
    assert sent["via"] == "1.0 edge, 1.1 jalur"
    assert sent["x-request-id"] == generated
    assert len(generated) == 36


async def test_connect_refused_is_502_json(harness: Harness) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    p = await harness.proxy(one_route({"dead": cluster("tokopedia", dead)}, "dead"))
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{p.data_port}/") as r:
        assert r.status == 502
        body = await r.json()
    assert body["kind"] == "connect"
    assert body["request_id"] == r.headers["x-request-id"]


async def test_slow_upstream_is_504_json(harness: Harness) -> None:
    port, _ = await simple_proxy(harness, timeouts={"response_headers": 0.2})
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/_sim/delay/3000") as r:
        assert r.status == 504
        body = await r.json()
    assert body["kind"] == "timeout"
    assert "error" in body
    assert "request_id" in body


async def test_reset_before_response_is_502(harness: Harness) -> None:
    async def handler(
        up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader)
        writer.transport.abort()

    up = await raw_upstream(handler)
    p = await harness.proxy(one_route({"raw": cluster("tokopedia", up.url)}, "raw"))
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{p.data_port}/") as r:
        assert r.status == 502
        body = await r.json()
    up.server.close()
    assert body["kind"] == "reset"


async def test_reset_after_headers_aborts_the_client_connection(harness: Harness) -> None:
    async def handler(
        up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        writer.transport.abort()

    up = await raw_upstream(handler)
    p = await harness.proxy(one_route({"raw": cluster("tokopedia", up.url)}, "raw"))
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{p.data_port}/") as r:
        assert r.status == 200  # the head was already relayed
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    up.server.close()


@pytest.mark.parametrize(
    ("then", "flag", "kind"),
    [
        pytest.param(b"", "UT", "timeout", id="body-stalls"),
        pytest.param(None, "UC", "reset", id="reset"),
        pytest.param(b"zz\r\n", "UPE", "protocol", id="bad-chunk-size"),
    ],
)
async def test_a_failure_mid_body_is_logged_with_its_own_flag(
    harness: Harness, then: bytes | None, flag: str, kind: str
) -> None:
    """After the head was relayed the client connection is cut, whatever went wrong; the
    access log says what: UT (the body stopped coming), UC (reset), UPE (bad framing)."""

    async def handler(
        up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        if then is None:
            writer.transport.abort()
            return
        writer.write(then)
        await writer.drain()
        await reader.read()  # until the proxy gives up on this connection

    up = await raw_upstream(handler)
    timeouts = {"connect": 1, "response_headers": 1, "idle": 0.3}
    p = await harness.proxy(
        one_route({"raw": cluster("tokopedia", up.url, timeouts=timeouts)}, "raw")
    )
    out = io.BytesIO()
    p.services.access = AccessLog(stream=out, flush_interval=0.01)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{p.data_port}/") as r:
        assert r.status == 200  # the head was already relayed
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    up.server.close()
    await until(lambda: out.getvalue().endswith(b"\n"))
    (line,) = [orjson.loads(raw) for raw in out.getvalue().splitlines()]
    assert (line["response_code"], line["response_flags"]) == (200, flag)
    errors = p.services.metrics.registry.get_sample_value(
        "jalur_upstream_errors_total", {"cluster": "raw", "kind": kind}
    )
    assert errors == 1


@pytest.mark.parametrize(("method", "body"), [("PUT", b"charge=1"), ("PUT", b""), ("DELETE", b"")])
async def test_idempotent_method_on_a_dropped_keepalive_connection_reaches_upstream_once(
    harness: Harness, method: str, body: bytes
) -> None:
    """aiohttp re-sends GET/PUT/DELETE when a pooled connection turns out dead; the proxy
    must not (it decides retries itself): the request reached the upstream once and the
    client gets a 502."""
    seen: list[tuple[str, bytes]] = []

    async def handler(
        up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            line, _headers, got = await read_request(reader)
            if line.startswith(method):
                seen.append((line, got))
                return  # read the whole request, then drop the connection unanswered
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    up = await raw_upstream(handler)
    p = await harness.proxy(one_route({"raw": cluster("tokopedia", up.url)}, "raw", "payment"))
    base = f"http://127.0.0.1:{p.data_port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/warm") as r:
            assert r.status == 200  # leaves a pooled keep-alive connection upstream
        async with s.request(method, f"{base}/order/1", data=body) as r:
            assert r.status == 502
            answer = await r.json()
    up.server.close()
    assert seen == [(f"{method} /order/1 HTTP/1.1", body)]
    assert answer["kind"] == "reset"


async def test_websocket_echo_through_the_proxy(harness: Harness) -> None:
    b = await harness.backend("live", "tiktok")
    p = await harness.proxy(
        {
            "clusters": {"live": cluster("tiktok", b.url)},
            "routes": [
                {
                    "name": "live",
                    "match": {"prefix": "/api/live"},
                    "category": "promotion",
                    "to": "live",
                }
            ],
        }
    )
    url = f"http://127.0.0.1:{p.data_port}/api/live/_sim/ws"
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        await ws.send_str("hello")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.TEXT
        assert msg.data == "hello"
        await ws.send_bytes(b"\x00\x01binary")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.BINARY
        assert msg.data == b"\x00\x01binary"
    assert any(r.path.endswith("/_sim/ws") for r in b.received)


async def test_an_upgrade_keeps_the_state_it_started_on_across_a_reload(
    harness: Harness,
) -> None:
    """A reload while an upgrade waits for the upstream's handshake: the upgrade finishes
    on the config it started with (its error count belongs to that state), even though the
    new config no longer has its cluster."""
    asked, release = asyncio.Event(), asyncio.Event()

    async def handler(
        up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_head(reader)
        asked.set()
        await release.wait()
        writer.transport.abort()  # no 101: the handshake fails

    up = await raw_upstream(handler)
    b = await harness.backend("other", "tiktok")
    live = {"name": "live", "match": {"prefix": "/live"}, "category": "promotion", "to": "live"}
    p = await harness.proxy({"clusters": {"live": cluster("tiktok", up.url)}, "routes": [live]})
    old = p.state
    url = f"http://127.0.0.1:{p.data_port}/live/ws"
    async with aiohttp.ClientSession() as s:
        upgrade = asyncio.ensure_future(s.ws_connect(url))
        try:
            async with asyncio.timeout(5):
                await asked.wait()
            other = {"name": "other", "match": {}, "category": "promotion", "to": "other"}
            conf = build_config(
                {"clusters": {"other": cluster("tiktok", b.url)}, "routes": [other]}
            )
            assert await p.reload(conf)
            assert p.state is not old
            release.set()
            with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
                async with asyncio.timeout(5):
                    await upgrade
        finally:
            upgrade.cancel()
    up.server.close()
    assert failed.value.status == 502  # not a 500 from looking up "live" in the new config
    errors = p.services.metrics.registry.get_sample_value(
        "jalur_upstream_errors_total", {"cluster": "live", "kind": "reset"}
    )
    assert errors == 1


async def test_expect_100_continue_is_answered_and_body_forwarded(harness: Harness) -> None:
    port, _ = await simple_proxy(harness)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    async with asyncio.timeout(5):
        interim = await reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    await writer.drain()
    async with asyncio.timeout(5):
        line, headers = await read_head(reader)
        body = await reader.readexactly(int(headers["content-length"]))
    writer.close()
    assert " 200 " in line
    assert b'"body_bytes":5' in body


async def test_slow_request_head_gets_408_and_close(harness: Harness) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(
        {
            "listen": {"host": "127.0.0.1", "port": 0, "header_read_timeout": 0.3},
            "clusters": {"pay": cluster("tokopedia", b.url)},
            "routes": [{"name": "all", "match": {}, "category": "promotion", "to": "pay"}],
        }
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", p.data_port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finishes the head
    await writer.drain()
    async with asyncio.timeout(5):
        data = await reader.read()  # until the proxy closes
    writer.close()
    assert data.startswith(b"HTTP/1.1 408")
    assert b'"error"' in data
    assert not b.received
    # A well-behaved client on the same proxy is still served.
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{p.data_port}/") as r:
        assert r.status == 200


async def test_head_and_no_content_responses_have_no_body(harness: Harness) -> None:
    port, _ = await simple_proxy(harness)
    async with aiohttp.ClientSession() as s:
        async with s.head(f"http://127.0.0.1:{port}/_sim/bytes/1000") as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == "1000"
            assert await r.read() == b""
        async with s.get(f"http://127.0.0.1:{port}/_sim/status/204") as r:
            assert r.status == 204
            assert await r.read() == b""
        async with s.get(f"http://127.0.0.1:{port}/_sim/status/503") as r:
            assert r.status == 503  # upstream status passed through unchanged
            assert r.headers["x-backend-cluster"] == "pay"


async def test_query_is_passed_verbatim(harness: Harness) -> None:
    port, _ = await simple_proxy(harness)
    url = URL(f"http://127.0.0.1:{port}/s?q=a%20b&x=%2F&x=2", encoded=True)
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        echo = await r.json()
    assert echo["query"] == "q=a%20b&x=%2F&x=2"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        b"GET %EF%BC%8Fx HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"BLAH\r\n\r\n",
    ],
)
async def test_malformed_requests_get_json_400_and_are_counted(
    harness: Harness, request_bytes: bytes
) -> None:
    port, _ = await simple_proxy(harness)
    r = await raw_request(port, request_bytes)
    assert r.status == 400
    import orjson

    body = orjson.loads(r.body)
    assert body["reason"] == "malformed"
    assert body["request_id"]
    assert body["error"].startswith("malformed request")
    assert not harness.backends["pay"].received
    metrics = harness.proxies[0].services.metrics
    assert (
        metrics.registry.get_sample_value("jalur_requests_rejected_total", {"reason": "malformed"})
        == 1
    )
