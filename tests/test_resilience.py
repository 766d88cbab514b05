"""Upstream resilience: load balancing, health, outlier ejection, circuit breaking, retries.

Fault upstreams are raw asyncio servers on loopback (``raw_upstream``); each case checks what
the client got, how often the upstream executed the request and the metrics."""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, get_args

import aiohttp
import orjson
import pytest

from proxy import config as cfg
from proxy import errors
from proxy.balancer import BALANCERS, HashRing, LeastRequest, Random, RoundRobin
from proxy.health import (
    TRANSITIONS,
    ClusterHealth,
    EndpointState,
    Event,
    Health,
    InvalidTransition,
    ejection_time,
)
from proxy.retry import RetryPolicy, failure_condition
from proxy.server import ProxyServer
from proxy.upstream import Endpoint, UpstreamResponse

from .conftest import (
    Harness,
    RawUpstream,
    build_config,
    cluster,
    free_port,
    one_route,
    raw_request,
    raw_upstream,
    read_request,
    until,
)

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
RawHandler = Callable[[RawUpstream, Reader, Writer], Awaitable[None]]

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def sample(p: ProxyServer, name: str, **labels: str) -> float:
    value = p.services.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def upstream_errors(p: ProxyServer, cluster_name: str, kind: str) -> float:
    return sample(p, "jalur_upstream_errors_total", cluster=cluster_name, kind=kind)


def retries(p: ProxyServer, route: str = "all") -> float:
    return sample(p, "jalur_retries_total", route=route)


def healthy(p: ProxyServer, cluster_name: str, url: str) -> float | None:
    return p.services.metrics.registry.get_sample_value(
        "jalur_endpoint_healthy", {"cluster": cluster_name, "endpoint": url}
    )


# -- fault upstreams --------------------------------------------------------------------


async def answer_ok(up: RawUpstream, reader: Reader, writer: Writer) -> None:
    while True:
        line, _headers, _body = await read_request(reader)
        up.requests.append(line.encode())
        writer.write(OK_RESPONSE)
        await writer.drain()


async def accept_and_hang(up: RawUpstream, reader: Reader, writer: Writer) -> None:
    line, _headers, _body = await read_request(reader)
    up.requests.append(line.encode())
    await reader.read()  # until the proxy gives up and closes


async def read_then_reset(up: RawUpstream, reader: Reader, writer: Writer) -> None:
    line, _headers, _body = await read_request(reader)
    up.requests.append(line.encode())
    writer.transport.abort()


async def reset_mid_body(up: RawUpstream, reader: Reader, writer: Writer) -> None:
    line, _headers, _body = await read_request(reader)
    up.requests.append(line.encode())
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    await writer.drain()
    writer.transport.abort()


async def malformed_status(up: RawUpstream, reader: Reader, writer: Writer) -> None:
    line, _headers, _body = await read_request(reader)
    up.requests.append(line.encode())
    writer.write(b"HTTP/1.1 OK-ish\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()


async def huge_headers(up: RawUpstream, reader: Reader, writer: Writer) -> None:
    line, _headers, _body = await read_request(reader)
    up.requests.append(line.encode())
    writer.write(b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 100_000 + b"\r\nContent-Length: 2\r\n\r\n")
    await writer.drain()
    await reader.read()


async def slow_drip(up: RawUpstream, reader: Reader, writer: Writer) -> None:
    line, _headers, _body = await read_request(reader)
    up.requests.append(line.encode())
    for byte in OK_RESPONSE:  # one byte every 50 ms: the head alone takes ~1.5 s
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.05)


FAST_TIMEOUTS = {"connect": 1, "response_headers": 0.3, "idle": 1}
RETRY_ALL = ["connect-failure", "refused", "reset-before-request", "reset", "timeout", 502, 503]


@pytest.mark.parametrize(
    ("handler", "method", "extra", "expect", "executions", "errors_by_kind", "retried"),
    [
        pytest.param(None, "GET", {}, 502, 0, {"connect": 1}, 0, id="refuse"),
        pytest.param(accept_and_hang, "GET", {}, 504, 1, {"timeout": 1}, 0, id="hang"),
        pytest.param(
            accept_and_hang,
            "GET",
            {"retry": {"retry_on": ["timeout"], "per_try_timeout": 0.2}},
            504,
            2,
            {"timeout": 2},
            1,
            id="hang-per-try-timeout-retried",
        ),
        pytest.param(
            accept_and_hang,
            "POST",
            {"retry": {"retry_on": ["timeout"], "per_try_timeout": 0.2}},
            504,
            1,
            {"timeout": 1},
            0,
            id="hang-post-not-retried",
        ),
        pytest.param(read_then_reset, "GET", {}, 502, 1, {"reset": 1}, 0, id="reset-default"),
        pytest.param(
            read_then_reset,
            "GET",
            {"retry": {"retry_on": ["reset"], "attempts": 3}},
            502,
            3,
            {"reset": 3},
            2,
            id="reset-get-retried",
        ),
        pytest.param(
            read_then_reset,
            "POST",
            {"retry": {"retry_on": RETRY_ALL, "attempts": 3}},
            502,
            1,
            {"reset": 1},
            0,
            id="reset-post-never-retried",
        ),
        pytest.param(
            reset_mid_body,
            "GET",
            {"retry": {"retry_on": RETRY_ALL}},
            "abort",
            1,
            {"reset": 1},
            0,
            id="reset-mid-body",
        ),
        pytest.param(
            malformed_status,
            "GET",
            {"retry": {"retry_on": RETRY_ALL}},
            502,
            1,
            {"protocol": 1},
            0,
            id="malformed-status-line",
        ),
        pytest.param(
            huge_headers,
            "GET",
            {"retry": {"retry_on": RETRY_ALL}},
            502,
            1,
            {"protocol": 1},
            0,
            id="huge-headers",
        ),
        pytest.param(slow_drip, "GET", {}, 504, 1, {"timeout": 1}, 0, id="slow-drip"),
    ],
)
async def test_fault_upstreams(
    harness: Harness,
    handler: RawHandler | None,
    method: str,
    extra: dict[str, Any],
    expect: int | str,
    executions: int,
    errors_by_kind: dict[str, int],
    retried: int,
) -> None:
    up = await raw_upstream(handler) if handler is not None else None
    url = up.url if up is not None else f"http://127.0.0.1:{free_port()}"
    extra = {"timeouts": FAST_TIMEOUTS, **extra}
    p = await harness.proxy(one_route({"raw": cluster("tokopedia", url, **extra)}, "raw"))
    data = b"order=1" if method == "POST" else None
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, f"http://127.0.0.1:{p.data_port}/x", data=data) as r,
    ):
        if expect == "abort":
            assert r.status == 200  # the head was relayed before the upstream died
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        else:
            assert r.status == expect
            answer = await r.json()
            assert answer["request_id"] == r.headers["x-request-id"]
            assert answer["kind"] in errors_by_kind
    assert time.monotonic() - started < 3  # bounded by the timeouts, whatever the upstream does
    if up is not None:
        up.server.close()
        assert len(up.requests) == executions
    for kind, n in errors_by_kind.items():
        assert upstream_errors(p, "raw", kind) == n
    assert retries(p) == retried
    if method == "POST" and handler is not None and "retry_on" in extra.get("retry", {}):
        assert "not retried: a POST without Idempotency-Key" in answer["error"]


# -- retries across endpoints -------------------------------------------------------------


async def reset_and_ok(
    harness: Harness, retry: dict[str, Any] | None = None, **route: Any
) -> tuple[ProxyServer, RawUpstream, RawUpstream, list[dict[str, str]]]:
    """Cluster of two: the first endpoint resets after reading, the second answers 200
    (``route``: more fields of the one route)."""
    seen: list[dict[str, str]] = []

    async def good(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        while True:
            line, headers, body = await read_request(reader)
            up.requests.append(line.encode() + b" " + body)
            seen.append(headers)
            writer.write(OK_RESPONSE)
            await writer.drain()

    bad = await raw_upstream(read_then_reset)
    ok = await raw_upstream(good)
    spec = cluster(
        "tokopedia", bad.url, ok.url, retry=retry or {"retry_on": ["reset"]}, timeouts=FAST_TIMEOUTS
    )
    conf = one_route({"pair": spec}, "pair")
    conf["routes"][0].update(route)
    p = await harness.proxy(conf)
    return p, bad, ok, seen


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH"])
async def test_a_refused_connect_is_retried_on_another_endpoint_whatever_the_method(
    harness: Harness, method: str
) -> None:
    """No byte reached the upstream, so even a POST without a key may go elsewhere."""
    live = await raw_upstream(answer_ok)
    dead = f"http://127.0.0.1:{free_port()}"
    p = await harness.proxy(one_route({"pair": cluster("tokopedia", dead, live.url)}, "pair"))
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, f"http://127.0.0.1:{p.data_port}/x", data=b"once") as r,
    ):
        assert r.status == 200
        assert await r.read() == b"ok"
    assert len(live.requests) == 1
    assert upstream_errors(p, "pair", "connect") == 1
    assert retries(p) == 1


async def test_a_refused_connect_is_not_retried_on_the_same_endpoint(harness: Harness) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    p = await harness.proxy(
        one_route({"dead": cluster("tokopedia", dead, retry={"attempts": 5})}, "dead")
    )
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{p.data_port}/x", data=b"a") as r,
    ):
        assert r.status == 502
        answer = await r.json()
    assert answer["kind"] == "connect"
    assert answer["error"].endswith("not retried: no other healthy endpoint to connect to")
    assert upstream_errors(p, "dead", "connect") == 1
    assert retries(p) == 0


async def test_a_retry_passes_the_compliance_guard_again(harness: Harness) -> None:
    """A legacy social cluster's transition deadline passes between the first try and the
    retry: the retry is refused, and nothing goes to another cluster either."""
    bad = await raw_upstream(read_then_reset)
    ok = await raw_upstream(answer_ok)
    commerce = await harness.backend("pay", "tokopedia")
    deadline = time.time() + 3600
    p = await harness.proxy(
        {
            "clusters": {
                "shop-legacy": cluster("tiktok", bad.url, ok.url, retry={"retry_on": ["reset"]}),
                "pay": cluster("tokopedia", commerce.url),
            },
            "routes": [
                {
                    "name": "payment",
                    "match": {},
                    "category": "payment",
                    "split": [
                        {"cluster": "shop-legacy", "weight": 100},
                        {"cluster": "pay", "weight": 0},
                    ],
                }
            ],
            "compliance": {
                "transition_until": datetime.fromtimestamp(deadline, UTC).isoformat(),
                "legacy_clusters": ["shop-legacy"],
                "audit": {"path": str(harness.tmp / "audit.log")},
            },
        }
    )
    assert p.forwarder is not None
    now = iter([deadline - 1, deadline + 1])  # first try inside the window, retry after it
    p.forwarder.clock = lambda: next(now)
    async with (
        aiohttp.ClientSession() as s,
        s.put(f"http://127.0.0.1:{p.data_port}/api/payment/1", data=b"{}") as r,
    ):
        assert r.status == 502
        answer = await r.json()
    assert (
        "not retried: cluster shop-legacy may not serve payment requests now" in (answer["error"])
    )
    assert len(bad.requests) == 1
    assert ok.requests == []
    assert not commerce.received  # never a fallback
    assert retries(p, "payment") == 0
    assert (
        sample(p, "jalur_compliance_blocked_total", route="payment", reason="social-after-deadline")
        == 1
    )


async def test_put_is_retried_on_the_other_endpoint(harness: Harness) -> None:
    p, bad, ok, _ = await reset_and_ok(harness)
    async with (
        aiohttp.ClientSession() as s,
        s.put(f"http://127.0.0.1:{p.data_port}/cart/1", data=b"qty=2") as r,
    ):
        assert r.status == 200
        assert await r.read() == b"ok"
    assert len(bad.requests) == 1  # round robin starts with the first endpoint
    assert ok.requests == [b"PUT /cart/1 HTTP/1.1 qty=2"]  # the buffered body, sent again
    assert retries(p, "all") == 1
    assert upstream_errors(p, "pair", "reset") == 1


async def test_post_with_idempotency_key_is_retried_and_without_is_not(harness: Harness) -> None:
    p, bad, ok, seen = await reset_and_ok(harness)
    base = f"http://127.0.0.1:{p.data_port}"
    async with aiohttp.ClientSession() as s:
        # Round robin: first tries alternate bad, ok, bad, ...
        async with s.post(f"{base}/orders", data=b"item=7") as r:
            assert r.status == 502
            answer = await r.json()
        assert ok.requests == []  # the POST without a key reached the upstream exactly once
        async with s.get(f"{base}/warm") as r:
            assert r.status == 200
        async with s.post(
            f"{base}/orders", data=b"item=8", headers={"Idempotency-Key": "k-123"}
        ) as r:
            assert r.status == 200
    assert answer["kind"] == "reset"
    assert (
        "not retried: a POST without Idempotency-Key may already have been processed"
        in (answer["error"])
    )
    assert len(bad.requests) == 2
    assert ok.requests[1:] == [b"POST /orders HTTP/1.1 item=8"]
    assert seen[1]["idempotency-key"] == "k-123"  # passed through unchanged
    assert "idempotency-key" not in seen[0]  # never invented
    assert retries(p) == 1


@pytest.mark.parametrize("body_size", [4, 1_000_000], ids=["small-body", "large-body"])
async def test_a_retried_5xx_is_discarded_and_the_pool_stays_sound(
    harness: Harness, body_size: int
) -> None:
    """A small 5xx answer already read whole goes back to the pool with its connection; a
    large one is not read: its connection is closed."""
    connections = 0
    dropped = asyncio.Event()

    async def flaky(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        nonlocal connections
        connections += 1
        while True:
            line, _headers, _body = await read_request(reader)
            up.requests.append(line.encode())
            if len(up.requests) > 1:
                writer.write(OK_RESPONSE)
                await writer.drain()
                continue
            head = f"HTTP/1.1 503 Busy\r\nContent-Length: {body_size}\r\n\r\n".encode()
            writer.write(head + b"b" * min(body_size, 1000))
            await writer.drain()
            if body_size > 1000:
                if not await reader.read():  # the proxy dropped this connection
                    dropped.set()
                return

    up = await raw_upstream(flaky)
    spec = cluster("tokopedia", up.url, retry={"retry_on": [503]})
    p = await harness.proxy(one_route({"flaky": spec}, "flaky"))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{p.data_port}/x") as r:
            assert r.status == 200
            assert await r.read() == b"ok"
        async with s.get(f"http://127.0.0.1:{p.data_port}/y") as r:
            assert r.status == 200
            assert await r.read() == b"ok"
    if body_size > 1000:
        async with asyncio.timeout(5):
            await dropped.wait()
        assert connections == 2
    else:
        assert connections == 1
    assert len(up.requests) == 3
    assert retries(p, "all") == 1


async def test_a_5xx_to_a_post_without_key_is_relayed_not_retried(harness: Harness) -> None:
    async def busy(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        while True:
            line, _headers, _body = await read_request(reader)
            up.requests.append(line.encode())
            writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
            await writer.drain()

    up = await raw_upstream(busy)
    spec = cluster("tokopedia", up.url, retry={"retry_on": [502, 503, 504], "attempts": 3})
    p = await harness.proxy(one_route({"busy": spec}, "busy"))
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{p.data_port}/x", data=b"a") as r,
    ):
        assert r.status == 503
        assert await r.read() == b"busy"
    assert len(up.requests) == 1
    assert retries(p) == 0


async def test_a_large_body_is_streamed_and_not_retried(harness: Harness) -> None:
    p, bad, ok, _ = await reset_and_ok(
        harness, {"retry_on": ["reset"], "buffer_bytes": 1024}, buffer_body_bytes=0
    )
    async with (
        aiohttp.ClientSession() as s,
        s.put(f"http://127.0.0.1:{p.data_port}/big", data=b"z" * 10_000) as r,
    ):
        assert r.status == 502
        answer = await r.json()
    assert "larger than retry.buffer_bytes" in answer["error"]
    assert len(bad.requests) == 1
    assert ok.requests == []


async def test_a_thousand_posts_without_key_each_execute_at_most_once(harness: Harness) -> None:
    executions: collections.Counter[bytes] = collections.Counter()
    served = itertools.count()

    async def lossy(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        while True:
            _line, _headers, body = await read_request(reader)
            executions[body] += 1
            if next(served) % 5 == 4:  # every fifth request: read it, then reset
                writer.transport.abort()
                return
            writer.write(OK_RESPONSE)
            await writer.drain()

    a = await raw_upstream(lossy)
    b = await raw_upstream(lossy)
    spec = cluster("tokopedia", a.url, b.url, retry={"retry_on": RETRY_ALL, "attempts": 3})
    p = await harness.proxy(one_route({"lossy": spec}, "lossy"))
    url = f"http://127.0.0.1:{p.data_port}/orders"
    statuses: collections.Counter[int] = collections.Counter()
    queue = iter(range(1000))

    async def client(s: aiohttp.ClientSession) -> None:
        for i in queue:
            async with s.post(url, data=f"order-{i}".encode()) as r:
                await r.read()
                statuses[r.status] += 1

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(client(s) for _ in range(20)))
    assert sum(statuses.values()) == 1000
    assert set(executions) == {f"order-{i}".encode() for i in range(1000)}
    assert max(executions.values()) == 1  # never executed twice
    assert statuses == {200: 800, 502: 200}
    assert retries(p, "all") == 0


# -- circuit breaking, retry budget --------------------------------------------------------


def gated(gate: asyncio.Event, arrived: list[str]) -> RawHandler:
    async def handler(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        while True:
            line, headers, _body = await read_request(reader)
            up.requests.append(line.encode())
            arrived.append(headers["x-request-id"])
            await gate.wait()
            writer.write(OK_RESPONSE)
            await writer.drain()

    return handler


@pytest.mark.parametrize(
    "limits",
    [{"max_requests": 2}, {"max_connections": 1, "max_pending": 1}],
    ids=["max_requests", "max_connections+max_pending"],
)
async def test_circuit_breaker_answers_503_uo_at_once(
    harness: Harness, limits: dict[str, int]
) -> None:
    gate = asyncio.Event()
    arrived: list[str] = []
    up = await raw_upstream(gated(gate, arrived))
    p = await harness.proxy(one_route({"small": cluster("tokopedia", up.url, **limits)}, "small"))
    url = f"http://127.0.0.1:{p.data_port}/x"
    async with aiohttp.ClientSession() as s:

        async def get() -> int:
            async with s.get(url) as r:
                await r.read()
                return r.status

        held = [asyncio.create_task(get()) for _ in range(2)]
        await until(lambda: sample(p, "jalur_circuit_open", cluster="small") == 1)
        async with s.get(url) as r:
            assert r.status == 503
            answer = await r.json()
        assert answer["kind"] == "overflow"
        gate.set()
        assert await asyncio.gather(*held) == [200, 200]
    assert sample(p, "jalur_circuit_open", cluster="small") == 0
    assert upstream_errors(p, "small", "overflow") == 1
    assert len(up.requests) == 2


async def test_retry_budget_limits_concurrent_retries(harness: Harness) -> None:
    first_round: set[str] = set()
    all_first = asyncio.Event()
    release_retries = asyncio.Event()

    async def handler(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        while True:
            line, headers, _body = await read_request(reader)
            up.requests.append(line.encode())
            rid = headers["x-request-id"]
            if rid in first_round:  # a retry: held until the test lets it go
                await release_retries.wait()
                writer.write(OK_RESPONSE)
            else:
                first_round.add(rid)
                if len(first_round) == 10:
                    all_first.set()
                await all_first.wait()
                writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
            await writer.drain()

    up = await raw_upstream(handler)
    retry = {
        "retry_on": [503],
        "budget_percent": 20,
        "min_retry_concurrency": 1,
        "backoff": {"base": 0.001, "max": 0.001},
    }
    p = await harness.proxy(one_route({"c": cluster("tokopedia", up.url, retry=retry)}, "c"))
    url = f"http://127.0.0.1:{p.data_port}/x"
    async with aiohttp.ClientSession() as s:

        async def get() -> int:
            async with s.get(url) as r:
                await r.read()
                return r.status

        tasks = [asyncio.create_task(get()) for _ in range(10)]
        # 20 % of 10 active requests: two may retry; the other eight get the 503 at once.
        done: list[int] = []
        for fut in asyncio.as_completed(tasks):
            done.append(await fut)
            if len(done) == 8:
                break
        assert done == [503] * 8
        await until(lambda: len(up.requests) == 12)  # the two retries are held upstream
        assert retries(p) == 2
        release_retries.set()
        statuses = await asyncio.gather(*tasks)
    assert sorted(statuses) == [200, 200] + [503] * 8
    assert len(up.requests) == 12


# -- health: no healthy endpoint, outlier ejection, active checks, a killed endpoint ------


async def test_outlier_ejection_and_return(harness: Harness) -> None:
    async def failing(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        while True:
            line, _headers, _body = await read_request(reader)
            up.requests.append(line.encode())
            writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\noops")
            await writer.drain()

    bad = await raw_upstream(failing)
    good = await harness.backend("good", "tokopedia")
    spec = cluster(
        "tokopedia",
        bad.url,
        good.url,
        retry={"attempts": 1},
        outlier_detection={"consecutive_5xx": 3, "base_ejection_time": 0.3},
    )
    p = await harness.proxy(one_route({"pair": spec}, "pair"))
    url = f"http://127.0.0.1:{p.data_port}/x"
    async with aiohttp.ClientSession() as s:

        async def statuses(n: int) -> list[int]:
            out = []
            for _ in range(n):
                async with s.get(url) as r:
                    await r.read()
                    out.append(r.status)
            return out

        assert await statuses(6) == [500, 200] * 3
        assert healthy(p, "pair", bad.url) == 0
        assert await statuses(10) == [200] * 10  # ejected: every request to the other one
        await until(lambda: healthy(p, "pair", bad.url) == 1)  # back after 0.3 s
        assert (await statuses(2)).count(500) == 1
    assert len(bad.requests) == 4


async def test_no_healthy_endpoint_is_503_uh_and_never_another_cluster(
    harness: Harness,
) -> None:
    sick_state = {"healthy": True}

    async def health_aware(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        while True:
            line, _headers, _body = await read_request(reader)
            up.requests.append(line.encode())
            if line.startswith("GET /healthz") and not sick_state["healthy"]:
                writer.write(b"HTTP/1.1 503 Down\r\nContent-Length: 0\r\n\r\n")
            else:
                writer.write(OK_RESPONSE)
            await writer.drain()

    up = await raw_upstream(health_aware)
    other = await harness.backend("other", "tokopedia")
    check = {"interval": 0.05, "timeout": 0.5, "unhealthy_threshold": 2, "healthy_threshold": 2}
    conf = {
        "clusters": {
            "pay": cluster("tokopedia", up.url, health_check=check),
            "other": cluster("tokopedia", other.url),
        },
        "routes": [
            {"name": "pay", "match": {"prefix": "/pay"}, "category": "payment", "to": "pay"},
            {"name": "rest", "match": {}, "category": "promotion", "to": "other"},
        ],
    }
    p = await harness.proxy(conf)
    url = f"http://127.0.0.1:{p.data_port}/pay/charge"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=b"{}") as r:
            assert r.status == 200
        sick_state["healthy"] = False
        await until(lambda: healthy(p, "pay", up.url) == 0)
        async with s.post(url, data=b"{}") as r:
            assert r.status == 503
            answer = await r.json()
        assert answer["kind"] == "no_healthy_upstream"
        sick_state["healthy"] = True
        await until(lambda: healthy(p, "pay", up.url) == 1)
        async with s.post(url, data=b"{}") as r:
            assert r.status == 200
    assert not other.received  # never a fallback to another cluster
    assert upstream_errors(p, "pay", "no_healthy_upstream") == 1
    assert sum(1 for line in up.requests if line.startswith(b"POST")) == 2


async def test_one_endpoint_killed_under_load_gives_no_client_errors(harness: Harness) -> None:
    a = await harness.backend("a", "tokopedia")
    b = await harness.backend("b", "tokopedia")
    spec = cluster(
        "tokopedia",
        a.url,
        b.url,
        health_check={"interval": 0.2, "timeout": 0.2, "unhealthy_threshold": 1},
        retry={
            "attempts": 3,
            "retry_on": ["connect-failure", "reset", 502, 503],
            "budget_percent": 100,
        },
        timeouts={"connect": 0.5, "response_headers": 2, "idle": 2},
    )
    p = await harness.proxy(one_route({"pair": spec}, "pair"))
    url = f"http://127.0.0.1:{p.data_port}/x"
    results: collections.Counter[int | str] = collections.Counter()
    stop = asyncio.Event()

    async def client(s: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with s.get(url) as r:
                    await r.read()
                    results[r.status] += 1
            except aiohttp.ClientError as exc:
                results[type(exc).__name__] += 1

    async with aiohttp.ClientSession() as s:
        clients = [asyncio.create_task(client(s)) for _ in range(8)]
        await until(lambda: len(b.received) >= 50)
        harness.runners.remove(b.runner)
        await b.runner.cleanup()  # endpoint b is gone
        killed = time.monotonic()
        await until(lambda: healthy(p, "pair", b.url) == 0, within=2)
        out_after = time.monotonic() - killed
        served = results[200]
        await until(lambda: results[200] >= served + 200)
        stop.set()
        await asyncio.gather(*clients)
    assert set(results) == {200}, results
    assert retries(p) >= 1  # failures on b happened, and were retried on a
    assert out_after <= 0.2 * 1.1 + 0.3  # within about one health interval
    assert len(a.received) > 0


# -- load balancing -------------------------------------------------------------------------


def hosts(n: int, port: int = 9000) -> tuple[EndpointState, ...]:
    return tuple(EndpointState(Endpoint.parse(f"http://127.0.0.1:{port + i}")) for i in range(n))


def test_every_lb_policy_name_has_a_strategy() -> None:
    assert set(BALANCERS) == set(get_args(cfg.LbPolicy))


def test_round_robin_is_exactly_even() -> None:
    hs = hosts(3)
    rr = RoundRobin(hs)
    picks = collections.Counter(rr.pick(hs, None) for _ in range(300))
    assert list(picks.values()) == [100, 100, 100]


def test_random_is_roughly_uniform() -> None:
    random.seed(7)
    hs = hosts(4)
    picks = collections.Counter(Random(hs).pick(hs, None) for _ in range(8000))
    assert all(1800 < n < 2200 for n in picks.values())


def test_least_request_prefers_the_less_busy() -> None:
    random.seed(3)
    two = hosts(2)
    two[0].active = 5
    lr = LeastRequest(two)
    assert {lr.pick(two, None) for _ in range(100)} == {two[1]}
    three = hosts(3)
    three[0].active, three[1].active, three[2].active = 4, 0, 4
    picks = collections.Counter(lr.pick(three, None) for _ in range(3000))
    assert picks[three[1]] > 1800  # power of two choices: picked whenever sampled (2/3)


def test_hash_is_sticky_and_adding_an_endpoint_moves_about_one_nth() -> None:
    four = hosts(4)
    ring4 = HashRing(four)
    keys = [f"user-{i}" for i in range(20_000)]
    before = {k: ring4.pick(four, k).endpoint.url for k in keys}
    assert all(ring4.pick(four, k).endpoint.url == before[k] for k in keys[:500])
    shares = collections.Counter(before.values())
    assert all(0.18 < n / len(keys) < 0.32 for n in shares.values())
    five = hosts(5)  # the same four, plus one
    ring5 = HashRing(five)
    after = {k: ring5.pick(five, k).endpoint.url for k in keys}
    moved = [k for k in keys if after[k] != before[k]]
    assert 0.14 < len(moved) / len(keys) < 0.26  # ~1/5
    assert {after[k] for k in moved} == {five[4].endpoint.url}  # only to the new one


def test_hash_skips_an_unavailable_endpoint_and_moves_only_its_keys() -> None:
    four = hosts(4)
    ring = HashRing(four)
    keys = [f"user-{i}" for i in range(5000)]
    before = {k: ring.pick(four, k) for k in keys}
    without = four[:2] + four[3:]
    after = {k: ring.pick(without, k) for k in keys}
    for k in keys:
        if before[k] is four[2]:
            assert after[k] is not four[2]
        else:
            assert after[k] is before[k]


async def test_round_robin_and_hash_through_the_proxy(harness: Harness) -> None:
    backends = [await harness.backend(n, "tokopedia") for n in ("x", "y", "z")]
    urls = [b.url for b in backends]
    conf = {
        "clusters": {
            "rr": cluster("tokopedia", *urls),
            "sticky": cluster("tokopedia", *urls, lb_policy="hash", hash_on={"header": "x-user"}),
        },
        "routes": [
            {"name": "rr", "match": {"prefix": "/rr"}, "category": "promotion", "to": "rr"},
            {"name": "st", "match": {"prefix": "/st"}, "category": "promotion", "to": "sticky"},
        ],
    }
    p = await harness.proxy(conf)
    base = f"http://127.0.0.1:{p.data_port}"
    async with aiohttp.ClientSession() as s:
        for _ in range(30):
            async with s.get(f"{base}/rr") as r:
                assert r.status == 200
        assert [len(b.received) for b in backends] == [10, 10, 10]
        for user in ("alice", "bob", "carol"):
            seen = set()
            for _ in range(10):
                async with s.get(f"{base}/st", headers={"x-user": user}) as r:
                    seen.add(r.headers["x-backend-cluster"])
            assert len(seen) == 1


# -- the endpoint state machine --------------------------------------------------------------


@pytest.mark.parametrize(("pair", "new"), list(TRANSITIONS.items()), ids=str)
def test_every_valid_transition(pair: tuple[Health, Event], new: Health) -> None:
    host = hosts(1)[0]
    host.state = pair[0]
    assert host.process(pair[1]) is new
    assert host.state is new


@pytest.mark.parametrize(
    "pair",
    [(s, e) for s in Health for e in Event if (s, e) not in TRANSITIONS],
    ids=str,
)
def test_invalid_transitions_raise(pair: tuple[Health, Event]) -> None:
    host = hosts(1)[0]
    host.state = pair[0]
    with pytest.raises(InvalidTransition):
        host.process(pair[1])
    assert host.state is pair[0]


def state(host: EndpointState) -> Health:
    """The endpoint's state, read through a call (so a type checker does not narrow it)."""
    return host.state


class FakeMetrics:
    def __init__(self) -> None:
        self.healthy: dict[str, bool] = {}

    def set_endpoint_healthy(self, endpoint: str, is_healthy: bool) -> None:
        self.healthy[endpoint] = is_healthy


class NoTransport:
    async def send(self, *args: Any) -> UpstreamResponse:
        raise errors.ConnectFailed("no")

    async def close(self) -> None:
        pass


def cluster_health(n: int, **outlier: Any) -> tuple[ClusterHealth, FakeMetrics, list[float]]:
    spec = build_config(
        {
            "clusters": {
                "c": cluster(
                    "tokopedia",
                    *(f"http://127.0.0.1:{9000 + i}" for i in range(n)),
                    outlier_detection=outlier,
                )
            }
        }
    ).clusters["c"]
    now = [100.0]
    metrics = FakeMetrics()
    health = ClusterHealth(
        "c",
        hosts(n),
        spec,
        NoTransport(),
        metrics,  # type: ignore[arg-type]
        clock=lambda: now[0],
    )
    return health, metrics, now


async def test_passive_ejection_respects_max_ejection_percent() -> None:
    health, metrics, _ = cluster_health(4, consecutive_5xx=2, max_ejection_percent=50)
    a, b, c, d = health.hosts
    for host in (a, b, c):
        health.failed(host, connect=False)
        health.failed(host, connect=False)
    assert (a.state, b.state, c.state) == (Health.EJECTED, Health.EJECTED, Health.HEALTHY)
    assert health.available == (c, d)
    assert metrics.healthy[a.endpoint.url] is False
    assert metrics.healthy[c.endpoint.url] is True
    health.succeeded(d)
    health.failed(d, connect=True)
    health.succeeded(d)  # a success ends the streak
    health.failed(d, connect=False)
    assert state(d) is Health.HEALTHY
    await health.close()


async def test_single_endpoint_is_never_ejected() -> None:
    health, _, _ = cluster_health(1, consecutive_5xx=1)
    for _ in range(10):
        health.failed(health.hosts[0], connect=True)
    assert health.available == health.hosts
    await health.close()


async def test_connect_failures_eject_sooner_and_ejections_grow() -> None:
    health, _, now = cluster_health(
        2, consecutive_connect_failures=2, base_ejection_time=10, max_ejection_time=25
    )
    a = health.hosts[0]
    health.failed(a, connect=True)
    health.failed(a, connect=True)
    assert state(a) is Health.EJECTED
    assert a.ejections == 1
    assert a.timer is not None
    assert 9 < a.timer.when() - asyncio.get_running_loop().time() <= 10
    health._ejection_over(a)  # the timer firing
    assert state(a) is Health.HEALTHY
    for _ in range(2):
        health.failed(a, connect=True)
    assert a.ejections == 2  # ejected again at once: twice as long
    health._ejection_over(a)
    now[0] += 15  # 15 s in service: the multiplier drops by one
    for _ in range(2):
        health.failed(a, connect=True)
    assert a.ejections == 2
    spec = cfg.OutlierDetection(base_ejection_time=10, max_ejection_time=25)
    assert [ejection_time(n, spec) for n in (1, 2, 3, 4)] == [10, 20, 25, 25]
    await health.close()
    assert a.timer is None


async def test_active_checks_need_threshold_streaks() -> None:
    spec = build_config(
        {
            "clusters": {
                "c": cluster(
                    "tokopedia",
                    "http://127.0.0.1:9000",
                    "http://127.0.0.1:9001",
                    health_check={"unhealthy_threshold": 2, "healthy_threshold": 3},
                )
            }
        }
    ).clusters["c"]
    health = ClusterHealth("c", hosts(2), spec, NoTransport())
    a = health.hosts[0]
    assert await health.probe(a) is False  # connect failed
    health.checked(a, False)
    health.checked(a, True)
    health.checked(a, False)
    assert state(a) is Health.HEALTHY
    health.checked(a, False)
    assert state(a) is Health.UNHEALTHY
    for _ in range(2):
        health.checked(a, True)
    assert state(a) is Health.UNHEALTHY
    health.checked(a, True)
    assert state(a) is Health.HEALTHY
    # A failing check turns an ejected endpoint unhealthy (and cancels its ejection).
    for _ in range(5):
        health.failed(a, connect=False)
    assert state(a) is Health.EJECTED
    health.checked(a, False)
    health.checked(a, False)
    assert state(a) is Health.UNHEALTHY
    assert a.timer is None
    assert health.ejected == 0
    await health.close()


# -- retry rules and configuration -------------------------------------------------------------


def test_failure_conditions() -> None:
    refused = errors.ConnectFailed("x")
    refused.__cause__ = ConnectionRefusedError()
    unsent = errors.UpstreamReset("stale keep-alive connection", request_bytes_sent=0)
    assert failure_condition(errors.ConnectRefused("x")) == "refused"
    assert failure_condition(refused) == "refused"
    assert failure_condition(errors.ConnectFailed("x")) == "connect-failure"
    assert failure_condition(errors.ConnectTimeout("x")) == "connect-failure"
    assert failure_condition(unsent) == "reset-before-request"
    assert failure_condition(errors.UpstreamReset("x")) == "reset"
    assert failure_condition(errors.ResponseTimeout("x")) == "timeout"
    assert failure_condition(errors.UpstreamProtocolError("x")) is None
    assert failure_condition(errors.BadRequest("x")) is None


def test_retry_verdicts() -> None:
    policy = RetryPolicy(cfg.Retry(retry_on=["connect-failure", "reset", 503]), 15.0)
    reset = errors.UpstreamReset("x")
    unsent = errors.UpstreamReset("x", request_bytes_sent=0)
    assert policy.error_verdict(errors.ConnectRefused("x"), "POST", False, True) is None
    assert policy.error_verdict(unsent, "POST", False, True) is None  # "reset" implies it
    assert (
        policy.error_verdict(unsent, "POST", False, False)
        == "the request body was already streamed"
    )
    assert policy.error_verdict(reset, "PUT", True, True) is None
    assert "POST without Idempotency-Key" in (
        policy.error_verdict(reset, "POST", False, True) or ""
    )
    assert policy.error_verdict(reset, "PUT", True, False) == (
        "the request body is larger than retry.buffer_bytes"
    )
    assert policy.error_verdict(errors.ResponseTimeout("x"), "GET", True, True) == ""
    assert policy.status_verdict(503, True, True)
    assert not policy.status_verdict(503, False, True)
    assert not policy.status_verdict(502, True, True)
    assert all(0 <= policy.backoff(n) <= 0.25 for n in range(1, 20))
    narrow = RetryPolicy(cfg.Retry(retry_on=["refused"]), 15.0)
    assert narrow.error_verdict(errors.ConnectFailed("unreachable"), "GET", True, True) == ""


def test_config_defaults_and_validation() -> None:
    spec = build_config(
        {"clusters": {"c": cluster("tokopedia", "http://127.0.0.1:9000")}}
    ).clusters["c"]
    assert spec.lb_policy == "round_robin"
    assert spec.keepalive_idle_timeout == 15.0
    assert spec.retry.attempts == 2
    assert spec.retry.retry_on == ["connect-failure", "refused", "reset-before-request"]
    assert spec.retry.buffer_bytes == 64 * 1024
    assert spec.health_check is None
    assert spec.outlier_detection.max_ejection_percent == 50
    bad: list[tuple[dict[str, Any], str]] = [
        ({"lb_policy": "hash"}, "hash_on"),
        ({"hash_on": {"header": "x-user"}}, "hash_on"),
        ({"lb_policy": "fastest"}, "lb_policy"),
        ({"retry": {"retry_on": [404]}}, "retry_on[0]"),
        ({"retry": {"retry_on": ["sometimes"]}}, "retry_on[0]"),
        ({"retry": {"backoff": {"base": 1, "max": 0.5}}}, "backoff"),
        ({"health_check": {"path": "healthz"}}, "health_check.path"),
    ]
    for extra, where in bad:
        with pytest.raises(cfg.ConfigError) as info:
            build_config({"clusters": {"c": cluster("tokopedia", "http://127.0.0.1:9", **extra)}})
        assert where in str(info.value), (extra, str(info.value))


def test_error_bodies_name_the_kind() -> None:
    for exc in (errors.Overflow("x"), errors.NoHealthyUpstream("x")):
        assert exc.status == 503
    assert (errors.Overflow.flag, errors.Overflow.kind) == ("UO", "overflow")
    assert orjson.loads(orjson.dumps({"kind": errors.Overflow.kind}))["kind"] == "overflow"


# -- the keep-alive race ------------------------------------------------------------------


async def test_a_pooled_connection_found_closed_is_resent_only_for_a_bodiless_idempotent_request(
    harness: Harness,
) -> None:
    """Each upstream connection answers its first request, then reads the next one and closes
    without an answer (what a keep-alive timeout racing the request looks like). A GET is
    sent again on a new connection, with retries off; a POST without a key is not (502)."""
    connections = 0

    async def closes_after_one(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        nonlocal connections
        connections += 1
        line, _headers, _body = await read_request(reader)
        up.requests.append(line.encode())
        writer.write(OK_RESPONSE)
        await writer.drain()
        line, _headers, _body = await read_request(reader)
        up.requests.append(line.encode())
        writer.close()

    up = await raw_upstream(closes_after_one)
    p = await harness.proxy(one_route({"c": cluster("tokopedia", up.url)}, "c"))
    base = f"http://127.0.0.1:{p.data_port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/first") as r:
            assert r.status == 200
        async with s.get(f"{base}/second") as r:  # pooled connection closes on it
            assert r.status == 200
            assert await r.read() == b"ok"
        async with s.post(f"{base}/pay", data=b"x") as r:  # pooled again, closes again
            assert r.status == 502
            assert (await r.json())["kind"] == "reset"
    assert [line.split()[1] for line in up.requests] == [
        b"/first", b"/second", b"/second", b"/pay",
    ]  # fmt: skip
    assert connections == 2
    assert retries(p) == 0  # not a retry: the same request on a working connection
    assert healthy(p, "c", up.url) == 1  # the race is not the endpoint's fault


async def test_a_per_try_timeout_during_a_slow_upload_is_not_the_endpoints_fault(
    harness: Harness,
) -> None:
    """A client that stalls its upload past ``per_try_timeout`` gets its 504, but the endpoint
    stays healthy; an endpoint that hangs on a bodiless GET is ejected (one failure ejects)."""

    async def waits(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        line = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n", 1)[0]
        up.requests.append(line)
        await reader.read()  # waits for the body (or hangs) until the proxy gives up

    ups = [await raw_upstream(waits) for _ in range(2)]
    spec = cluster(
        "tokopedia",
        *(u.url for u in ups),
        retry={"retry_on": [], "per_try_timeout": 0.3},
        outlier_detection={"consecutive_5xx": 1},
    )
    conf = one_route({"c": spec}, "c")
    conf["routes"][0]["buffer_body_bytes"] = 0  # streamed: the stall happens mid-exchange
    p = await harness.proxy(conf)
    talk = await raw_request(
        p.data_port, b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"
    )
    assert talk.status == 504
    assert [healthy(p, "c", u.url) for u in ups] == [1, 1]
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{p.data_port}/hang") as r:
        assert r.status == 504
    assert sorted(healthy(p, "c", u.url) or 0.0 for u in ups) == [0, 1]
