"""The payment idempotency gate, against the in-memory store and a real redis-server."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .conftest import SYSTEMS, Harness, RedisServer
from .test_operations import start


def payment_config(url: str, store: dict[str, Any], **policy: Any) -> dict[str, Any]:
    return {
        "access_log": {"enabled": False},
        "store": store,
        "clusters": {"pay": {"system": "tokopedia", "endpoints": [url]}},
        "routes": [
            {
                "name": "payment",
                "match": {"prefix": "/api/payment"},
                "category": "payment",
                "to": "pay",
                **({"idempotency": policy} if policy else {}),
            }
        ],
    }


def executed(h: Harness) -> int:
    return sum(1 for r in h.backends["pay"].received if r.method == "POST")


async def test_a_repeat_is_replayed_without_reaching_the_back_end(
    harness: Harness, store: dict[str, Any]
) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(payment_config(b.url, store))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/charge"
    key = {"Idempotency-Key": str(uuid.uuid4())}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=b'{"amount": 5}', headers=key) as r:
            assert r.status == 200
            first = await r.read()
            assert "Idempotent-Replayed" not in r.headers
        async with s.post(url, data=b'{"amount": 5}', headers=key) as r:
            assert r.status == 200
            assert r.headers["Idempotent-Replayed"] == "true"
            assert r.headers["x-backend-system"] == "tokopedia"  # the stored headers
            assert await r.read() == first
    assert executed(harness) == 1
    reg = p.services.metrics.registry
    for outcome in ("stored", "replayed"):
        sample = reg.get_sample_value(
            "jalur_idempotency_total", {"route": "payment", "outcome": outcome}
        )
        assert sample == 1


async def test_fifty_concurrent_duplicates_execute_once(
    harness: Harness, store: dict[str, Any]
) -> None:
    b = await harness.backend("pay", "tokopedia", latency=0.3)
    p = await harness.proxy(payment_config(b.url, store))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/charge"
    key = {"Idempotency-Key": "dup-" + uuid.uuid4().hex}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=60)) as s:

        async def one() -> int:
            async with s.post(url, data=b"charge", headers=key) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(50)))
    assert executed(harness) == 1
    assert statuses.count(200) >= 1
    assert set(statuses) <= {200, 409}
    assert statuses.count(409) >= 1


async def test_same_key_different_request_is_422(harness: Harness, store: dict[str, Any]) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(payment_config(b.url, store))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/charge"
    key = {"Idempotency-Key": uuid.uuid4().hex}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=b'{"amount": 5}', headers=key) as r:
            assert r.status == 200
        async with s.post(url, data=b'{"amount": 500}', headers=key) as r:
            assert r.status == 422
            body = await r.json()
    assert "different request" in body["error"]
    assert body["request_id"]
    assert executed(harness) == 1


async def test_a_5xx_answer_is_stored_and_replayed_never_executed_again(
    harness: Harness, store: dict[str, Any]
) -> None:
    """The back end answered: whatever the status, the payment may have run there."""
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(payment_config(b.url, store))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/_sim/status/503"
    key = {"Idempotency-Key": uuid.uuid4().hex}
    async with aiohttp.ClientSession() as s:
        replayed = []
        for _ in range(2):
            async with s.post(url, data=b"x", headers=key) as r:
                assert r.status == 503
                replayed.append(r.headers.get("Idempotent-Replayed"))
    assert replayed == [None, "true"]
    assert executed(harness) == 1


async def test_missing_key_is_400_where_required(harness: Harness, store: dict[str, Any]) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(payment_config(b.url, store, require=True))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/charge"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=b"x") as r:
            assert r.status == 400
            assert "Idempotency-Key" in (await r.json())["error"]
        async with s.get(url) as r:
            assert r.status == 200  # GET is idempotent: never gated
    assert executed(harness) == 0
    reg = p.services.metrics.registry
    assert (
        reg.get_sample_value("jalur_idempotency_total", {"route": "payment", "outcome": "missing"})
        == 1
    )


async def test_stored_response_expires_after_ttl(harness: Harness, store: dict[str, Any]) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(payment_config(b.url, store, ttl=1))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/charge"
    key = {"Idempotency-Key": uuid.uuid4().hex}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=b"x", headers=key) as r:
            assert r.status == 200
        async with s.post(url, data=b"x", headers=key) as r:
            assert r.headers.get("Idempotent-Replayed") == "true"
        async with asyncio.timeout(10):
            while True:  # poll with a deadline until the entry has expired
                async with s.post(url, data=b"x", headers=key) as r:
                    if "Idempotent-Replayed" not in r.headers:
                        break
                await asyncio.sleep(0.1)
    assert executed(harness) == 2


async def test_redis_down_fails_closed_where_required_and_recovers(
    harness: Harness, redis_server: RedisServer
) -> None:
    b = await harness.backend("pay", "tokopedia")
    # No quarantine after the restart (which lost the data): k3 is served at once.
    store = {"kind": "redis", "url": redis_server.url, "lost_data_quarantine": 0}
    p = await harness.proxy(payment_config(b.url, store, require=True))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/charge"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=b"x", headers={"Idempotency-Key": "k1"}) as r:
            assert r.status == 200
        redis_server.stop()
        async with s.post(url, data=b"x", headers={"Idempotency-Key": "k2"}) as r:
            assert r.status == 503
            assert (await r.json())["reason"] == "idempotency_store_unavailable"
        redis_server.start()  # same port: the restart mid-run
        async with s.post(url, data=b"x", headers={"Idempotency-Key": "k3"}) as r:
            assert r.status == 200
    assert executed(harness) == 2  # k1 and k3; k2 never reached the back end
    reg = p.services.metrics.registry
    assert (
        reg.get_sample_value(
            "jalur_idempotency_total", {"route": "payment", "outcome": "store_error"}
        )
        == 1
    )


async def test_two_proxy_processes_sharing_redis_replay_each_others_payments(
    harness: Harness, redis_server: RedisServer, tmp_path: Path
) -> None:
    b = await harness.backend("pay", "tokopedia")
    store = {"kind": "redis", "url": redis_server.url}
    p = await harness.proxy(payment_config(b.url, store))
    conf = payment_config(b.url, store)
    conf.update(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "systems": SYSTEMS,
            "compliance": {"audit": {"path": str(tmp_path / "audit.log")}},
        }
    )
    path = tmp_path / "jalur.yaml"
    path.write_text(yaml.safe_dump(conf))
    proc, other, _admin = await start(path, tmp_path)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"http://127.0.0.1:{p.data_port}/api/payment/charge", data=b"x", headers=key
            ) as r:
                assert r.status == 200
            async with s.post(f"{other}/api/payment/charge", data=b"x", headers=key) as r:
                assert r.status == 200
                assert r.headers["Idempotent-Replayed"] == "true"
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
    assert executed(harness) == 1


async def test_a_body_over_the_idempotency_limit_is_a_counted_413_that_closes(
    harness: Harness,
) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(payment_config(b.url, {"kind": "memory"}, max_body_bytes=100))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/charge"
    key = {"Idempotency-Key": "big"}
    async with aiohttp.ClientSession() as s, s.post(url, data=b"x" * 101, headers=key) as r:
        assert r.status == 413
        body = await r.json()
        assert body["reason"] == "body_too_large"
        assert body["request_id"] == r.headers["x-request-id"]
        assert r.headers.get("Connection", "").lower() == "close"
    assert executed(harness) == 0
    reg = p.services.metrics.registry
    assert reg.get_sample_value("jalur_requests_rejected_total", {"reason": "body_too_large"}) == 1


async def test_a_replay_carries_no_cookie_the_boundary_stripped(
    harness: Harness, store: dict[str, Any]
) -> None:
    """The commerce back end sets the social system's cookie: the boundary strips it from the
    first answer, and the stored copy replayed later must not bring it back."""
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(payment_config(b.url, store))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/_sim/set-cookie/tt_session/SOCIAL-SECRET"
    key = {"Idempotency-Key": str(uuid.uuid4())}
    seen = []
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        for _ in range(2):
            async with s.post(url, data=b"{}", headers=key) as r:
                assert r.status == 200
                seen.append(
                    (r.headers.get("Idempotent-Replayed"), r.headers.getall("Set-Cookie", []))
                )
    assert seen == [(None, []), ("true", [])]
    assert executed(harness) == 1
