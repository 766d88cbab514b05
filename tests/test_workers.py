"""`jalur run --workers 2`: one port, two processes, metrics summed, restart, reload, drain."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from .conftest import SERVING, SYSTEMS, Harness, RedisServer, children

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


@pytest.mark.slow
async def test_two_workers_share_the_port_and_metrics_add_up(
    harness: Harness, tmp_path: Path, redis_server: RedisServer
) -> None:
    b = await harness.backend("pay", "tokopedia")
    conf = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "drain": {"delay": 0.2, "timeout": 5},
        "access_log": {"enabled": False},
        "systems": SYSTEMS,
        "clusters": {"pay": {"system": "tokopedia", "endpoints": [b.url]}},
        "routes": [{"name": "pay", "match": {"prefix": "/"}, "category": "payment", "to": "pay"}],
        "compliance": {"audit": {"path": str(tmp_path / "audit.log")}},
        "store": {"kind": "redis", "url": redis_server.url},  # payments: one store for both
    }
    path = tmp_path / "jalur.yaml"
    path.write_text(yaml.safe_dump(conf))
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", str(path), "--workers", "2",
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        env={**env, "PYTHONUNBUFFERED": "1"}, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            while not (m := SERVING.search(line := (await proc.stderr.readline()).decode())):
                if not line:
                    raise AssertionError("jalur exited before serving")
        base, admin = f"http://127.0.0.1:{m.group(1)}", f"http://127.0.0.1:{m.group(2)}"
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
