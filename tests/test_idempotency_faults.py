"""A keyed payment is executed at most once: across outcomes, users, processes and store
failures (issue #16). Each test is one way the gate broke, on real sockets, with a real
redis-server where the store matters (killed with SIGKILL mid-payment)."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import web

from proxy import config as cfg
from proxy.demo.backend import EXECUTIONS, BackendSpec, make_app

from .conftest import SYSTEMS, Backend, Harness, RedisServer, free_port, start_proxy, until


def pay_config(
    url: str, store: dict[str, Any], cluster: dict[str, Any] | None = None, **policy: Any
) -> dict[str, Any]:
    return {
        "access_log": {"enabled": False},
        "store": store,
        "clusters": {"pay": {"system": "tokopedia", "endpoints": [url], **(cluster or {})}},
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


def executions(b: Backend, key: str) -> int:
    return b.app[EXECUTIONS].by_key.get(key, 0)


def outcome_total(p: Any, outcome: str) -> float:
    value = p.services.metrics.registry.get_sample_value(
        "jalur_idempotency_total", {"route": "payment", "outcome": outcome}
    )
    return value or 0.0


# Retries on: Jalur's own retries must not send a keyed payment twice either.
RETRYING: dict[str, Any] = {
    "timeouts": {"response_headers": 0.5},
    "retry": {"attempts": 3, "retry_on": ["reset", "timeout", 502, 503]},
}


@pytest.mark.parametrize(
    ("fault", "first_status"),
    [("delay/1500", 504), ("reset-executed", 502), ("cut-executed", 200)],
)
async def test_a_fault_after_execution_is_outcome_unknown_never_executed_again(
    harness: Harness, store: dict[str, Any], fault: str, first_status: int
) -> None:
    """The back end executed the payment, then Jalur saw no complete answer (a timeout, a
    reset before the head, a reset mid-body): the shopper's retry is answered "outcome
    unknown", and neither Jalur's retries nor the shopper's execute it again."""
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(pay_config(b.url, store, RETRYING))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/_sim/{fault}"
    key = uuid.uuid4().hex
    async with aiohttp.ClientSession() as s:
        try:
            async with s.post(url, data=b'{"amount": 5}', headers={"Idempotency-Key": key}) as r:
                assert r.status == first_status
                await r.read()
        except aiohttp.ClientError:
            assert fault == "cut-executed"  # the head went out; the cut is the only signal
        await until(lambda: executions(b, key) >= 1)
        for _ in range(2):
            async with s.post(url, data=b'{"amount": 5}', headers={"Idempotency-Key": key}) as r:
                body = await r.json()
                assert r.status >= 500
                assert r.headers["Idempotent-Replayed"] == "true"
                assert body["reason"] == "outcome_unknown"
                assert body["request_id"] == r.headers["x-request-id"]
                assert "127.0.0.1" not in str(body)
    if fault.startswith("delay"):
        await until(lambda: len(b.received) >= 1)
    assert executions(b, key) == 1
    assert outcome_total(p, "unknown") == 1


async def test_a_refused_connect_releases_the_key(harness: Harness, tmp_path: Path) -> None:
    """Nothing reached an upstream: the key is free, the shopper's retry is executed."""
    # A bound socket that does not listen yet: connects to it are refused, and no other
    # process can take the port before the back end listens on this very socket.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    p = await harness.proxy(pay_config(f"http://127.0.0.1:{port}", {"kind": "memory"}))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/charge"
    key = {"Idempotency-Key": uuid.uuid4().hex}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=b"x", headers=key) as r:
            assert r.status == 502
        app = make_app(BackendSpec(cluster="pay", system="tokopedia"))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        harness.runners.append(runner)
        await web.SockSite(runner, sock).start()
        async with s.post(url, data=b"x", headers=key) as r:
            assert r.status == 200
            assert "Idempotent-Replayed" not in r.headers
    assert app[EXECUTIONS].by_key[key["Idempotency-Key"]] == 1
    assert outcome_total(p, "released") == 1


async def test_the_lock_lives_as_long_as_the_payment_not_a_fixed_time(
    harness: Harness, store: dict[str, Any]
) -> None:
    """A payment that runs longer than the lock's lease: the lease is renewed while it runs,
    so a repeat long after the lease would have run out is still 409, never executed."""
    b = await harness.backend("pay", "tokopedia")
    conf = pay_config(b.url, {**store, "lease_ttl": 0.5}, {"timeouts": {"response_headers": 10}})
    p = await harness.proxy(conf)
    url = f"http://127.0.0.1:{p.data_port}/api/payment/_sim/delay/2500"
    key = uuid.uuid4().hex
    async with aiohttp.ClientSession() as s:
        first = asyncio.ensure_future(s.post(url, data=b"x", headers={"Idempotency-Key": key}))
        await until(lambda: executions(b, key) == 1)
        await asyncio.sleep(1.5)  # three leases' worth of time passes while it runs
        async with s.post(url, data=b"x", headers={"Idempotency-Key": key}) as r:
            assert r.status == 409
            assert (await r.json())["reason"] == "in_flight"
        async with await first as r:
            assert r.status == 200
        async with s.post(url, data=b"x", headers={"Idempotency-Key": key}) as r:
            assert r.status == 200
            assert r.headers["Idempotent-Replayed"] == "true"
    assert executions(b, key) == 1


async def test_two_users_with_equal_keys_never_see_each_others_answer(
    harness: Harness, store: dict[str, Any]
) -> None:
    """Shoppers logged in with the commerce system's session cookie, on a sticky route whose
    header the client picks: B sending A's key, body and sticky header gets B's own answer,
    never A's (nor A's Set-Cookie)."""
    b = await harness.backend("pay", "tokopedia")
    conf = pay_config(b.url, store)
    conf["routes"][0]["sticky"] = {"header": "x-user-id"}
    p = await harness.proxy(conf)
    url = f"http://127.0.0.1:{p.data_port}/api/payment/_sim/set-cookie/_SID_Tokopedia_/renewed"
    key = "order-1"
    users = [
        {"Cookie": "_SID_Tokopedia_=alice-session"},
        {"Cookie": "_SID_Tokopedia_=bob-session"},
        {"Authorization": "Bearer carol"},
        {"Authorization": "Bearer dave"},
    ]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        for who in users:
            headers = {**who, "Idempotency-Key": key, "x-user-id": "same-for-all"}
            async with s.post(url, data=b'{"amount": 5}', headers=headers) as r:
                assert r.status == 200
                assert "Idempotent-Replayed" not in r.headers
                echoed = dict((await r.json())["headers"])
                for name, value in who.items():
                    assert echoed[name] == value  # its own request reached the back end
        # And each one's repeat is its own answer.
        for who in users:
            headers = {**who, "Idempotency-Key": key, "x-user-id": "same-for-all"}
            async with s.post(url, data=b'{"amount": 5}', headers=headers) as r:
                assert r.headers["Idempotent-Replayed"] == "true"
                echoed = dict((await r.json())["headers"])
                for name, value in who.items():
                    assert echoed[name] == value
    assert executions(b, key) == len(users)


async def test_requests_without_identity_share_a_scope_only_with_each_other(
    harness: Harness,
) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(pay_config(b.url, {"kind": "memory"}))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/charge"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        seen = []
        for extra in ({}, {"x-user-id": "picked"}, {"Cookie": "_SID_Tokopedia_=erin"}):
            async with s.post(url, data=b"x", headers={"Idempotency-Key": "k", **extra}) as r:
                seen.append(r.headers.get("Idempotent-Replayed"))
    # The second carries no identity a system owns: the anonymous scope, replayed. The third
    # is a logged-in shopper: its own scope.
    assert seen == [None, "true", None]
    assert executions(b, "k") == 2


async def test_memory_store_full_refuses_new_keys_and_evicts_nothing(harness: Harness) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(pay_config(b.url, {"kind": "memory", "max_entries": 20}))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/charge"
    async with aiohttp.ClientSession() as s:
        for i in range(20):
            async with s.post(url, data=b"x", headers={"Idempotency-Key": f"k{i}"}) as r:
                assert r.status == 200
        async with s.post(url, data=b"x", headers={"Idempotency-Key": "k20"}) as r:
            assert r.status == 503
            assert (await r.json())["reason"] == "idempotency_store_full"
        for i in range(20):  # every stored outcome is still there
            async with s.post(url, data=b"x", headers={"Idempotency-Key": f"k{i}"}) as r:
                assert r.headers["Idempotent-Replayed"] == "true"
    assert all(executions(b, f"k{i}") == 1 for i in range(20))
    assert executions(b, "k20") == 0
    assert outcome_total(p, "full") == 1


async def test_one_identity_cannot_fill_the_store_for_the_others(harness: Harness) -> None:
    b = await harness.backend("pay", "tokopedia")
    store = {"kind": "memory", "max_entries_per_identity": 5}
    p = await harness.proxy(pay_config(b.url, store))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/charge"
    greedy = {"Authorization": "Bearer greedy"}
    async with aiohttp.ClientSession() as s:
        statuses = []
        for i in range(8):
            async with s.post(url, data=b"x", headers={**greedy, "Idempotency-Key": f"g{i}"}) as r:
                statuses.append(r.status)
        assert statuses == [200] * 5 + [503] * 3
        other = {"Authorization": "Bearer other", "Idempotency-Key": "o1"}
        async with s.post(url, data=b"x", headers=other) as r:
            assert r.status == 200


async def test_an_in_flight_lock_is_never_evicted(harness: Harness) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(pay_config(b.url, {"kind": "memory", "max_entries": 3}))
    base = f"http://127.0.0.1:{p.data_port}/api/payment"
    async with aiohttp.ClientSession() as s:
        slow = asyncio.ensure_future(
            s.post(f"{base}/_sim/delay/1500", data=b"x", headers={"Idempotency-Key": "slow"})
        )
        await until(lambda: executions(b, "slow") == 1)
        codes = []
        for i in range(5):  # more keys than the store holds, while "slow" runs
            async with s.post(f"{base}/x", data=b"x", headers={"Idempotency-Key": f"f{i}"}) as r:
                codes.append(r.status)
        assert codes == [200, 200, 503, 503, 503]
        async with s.post(
            f"{base}/_sim/delay/1500", data=b"x", headers={"Idempotency-Key": "slow"}
        ) as r:
            assert r.status == 409
        async with await slow as r:
            assert r.status == 200
    assert executions(b, "slow") == 1


@pytest.mark.parametrize("require", [False, True])
async def test_redis_killed_mid_payment_the_retry_is_not_executed_again(
    harness: Harness, tmp_path: Path, require: bool
) -> None:
    """Redis (no persistence) is SIGKILLed and restarted while a payment runs: the store has
    lost the lock, yet the shopper's retry is not executed (409 while it runs, then the
    stored answer), and keys first seen just after the loss are answered outcome unknown."""
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        b = await harness.backend("pay", "tokopedia")
        store = {"kind": "redis", "url": server.url, "lease_ttl": 1.0}
        conf = pay_config(b.url, store, {"timeouts": {"response_headers": 10}}, require=require)
        p = await harness.proxy(conf)
        url = f"http://127.0.0.1:{p.data_port}/api/payment/_sim/delay/2500"
        key = uuid.uuid4().hex
        async with aiohttp.ClientSession() as s:
            first = asyncio.ensure_future(s.post(url, data=b"x", headers={"Idempotency-Key": key}))
            await until(lambda: executions(b, key) == 1)
            server.stop(signal.SIGKILL)
            server.start()  # same port, empty: the data is gone
            async with s.post(url, data=b"x", headers={"Idempotency-Key": key}) as r:
                assert r.status in (409, 503)
                assert (await r.json())["reason"] in ("in_flight", "outcome_unknown")
            async with await first as r:
                assert r.status == 200
            async with s.post(url, data=b"x", headers={"Idempotency-Key": key}) as r:
                assert r.headers["Idempotent-Replayed"] == "true"
            # A key first seen in the quarantine after the loss: not forwarded.
            async with s.post(url, data=b"x", headers={"Idempotency-Key": "fresh"}) as r:
                assert r.status == 503
                assert (await r.json())["reason"] == "outcome_unknown"
        assert executions(b, key) == 1
        assert executions(b, "fresh") == 0
    finally:
        server.stop()


async def test_a_proxy_killed_mid_payment_leaves_its_key_outcome_unknown(
    harness: Harness, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The proxy holding the lock dies (SIGKILL) after sending the payment: its lease runs
    out, and a repeat on another replica is answered outcome unknown, never executed."""
    b = await harness.backend("pay", "tokopedia")
    store = {"kind": "redis", "url": redis_server.url, "lease_ttl": 1.0}
    other = await harness.proxy(pay_config(b.url, store, {"timeouts": {"response_headers": 30}}))
    proc, base, _ = await start_proxy(
        tmp_path, pay_config(b.url, store, {"timeouts": {"response_headers": 30}})
    )
    key = uuid.uuid4().hex
    try:
        async with aiohttp.ClientSession() as s:
            doomed = asyncio.ensure_future(
                s.post(
                    f"{base}/api/payment/_sim/delay/5000",
                    data=b"x",
                    headers={"Idempotency-Key": key},
                )
            )
            await until(lambda: executions(b, key) == 1)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            with pytest.raises(aiohttp.ClientError):
                await doomed
            url = f"http://127.0.0.1:{other.data_port}/api/payment/_sim/delay/5000"
            reasons: list[str] = []

            async def repeat() -> None:
                async with s.post(url, data=b"x", headers={"Idempotency-Key": key}) as r:
                    reasons.append((await r.json())["reason"])

            # Polled with a deadline: 409 while the dead proxy's lease lasts, then unknown.
            await repeat()
            for _ in range(50):
                if reasons[-1] == "outcome_unknown":
                    break
                await asyncio.wait_for(asyncio.shield(asyncio.sleep(0.2)), 1)
                await repeat()
            assert set(reasons) <= {"in_flight", "outcome_unknown"}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert executions(b, key) == 1


async def test_workers_with_the_memory_store_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "jalur.yaml"
    conf = pay_config("http://127.0.0.1:9", {"kind": "memory"})
    path.write_text(yaml.safe_dump({**conf, "systems": SYSTEMS}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", str(path), "--workers", "2",
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, cwd=str(tmp_path),
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert b"store.kind: memory" in err
    assert b"store.kind: redis" in err


@pytest.mark.slow
async def test_two_workers_sharing_redis_execute_each_key_once(
    harness: Harness, redis_server: RedisServer, tmp_path: Path
) -> None:
    """--workers 2 with the redis store: 20 keys sent twice each on fresh connections (the
    kernel spreads them over both workers) are each executed once."""
    b = await harness.backend("pay", "tokopedia")
    store = {"kind": "redis", "url": redis_server.url}
    proc, base, _ = await start_proxy(tmp_path, pay_config(b.url, store), "--workers", "2")
    try:
        async with aiohttp.ClientSession() as s:
            replays = 0
            for i in range(20):
                for _ in range(2):
                    headers = {"Idempotency-Key": f"w{i}", "Connection": "close"}
                    async with s.post(f"{base}/api/payment/x", data=b"x", headers=headers) as r:
                        assert r.status == 200
                        replays += r.headers.get("Idempotent-Replayed") == "true"
        assert replays == 20
        assert all(executions(b, f"w{i}") == 1 for i in range(20))
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await proc.wait()


@pytest.mark.parametrize(
    ("key", "why"),
    [("k" * 256, "longer than"), ("a\tb", "visible ASCII"), ("caf\u00e9", "visible ASCII")],
)
async def test_a_bad_key_is_a_counted_400_and_nothing_is_forwarded(
    harness: Harness, key: str, why: str
) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(pay_config(b.url, {"kind": "memory"}))
    port = p.data_port
    raw = (
        b"POST /api/payment/charge HTTP/1.1\r\nHost: shop\r\nContent-Length: 1\r\n"
        b"Idempotency-Key: " + key.encode("latin-1") + b"\r\n\r\nx"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
                 .split(b":")[1])  # fmt: skip
    body = await reader.readexactly(length)
    writer.close()
    assert head.startswith(b"HTTP/1.1 400")
    assert b'"reason":"idempotency_key_invalid"' in body
    assert why.encode() in body
    assert b"request_id" in body
    assert len(b.received) == 0
    assert outcome_total(p, "invalid") == 1


async def test_a_store_answering_garbage_is_503_and_nothing_is_forwarded(
    harness: Harness, redis_server: RedisServer
) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(pay_config(b.url, {"kind": "redis", "url": redis_server.url}))
    url = f"http://127.0.0.1:{p.data_port}/api/payment/charge"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=b"x", headers={"Idempotency-Key": "g"}) as r:
            assert r.status == 200
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            records = [k async for k in client.scan_iter("jalur:idem:r:*")]
            assert len(records) == 1
            await client.set(records[0], b"\xc1garbage")
        finally:
            await client.aclose()
        async with s.post(url, data=b"x", headers={"Idempotency-Key": "g"}) as r:
            assert r.status == 503
            body = await r.json()
    assert body["reason"] == "idempotency_store_unavailable"
    assert executions(b, "g") == 1
    assert outcome_total(p, "store_error") == 1


async def test_readyz_says_what_the_redis_store_promises(harness: Harness, tmp_path: Path) -> None:
    """A redis that may evict Jalur's keys, or forgets them on restart, is reported."""
    server = RedisServer(free_port(), tmp_path, "--maxmemory-policy", "allkeys-lru")
    server.start()
    try:
        b = await harness.backend("pay", "tokopedia")
        p = await harness.proxy(pay_config(b.url, {"kind": "redis", "url": server.url}))
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{p.admin_port}/readyz") as r,
        ):
            store = (await r.json())["store"]
        assert store["maxmemory_policy"] == "allkeys-lru"
        assert store["evicts"] is True
        assert store["persistent"] is False
    finally:
        server.stop()


def test_the_old_idempotency_store_keys_are_refused_naming_the_new_place() -> None:
    text = yaml.safe_dump(
        {"systems": SYSTEMS, "idempotency": {"store": "redis", "redis_url": "redis://x"}}
    )
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse(text)
    assert "$.idempotency" in str(err.value)
    assert "store.kind" in str(err.value)
    assert "store.url" in str(err.value)


async def test_anonymous_clients_are_told_apart_only_by_a_trusted_address(
    harness: Harness,
) -> None:
    """Without identity, the quota is the client's address from a trusted X-Forwarded-For
    hop; with no trusted hop, the peer (an ingress every shopper shares) gets no quota of its
    own: anonymous payments are bounded by the store's global bounds only."""
    b = await harness.backend("pay", "tokopedia")
    store = {"kind": "memory", "max_entries_per_identity": 3}
    trusting = pay_config(b.url, store)
    trusting["boundary"] = {"forwarding": {"xff_num_trusted_hops": 1}}
    p = await harness.proxy(trusting)
    q = await harness.proxy(pay_config(b.url, store))
    async with aiohttp.ClientSession() as s:
        codes = []
        for i in range(5):
            headers = {"Idempotency-Key": f"a{i}", "X-Forwarded-For": "192.0.2.1"}
            async with s.post(f"http://127.0.0.1:{p.data_port}/api/payment/x", headers=headers,
                              data=b"x") as r:  # fmt: skip
                codes.append(r.status)
        assert codes == [200, 200, 200, 503, 503]
        headers = {"Idempotency-Key": "b0", "X-Forwarded-For": "192.0.2.2"}
        async with s.post(f"http://127.0.0.1:{p.data_port}/api/payment/x", headers=headers,
                          data=b"x") as r:  # fmt: skip
            assert r.status == 200
        for i in range(6):  # one peer, no trusted hop: no per-client quota
            headers = {"Idempotency-Key": f"c{i}"}
            async with s.post(f"http://127.0.0.1:{q.data_port}/api/payment/x", headers=headers,
                              data=b"x") as r:  # fmt: skip
                assert r.status == 200
