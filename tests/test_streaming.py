"""Bodies stream: 256 MiB up and down through a real `jalur run` process, bounded RSS."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from .conftest import SERVING, SYSTEMS, Harness

SIZE = 256 * 1024 * 1024
CHUNK = 256 * 1024
# What the proxy process may grow by while moving 2 x 256 MiB (the bound).
RSS_BUDGET = 50 * 1024 * 1024


def rss(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


async def start_jalur(config_path: Path, cwd: Path) -> tuple[asyncio.subprocess.Process, int, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "-c",
        str(config_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=str(cwd),
    )
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        while True:
            line = (await proc.stderr.readline()).decode()
            if not line:
                raise AssertionError("jalur exited before serving")
            m = SERVING.search(line)
            if m:
                return proc, int(m.group(1)), int(m.group(2))


async def stop_jalur(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        return await proc.wait()


@pytest.mark.slow
async def test_256_mib_upload_and_download_keep_proxy_rss_bounded(
    harness: Harness, tmp_path: Path
) -> None:
    backend = await harness.backend("bulk", "tokopedia")
    conf = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "drain": {"delay": 0, "timeout": 5},
        "systems": SYSTEMS,
        "clusters": {"bulk": {"system": "tokopedia", "endpoints": [backend.url]}},
        "routes": [{"name": "bulk", "match": {}, "category": "promotion", "to": "bulk"}],
    }
    path = tmp_path / "jalur.yaml"
    path.write_text(yaml.safe_dump(conf))
    proc, port, _admin = await start_jalur(path, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            async with s.get(f"{base}/warm") as r:
                assert r.status == 200
            baseline = rss(proc.pid, "VmRSS")

            block = os.urandom(CHUNK)
            digest = hashlib.sha256()

            async def upload() -> AsyncIterator[bytes]:
                for _ in range(SIZE // CHUNK):
                    digest.update(block)
                    yield block

            async with s.post(f"{base}/upload", data=upload()) as r:
                assert r.status == 200
                echo = await r.json()
            assert echo["body_bytes"] == SIZE
            assert echo["body_sha256"] == digest.hexdigest()

            received = 0
            async with s.get(f"{base}/_sim/bytes/{SIZE}") as r:
                assert r.status == 200
                async for chunk in r.content.iter_any():
                    received += len(chunk)
            assert received == SIZE

            peak = rss(proc.pid, "VmHWM")
    finally:
        code = await stop_jalur(proc)
    assert code == 0
    growth = peak - baseline
    print(f"proxy RSS baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
    assert growth < RSS_BUDGET, f"proxy RSS grew {growth / 2**20:.1f} MiB"
