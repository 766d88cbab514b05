"""One migration for the whole fleet (issue #17): live weights shared through a real
redis-server by several proxy processes and workers; no shopper ever moved back except by an
explicit, audited rollback; a pod's progress figure that adds up over its workers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.router import Target
from proxy.split import Splitter

from .conftest import Harness, RedisServer, free_port, start_proxy
from .test_migration import TOKEN, split_config

USERS = [f"shopper-{i}" for i in range(1000)]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def assignment(
    s: aiohttp.ClientSession, base: str, users: list[str], tally: Counter[str] | None = None
) -> dict[str, str]:
    """Which cluster serves each user's checkout; every answer is added to ``tally``."""
    out: dict[str, str] = {}
    limit = asyncio.Semaphore(50)

    async def one(user: str) -> None:
        async with (
            limit,
            s.post(f"{base}/api/checkout", headers={"x-user-id": user}) as r,
        ):
            assert r.status == 200
            out[user] = r.headers["x-backend-cluster"]
            if tally is not None:
                tally[out[user]] += 1

    await asyncio.gather(*(one(u) for u in users))
    return out


async def live_version(s: aiohttp.ClientSession, admin: str) -> int:
    async with s.get(f"{admin}/migration") as r:
        view = await r.json()
    live = view["routes"]["checkout"]["live"]
    return int(live["version"]) if live else 0


async def ramp(
    s: aiohttp.ClientSession, admin: str, legacy: int, new: int, **extra: Any
) -> tuple[int, dict[str, Any]]:
    body = {"weights": {"shop-legacy": legacy, "tokopedia-pay": new}, **extra}
    async with s.post(f"{admin}/migration/checkout", json=body, headers=AUTH) as r:
        return r.status, await r.json()


def expected(legacy: int, new: int) -> dict[str, str]:
    splitter = Splitter("checkout", (Target("shop-legacy", legacy), Target("tokopedia-pay", new)))
    return {u: splitter.choose(u) for u in USERS}


async def fleet_conf(h: Harness, redis: RedisServer, legacy: int, new: int) -> dict[str, Any]:
    old = await h.backend("shop-legacy", "tiktok")
    cur = await h.backend("tokopedia-pay", "tokopedia")
    conf = split_config(old.url, cur.url, legacy, new)
    conf["admin"] = {"host": "127.0.0.1", "port": 0, "token": TOKEN}
    conf["store"] = {"kind": "redis", "url": redis.url}
    return conf


async def stop(*procs: asyncio.subprocess.Process) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        async with asyncio.timeout(20):
            await proc.wait()


async def test_a_post_to_one_replica_moves_both_within_two_seconds(
    harness: Harness, redis_server: RedisServer, tmp_path: Path
) -> None:
    conf = await fleet_conf(harness, redis_server, 50, 50)
    (a, base_a, admin_a), (b, base_b, admin_b) = await asyncio.gather(
        start_proxy(tmp_path, conf), start_proxy(tmp_path, conf)
    )
    try:
        async with aiohttp.ClientSession() as s:
            status, _ = await ramp(s, admin_a, 10, 90, why="step 2", actor="ops")
            assert status == 200
            loop = asyncio.get_running_loop()
            posted = loop.time()
            target = await live_version(s, admin_a)
            while await live_version(s, admin_b) < target:
                assert loop.time() - posted < 2.0, "replica B did not apply the weights in 2 s"
                await asyncio.sleep(0.05)
            assert loop.time() - posted < 2.0
            seen_a, seen_b = await asyncio.gather(
                assignment(s, base_a, USERS), assignment(s, base_b, USERS)
            )
        assert seen_a == seen_b == expected(10, 90)
    finally:
        await stop(a, b)


async def test_no_shopper_moves_back_on_sighup_restart_or_a_lowered_file(
    harness: Harness, redis_server: RedisServer, tmp_path: Path
) -> None:
    conf = await fleet_conf(harness, redis_server, 50, 50)
    path = tmp_path / "jalur.yaml"
    proc, base, admin = await start_proxy(tmp_path, conf, path=path)
    try:
        async with aiohttp.ClientSession() as s:
            assert (await ramp(s, admin, 10, 90))[0] == 200
            before = await assignment(s, base, USERS)
            assert before == expected(10, 90)
            proc.send_signal(signal.SIGHUP)  # the unchanged file: 50/50
            await reloaded(s, admin, 2)
            assert await assignment(s, base, USERS) == before
            # An edit that lowers the file's weights, then SIGHUP: the live ones stay.
            text = path.read_text().replace("weight: 50", "weight: 70", 1)
            path.write_text(text)
            proc.send_signal(signal.SIGHUP)
            async with asyncio.timeout(10):
                while True:
                    async with s.get(f"{admin}/migration") as r:
                        view = (await r.json())["routes"]["checkout"]
                    if view["configured"]["shop-legacy"] == 70:
                        break
                    await asyncio.sleep(0.05)
            assert view["held_back"] is True
            assert view["weights"] == {"shop-legacy": 10, "tokopedia-pay": 90}
            async with s.get(f"{admin}/metrics") as r:
                assert 'jalur_migration_weights_held{route="checkout"} 1.0' in await r.text()
            assert await assignment(s, base, USERS) == before
        await stop(proc)
        proc, base, admin = await start_proxy(tmp_path, conf, path=path)  # a restart
        async with aiohttp.ClientSession() as s:
            assert await assignment(s, base, USERS) == before
    finally:
        await stop(proc)


async def test_an_explicit_rollback_moves_exactly_its_band_and_is_audited(
    harness: Harness, redis_server: RedisServer, tmp_path: Path
) -> None:
    conf = await fleet_conf(harness, redis_server, 10, 90)
    audit = tmp_path / "audit.log"
    conf["compliance"] = {**conf["compliance"], "audit": {"path": str(audit)}}
    proc, base, admin = await start_proxy(tmp_path, conf)
    try:
        async with aiohttp.ClientSession() as s:
            before = await assignment(s, base, USERS)
            status, body = await ramp(s, admin, 20, 80)
            assert status == 409
            assert "rollback" in body["error"]
            assert await assignment(s, base, USERS) == before
            status, body = await ramp(
                s, admin, 20, 80, rollback=True, why="payment errors", actor="oncall"
            )
            assert status == 200
            after = await assignment(s, base, USERS)
    finally:
        await stop(proc)
    splitter = Splitter("checkout", (Target("a", 1), Target("b", 1)))
    band = {u for u in USERS if 1000 <= splitter.bucket(u) < 2000}
    moved = {u for u in USERS if before[u] != after[u]}
    assert moved == band
    assert all(after[u] == "shop-legacy" for u in moved)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    rollbacks = [r for r in records if r.get("decision") == "migration-rollback"]
    assert len(rollbacks) == 1
    assert rollbacks[0]["weights"] == {"shop-legacy": 20, "tokopedia-pay": 80}
    assert rollbacks[0]["why"] == "payment errors"
    assert "oncall" in rollbacks[0]["actor"]


async def reloaded(s: aiohttp.ClientSession, admin: str, count: int) -> float:
    """Poll (with a deadline) until the pod counted ``count`` successful loads."""
    async with asyncio.timeout(10):
        while True:
            async with s.get(f"{admin}/metrics") as r:
                found = RELOADS.findall(await r.text())
            if found and float(found[0]) >= count:
                await asyncio.sleep(0.3)  # a double count would show up in this time
                async with s.get(f"{admin}/metrics") as r:
                    return float(RELOADS.findall(await r.text())[0])
            await asyncio.sleep(0.05)


PROGRESS = re.compile(r'^jalur_migration_progress_ratio\{category="payment"\} ([0-9.e+-]+)$', re.M)
RELOADS = re.compile(r'^jalur_config_reloads_total\{result="success"\} ([0-9.e+]+)$', re.M)


@pytest.mark.slow
async def test_two_workers_answer_migration_share_weights_and_report_the_pod_share(
    harness: Harness, redis_server: RedisServer, tmp_path: Path
) -> None:
    conf = await fleet_conf(harness, redis_server, 50, 50)
    proc, base, admin = await start_proxy(tmp_path, conf, "--workers", "2")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{admin}/migration") as r:
                assert r.status == 200
            assert (await ramp(s, admin, 13, 87))[0] == 200
            tally: Counter[str] = Counter()  # every answer the pod gave, by cluster
            want = expected(13, 87)
            async with asyncio.timeout(5):  # both workers poll the store within a second
                while True:
                    seen = await assignment(s, base, USERS[:200], tally)
                    if all(want[u] == c for u, c in seen.items()):
                        break
                    await asyncio.sleep(0.1)
            assert await assignment(s, base, USERS, tally) == want
            true_share = tally["tokopedia-pay"] / sum(tally.values())
            ratios = []
            for _ in range(5):
                async with s.get(f"{admin}/metrics") as r:
                    ratios.append(float(PROGRESS.findall(await r.text())[0]))
            assert all(abs(r - true_share) <= 0.02 for r in ratios), (ratios, true_share)
            proc.send_signal(signal.SIGHUP)
            assert await reloaded(s, admin, 2) == 2  # first load + one reload, once per pod
    finally:
        await stop(proc)


async def jalur_cli(*args: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "JALUR_ADMIN__TOKEN"}
    if token is not None:
        env["JALUR_ADMIN__TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_migration_command_ramps_refuses_a_step_back_and_rolls_back(
    harness: Harness, redis_server: RedisServer, tmp_path: Path
) -> None:
    conf = await fleet_conf(harness, redis_server, 50, 50)
    proc, _base, admin = await start_proxy(tmp_path, conf)
    try:
        ctl = ("migration", "--admin", admin)
        code, out, err = await jalur_cli(*ctl, "ramp", "checkout", "shop-legacy=10",
                                         "tokopedia-pay=90", "--why", "step 2")  # fmt: skip
        assert code == 0, err
        assert "commerce 90.0%" in out
        code, out, err = await jalur_cli(*ctl, "ramp", "checkout", "shop-legacy=20",
                                         "tokopedia-pay=80")  # fmt: skip
        assert code == 1
        assert "409" in err
        assert "rollback" in err
        code, out, err = await jalur_cli(*ctl, "rollback", "checkout", "shop-legacy=20",
                                         "tokopedia-pay=80", "--why", "errors")  # fmt: skip
        assert code == 0, err
        assert "ROLLBACK" in out
        code, out, err = await jalur_cli(*ctl, "ramp", "checkout", "shop-legacy=0",
                                         "tokopedia-pay=100", token=None)  # fmt: skip
        assert code == 1
        assert "401" in err or "403" in err
        code, out, _ = await jalur_cli(*ctl, "status")
        assert code == 0
        assert "version 3" in out
        assert "commerce 80.0%" in out
    finally:
        await stop(proc)


async def test_a_store_that_loses_its_data_moves_no_shopper_back(
    harness: Harness, tmp_path: Path
) -> None:
    """Redis (no persistence) SIGKILLed and restarted empty after a ramp: the live weights
    are gone from the store, the file still says 50/50, yet no shopper moves back: every
    process keeps the weights it applied and the writer puts them back in the store."""
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        conf = await fleet_conf(harness, server, 50, 50)
        (a, base_a, admin_a), (b, base_b, _) = await asyncio.gather(
            start_proxy(tmp_path, conf), start_proxy(tmp_path, conf)
        )
        try:
            async with aiohttp.ClientSession() as s:
                assert (await ramp(s, admin_a, 10, 90))[0] == 200
                want = expected(10, 90)
                async with asyncio.timeout(5):  # B applies the ramp (it polls every second)
                    while True:
                        seen = await assignment(s, base_b, USERS[:100])
                        if all(want[u] == c for u, c in seen.items()):
                            break
                        await asyncio.sleep(0.1)
                server.stop(signal.SIGKILL)
                server.start()  # same port, empty: the live weights are gone from the store
                client = aioredis.Redis.from_url(server.url)
                try:
                    async with asyncio.timeout(10):  # the writers put them back
                        while True:
                            raw = await client.hget("jalur:migration", "checkout")
                            if raw is not None:
                                break
                            await asyncio.sleep(0.1)
                finally:
                    await client.aclose()
                assert json.loads(raw)["weights"] == {"shop-legacy": 10, "tokopedia-pay": 90}
                for base in (base_a, base_b):
                    assert await assignment(s, base, USERS) == want
        finally:
            await stop(a, b)
    finally:
        server.stop()
