"""Per-route traffic policy on real sockets: a whole-request deadline across retries, a
route's ``retry`` block overriding its cluster's, and the check that refuses a deadline the
tries cannot fit in."""

from __future__ import annotations

import asyncio
import io
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy import cli
from proxy import config as cfg
from proxy.server import ProxyServer

from .conftest import (
    SYSTEMS,
    Backend,
    Harness,
    RawUpstream,
    RedisServer,
    build_config,
    cluster,
    raw_request,
    raw_upstream,
    read_request,
    start_proxy,
    until,
)
from .test_resilience import Reader, Writer, accept_and_hang, answer_ok, sample


def _routes(to: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": "pay", "match": {"prefix": "/pay"}, "category": "payment", "to": to, **extra}]


async def answer_503(up: RawUpstream, reader: Reader, writer: Writer) -> None:
    while True:
        line, _headers, _body = await read_request(reader)
        up.requests.append(line.encode())
        writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
        await writer.drain()


async def test_deadline_cuts_across_two_retries(harness: Harness) -> None:
    """Three tries of 0.4 s fit a 1.2 s route timeout on paper; the backoffs between them do
    not: the deadline ends the third try, 504 route_timeout, counted, audited."""
    hang = await raw_upstream(accept_and_hang)
    retry = {
        "attempts": 3,
        "per_try_timeout": 0.4,
        "retry_on": ["timeout"],
        "backoff": {"base": 0.1, "max": 0.1},
    }
    p = await harness.proxy(
        {
            "clusters": {"pay": cluster("tokopedia", hang.url, retry=retry)},
            "routes": _routes("pay", timeout=1.2),
        }
    )
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{p.data_port}/pay/x") as r,
    ):
        body = await r.json()
        status = r.status
    elapsed = time.monotonic() - started
    assert status == 504
    assert body["reason"] == "route_timeout"
    assert body["request_id"] == r.headers["x-request-id"]
    assert "127.0.0.1" not in body["error"]
    assert len(hang.requests) == 3  # the first try and two retries
    assert 1.2 <= elapsed < 2.0
    assert sample(p, "jalur_upstream_errors_total", cluster="pay", kind="route_timeout") == 1
    assert sample(p, "jalur_retries_total", route="pay") == 2
    trail = harness.tmp / "audit.log"
    await until(lambda: '"status":504' in trail.read_text().replace(" ", ""))


async def test_route_retry_overrides_the_clusters(harness: Harness) -> None:
    """The cluster retries nothing; the route's own retry block sends a 503 again twice.
    Another route on the same cluster keeps the cluster's policy."""
    busy = await raw_upstream(answer_503)
    p = await harness.proxy(
        {
            "clusters": {"pay": cluster("tokopedia", busy.url, retry={"attempts": 1})},
            "routes": [
                *_routes("pay", retry={"attempts": 3, "retry_on": [503]}),
                {"name": "rest", "match": {}, "category": "payment", "to": "pay"},
            ],
        }
    )
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{p.data_port}/pay/x") as r:
            assert r.status == 503
        assert len(busy.requests) == 3
        async with s.get(f"http://127.0.0.1:{p.data_port}/other") as r:
            assert r.status == 503
        assert len(busy.requests) == 4
    assert sample(p, "jalur_retries_total", route="pay") == 2
    assert sample(p, "jalur_retries_total", route="rest") == 0


async def test_an_answer_within_the_deadline_is_relayed(harness: Harness) -> None:
    ok = await raw_upstream(answer_ok)
    p = await harness.proxy(
        {
            "clusters": {"pay": cluster("tokopedia", ok.url, retry={"per_try_timeout": 0.5})},
            "routes": _routes("pay", timeout=1.0),
        }
    )
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{p.data_port}/pay/x") as r,
    ):
        assert r.status == 200
        assert await r.read() == b"ok"


@pytest.mark.parametrize(
    ("route", "cluster_retry", "path"),
    [
        # 3 tries of 0.4 s cannot fit in 1 s
        ({"timeout": 1.0, "retry": {"attempts": 3, "per_try_timeout": 0.4}}, {}, "timeout"),
        # the cluster's retry counts when the route has none
        ({"timeout": 1.0}, {"attempts": 3, "per_try_timeout": 0.4}, "timeout"),
        # no per-try timeout: each try may wait response_headers (15 s)
        ({"timeout": 5.0}, {}, "timeout"),
    ],
)
def test_check_refuses_a_deadline_the_tries_cannot_fit(
    route: dict[str, Any], cluster_retry: dict[str, Any], path: str
) -> None:
    with pytest.raises(cfg.ConfigError) as caught:
        build_config(
            {
                "clusters": {
                    "pay": cluster("tokopedia", "http://127.0.0.1:9", retry=cluster_retry)
                },
                "routes": _routes("pay", **route),
            }
        )
    assert f"$.routes[0].{path}" in str(caught.value)
    assert "tries of" in str(caught.value)


def test_check_accepts_a_deadline_the_tries_fit_in() -> None:
    conf = build_config(
        {
            "clusters": {"pay": cluster("tokopedia", "http://127.0.0.1:9")},
            "routes": _routes("pay", timeout=1.2, retry={"attempts": 3, "per_try_timeout": 0.4}),
        }
    )
    assert conf.routes[0].timeout == 1.2


# -- rate limits ------------------------------------------------------------------------


class FakeClock:
    """The limiter's clock, moved by the test (buckets refill by elapsed time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _limited_proxy(
    harness: Harness, limit: dict[str, Any]
) -> tuple[ProxyServer, Backend, FakeClock]:
    """A proxy whose route ``pay`` has ``limit``, its back end, and the limiter's clock."""
    pay = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(
        {
            "clusters": {"pay": cluster("tokopedia", pay.url)},
            "routes": _routes("pay", rate_limit=limit),
        }
    )
    assert p.forwarder is not None
    limiter = p.forwarder.state.policies["pay"].limiter
    assert limiter is not None
    clock = FakeClock()
    limiter.clock = clock
    return p, pay, clock


def _limited(p: ProxyServer, route: str, reason: str) -> float:
    return sample(p, "jalur_rate_limited_total", route=route, reason=reason)


async def test_a_user_bucket_empties_and_refills(harness: Harness) -> None:
    """Burst 2 at 5/s per user: the third request in a row is 429 (never reaching the
    upstream) with Retry-After and the RateLimit fields; another user still passes; 0.2 s
    later one token is back."""
    p, pay, clock = await _limited_proxy(harness, {"user": {"rate": 5, "burst": 2}})
    url = f"http://127.0.0.1:{p.data_port}/pay/x"
    alice = {"Authorization": "Bearer alice"}
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(url, headers=alice) as r:
                assert r.status == 200
        async with s.get(url, headers=alice) as r:
            assert r.status == 429
            body = await r.json()
            assert body["reason"] == "user_rate_limited"
            assert body["request_id"] == r.headers["x-request-id"]
            assert r.headers["Retry-After"] == "1"
            assert r.headers["RateLimit-Policy"] == '"user";q=2;w=1'
            assert r.headers["RateLimit"] == '"user";r=0;t=1'
        assert len(pay.received) == 2  # shed before any upstream connection
        async with s.get(url, headers={"Authorization": "Bearer bob"}) as r:
            assert r.status == 200
        clock.now += 0.1  # half a token
        async with s.get(url, headers=alice) as r:
            assert r.status == 429
        clock.now += 0.1  # one token
        async with s.get(url, headers=alice) as r:
            assert r.status == 200
        async with s.get(url, headers=alice) as r:
            assert r.status == 429
    assert _limited(p, "pay", "user") == 3
    trail = harness.tmp / "audit.log"
    await until(lambda: '"reason":"rate_limited"' in trail.read_text().replace(" ", ""))


async def test_without_identity_the_client_address_is_the_key(harness: Harness) -> None:
    """No Authorization nor owned cookie: requests share their address's bucket; a
    client-chosen header (x-user-id) does not make a new user."""
    p, _pay, _clock = await _limited_proxy(harness, {"user": {"rate": 0.01, "burst": 1}})
    url = f"http://127.0.0.1:{p.data_port}/pay/x"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"x-user-id": "1"}) as r:
            assert r.status == 200
        async with s.get(url, headers={"x-user-id": "2"}) as r:
            assert r.status == 429
            assert int(r.headers["Retry-After"]) == 100
        # an owned cookie is an identity of its own
        async with s.get(url, headers={"Cookie": "_SID_Tokopedia_=c1"}) as r:
            assert r.status == 200


async def test_the_route_bucket_is_shared_by_all_users(harness: Harness) -> None:
    limit = {"route": {"rate": 0.01, "burst": 2}, "user": {"rate": 1, "burst": 5}}
    p, _pay, _clock = await _limited_proxy(harness, limit)
    url = f"http://127.0.0.1:{p.data_port}/pay/x"
    statuses = []
    async with aiohttp.ClientSession() as s:
        for user in ("a", "b", "c"):
            async with s.get(url, headers={"Authorization": user}) as r:
                statuses.append(r.status)
                policy = r.headers.get("RateLimit-Policy")
    assert statuses == [200, 200, 429]
    assert policy == '"route";q=2;w=200'
    assert _limited(p, "pay", "route") == 1


async def test_a_limited_keyed_post_is_refused_before_its_body_is_read(harness: Harness) -> None:
    """The 429 comes before the idempotency gate reads the body: no 100 Continue, no key
    taken (the same key later is a new request, not a 409 or a replay)."""
    p, pay, clock = await _limited_proxy(harness, {"user": {"rate": 0.01, "burst": 1}})
    head = (
        b"POST /pay/x HTTP/1.1\r\nHost: a\r\nAuthorization: u\r\nIdempotency-Key: k-%d\r\n"
        b"Content-Length: 5\r\n"
    )
    first = await raw_request(p.data_port, head % 1 + b"\r\nhello")
    assert first.status == 200
    # The client waits for 100 Continue before sending its body: the first thing it reads
    # is the 429 (raw_request would read a 100 as the answer).
    second = await raw_request(p.data_port, head % 2 + b"Expect: 100-continue\r\n\r\n")
    assert second.status == 429
    assert len(pay.received) == 1
    clock.now += 100
    third = await raw_request(p.data_port, head % 2 + b"\r\nhello")
    assert third.status == 200
    assert third.header("Idempotent-Replayed") is None


async def _scrape(admin: str, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"{admin}/metrics") as r:
        text = await r.text()
    for family in text_string_to_metric_families(text):
        for m in family.samples:
            if m.name == name and all(m.labels.get(k) == v for k, v in labels.items()):
                return float(m.value)
    return 0.0


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await proc.wait()


@pytest.mark.parametrize("scope", ["fleet", "local"])
async def test_two_replicas_share_a_fleet_wide_limit(
    harness: Harness, redis_server: RedisServer, tmp_path: Path, scope: str
) -> None:
    """Two `jalur run` replicas on one redis-server: a fleet route bucket of 4 lets 4 of 8
    requests through whichever replica takes them (a local one lets each replica pass 4).
    With the store stopped the fleet limiter fails open and counts store_error."""
    pay = await harness.backend("pay", "tokopedia")
    conf = {
        "store": {"kind": "redis", "url": redis_server.url, "timeout": 0.5},
        "clusters": {"pay": cluster("tokopedia", pay.url)},
        "routes": _routes("pay", rate_limit={"route": {"rate": 0.001, "burst": 4}, "scope": scope}),
    }
    replicas = [await start_proxy(tmp_path, conf) for _ in range(2)]
    try:
        statuses: list[int] = []
        async with aiohttp.ClientSession() as s:
            for i in range(8):
                _proc, data, _admin = replicas[i % 2]
                async with s.get(f"{data}/pay/{i}", headers={"Authorization": f"u{i}"}) as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        assert r.headers["RateLimit-Policy"] == '"route";q=4;w=4000'
        limited = [
            await _scrape(a, "jalur_rate_limited_total", route="pay") for _, _, a in replicas
        ]
        if scope == "local":
            assert statuses == [200] * 8
            assert limited == [0, 0]
            return
        assert statuses.count(200) == 4
        assert statuses[:4] == [200] * 4
        assert sum(limited) == 4
        redis_server.stop()
        _proc, data, admin = replicas[0]
        async with aiohttp.ClientSession() as s, s.get(f"{data}/pay/z") as r:
            assert r.status == 200  # fail open
        assert await _scrape(admin, "jalur_rate_limited_total", reason="store_error") == 1
    finally:
        for proc, _data, _admin in replicas:
            await _stop(proc)


def test_the_demo_limits_payments_per_user() -> None:
    conf = cfg.load(Path(__file__).parent.parent / "proxy" / "demo" / "demo.yaml")
    payment = next(r for r in conf.routes if r.name == "payment")
    assert payment.rate_limit is not None
    assert payment.rate_limit.user is not None
    assert all(r.rate_limit is None for r in conf.routes if r.name != "payment")


def test_a_fleet_limit_needs_the_shared_store() -> None:
    with pytest.raises(cfg.ConfigError) as caught:
        build_config(
            {
                "clusters": {"pay": cluster("tokopedia", "http://127.0.0.1:9")},
                "routes": _routes(
                    "pay", rate_limit={"user": {"rate": 1, "burst": 1}, "scope": "fleet"}
                ),
            }
        )
    assert "$.routes[0].rate_limit.scope" in str(caught.value)
    with pytest.raises(cfg.ConfigError) as caught:
        build_config(
            {
                "clusters": {"pay": cluster("tokopedia", "http://127.0.0.1:9")},
                "routes": _routes("pay", rate_limit={"scope": "local"}),
            }
        )
    assert "$.routes[0].rate_limit" in str(caught.value)


async def test_a_keyed_payment_cut_by_the_deadline_is_never_sent_again(harness: Harness) -> None:
    """The deadline counts from the request's arrival: a client that takes 0.3 s to upload
    leaves 0.2 s of a 0.5 s deadline to the upstream (whose per-try timeout is 0.5 s). The
    deadline cuts the keyed POST after its bytes reached the upstream, so the key's outcome
    is unknown and a repeat with the same key is answered, never forwarded a second time."""
    hang = await raw_upstream(accept_and_hang)
    retry = {"attempts": 1, "per_try_timeout": 0.5}
    p = await harness.proxy(
        {
            "clusters": {"pay": cluster("tokopedia", hang.url, retry=retry)},
            "routes": _routes("pay", timeout=0.5),
        }
    )
    head = (
        b"POST /pay/charge HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer a\r\n"
        b"Idempotency-Key: pay-1\r\nContent-Length: 8\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", p.data_port)
    started = time.monotonic()
    writer.write(head)
    await asyncio.sleep(0.3)  # the fault: a slow upload
    writer.write(b"amount=1")
    async with asyncio.timeout(5):
        answer = await reader.readuntil(b"\r\n\r\n")
    elapsed = time.monotonic() - started
    writer.close()
    assert answer.startswith(b"HTTP/1.1 504")
    assert 0.5 <= elapsed < 0.75  # the deadline, not the per-try timeout (0.8 s)
    assert len(hang.requests) == 1
    repeat = await raw_request(p.data_port, head + b"amount=1")
    assert b'"reason":"outcome_unknown"' in repeat.body  # answered, not executed again
    assert repeat.header("Idempotent-Replayed") == "true"
    assert len(hang.requests) == 1


def test_jalur_check_summarises_the_policies(tmp_path: Path) -> None:
    conf = {
        "systems": SYSTEMS,
        "clusters": {"pay": cluster("tokopedia", "http://127.0.0.1:9")},
        "routes": _routes(
            "pay",
            timeout=1.2,
            retry={"attempts": 3, "per_try_timeout": 0.4},
            rate_limit={"user": {"rate": 5, "burst": 10}},
        ),
        "compliance": {"audit": {"path": str(tmp_path / "audit.log")}},
    }
    path = tmp_path / "jalur.yaml"
    path.write_text(yaml.safe_dump(conf))
    out, err = io.StringIO(), io.StringIO()
    assert cli.check(str(path), out, err) == 0
    line = "timeout 1.2s, retry 3 tries of 0.4s, user 5/s burst 10 (local)"
    assert f"  pay{' ' * 24}{line}" in out.getvalue()
    assert "tracing: W3C trace context (no spans exported)" in out.getvalue()
