"""`jalur run --workers 2`: one port, two processes, metrics summed, restart, reload, drain."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import audit

from .conftest import SYSTEMS, Harness, RedisServer, children, start_proxy

TOTAL = re.compile(r'^jalur_requests_total\{[^}]*route="pay"[^}]*\} ([0-9.e+]+)$', re.M)


async def requests_total(s: aiohttp.ClientSession, admin: str, expect: float) -> float:
    """The summed counter once it reaches ``expect`` (a worker counts a request just after
    its answer is written, so a scrape may briefly lag), or what it is after 5 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        async with s.get(f"{admin}/metrics") as r:
            total = sum(float(x) for x in TOTAL.findall(await r.text()))
        if total >= expect or loop.time() > deadline:
            return total
        await asyncio.sleep(0.05)


async def send(s: aiohttp.ClientSession, base: str, n: int) -> set[str]:
    """n requests, each on a new connection so the kernel spreads them over the workers."""
    codes = set()
    for _ in range(n):
        async with s.get(f"{base}/x", headers={"Connection": "close"}) as r:
            codes.add(str(r.status))
            await r.read()
    return codes


def pay_config(url: str, drain: float, redis: RedisServer, **audit: Any) -> dict[str, Any]:
    """One payment route to ``url``; ``audit``: the compliance.audit settings; the workers
    share ``redis`` as their store (payments are deduplicated across them)."""
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "drain": {"delay": drain, "timeout": 5},
        "access_log": {"enabled": False},
        "systems": SYSTEMS,
        "clusters": {"pay": {"system": "tokopedia", "endpoints": [url]}},
        "routes": [{"name": "pay", "match": {"prefix": "/"}, "category": "payment", "to": "pay"}],
        "compliance": {"audit": audit},
        "store": {"kind": "redis", "url": redis.url},
    }


async def run_workers(
    tmp_path: Path, conf: dict[str, Any], **env_extra: str
) -> tuple[asyncio.subprocess.Process, str, str]:
    """``jalur run --workers 2`` on ``conf``, once it serves: (process, data URL, admin URL)."""
    return await start_proxy(
        tmp_path, conf, "--workers", "2", path=tmp_path / "jalur.yaml", env=env_extra
    )


@pytest.mark.slow
async def test_two_workers_share_the_port_and_metrics_add_up(
    harness: Harness, tmp_path: Path, redis_server: RedisServer
) -> None:
    b = await harness.backend("pay", "tokopedia")
    path = tmp_path / "jalur.yaml"
    proc, base, admin = await run_workers(
        tmp_path, pay_config(b.url, 0.2, redis_server, path=str(tmp_path / "audit.log"))
    )
    try:
        workers = children(proc.pid)
        assert len(workers) == 2
        async with aiohttp.ClientSession() as s:
            assert await send(s, base, 60) == {"200"}
            assert await requests_total(s, admin, 60) == 60

            # A worker that dies is replaced, and its counts are not lost.
            os.kill(workers[0], signal.SIGKILL)
            async with asyncio.timeout(20):
                while True:
                    now = children(proc.pid)
                    if len(now) == 2 and workers[0] not in now:
                        break
                    await asyncio.sleep(0.05)
            assert await send(s, base, 40) == {"200"}
            assert await requests_total(s, admin, 100) == 100

            # An invalid config on SIGHUP is refused; both workers keep serving.
            path.write_text("routes: [{name: broken}]\n")
            proc.send_signal(signal.SIGHUP)
            async with asyncio.timeout(20):
                while True:
                    async with s.get(f"{admin}/metrics") as r:
                        if 'jalur_config_reloads_total{result="failure"} 1.0' in await r.text():
                            break
                    await asyncio.sleep(0.05)
            assert await send(s, base, 10) == {"200"}
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            code = await proc.wait()
    assert code == 0
    assert len(b.received) == 110


async def test_each_worker_keeps_its_own_chain_and_the_trail_verifies(
    harness: Harness, tmp_path: Path, redis_server: RedisServer
) -> None:
    b = await harness.backend("pay", "tokopedia")
    key = "workers-audit-key-0123456789"
    # Small files: each worker rotates its own several times.
    conf = pay_config(
        b.url, 0, redis_server, path=str(tmp_path / "audit.log"), max_bytes=32768, backups=50
    )
    proc, base, _ = await run_workers(tmp_path, conf, JALUR_AUDIT__KEY=key)
    try:
        async with aiohttp.ClientSession() as s:
            # Enough at once that each writer's buffer fills and is written in pieces.
            for _ in range(20):
                codes = await asyncio.gather(*(send(s, base, 1) for _ in range(20)))
                assert set.union(*codes) == {"200"}
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            code = await proc.wait()
    assert code == 0
    files = [tmp_path / n for n in os.listdir(tmp_path) if n.startswith("audit.log")]
    assert len(files) > 4  # rotated
    verdict = audit.verify(files, key.encode(), keep=True)
    assert verdict.breaks == []
    # One chain per worker, and the supervisor's own (the fleet's weight changes it makes).
    assert verdict.chains == 3
    assert {f.name.split(".")[2] for f in files if f.name != "audit.log"} == {"w0", "w1"}
    served = [e for e in audit.iter_requests(verdict.entries) if e["route"] == "pay"]
    assert len(served) == len(b.received) == 400
