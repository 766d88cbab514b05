"""Operations: reload under load, ConfigMap-style file swaps, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.server import file_signature, watch_config

from .conftest import (
    SERVING,
    SYSTEMS,
    Harness,
    RawUpstream,
    build_config,
    raw_upstream,
    read_request,
)

# How long the reload-under-load test drives traffic (the issue asks for 15 s).
LOAD_SECONDS = float(os.environ.get("JALUR_RELOAD_LOAD_SECONDS", "15"))


def two_commerce(a: str, b: str, social: str, payment_to: str) -> dict[str, Any]:
    return {
        "access_log": {"enabled": False},
        "clusters": {
            "pay-a": {"system": "tokopedia", "endpoints": [a]},
            "pay-b": {"system": "tokopedia", "endpoints": [b]},
            "feed": {"system": "tiktok", "endpoints": [social]},
        },
        "routes": [
            {"name": "payment", "match": {"prefix": "/api/payment"}, "category": "payment",
             "to": payment_to},
            {"name": "feed", "match": {"prefix": "/api/feed"}, "category": "promotion",
             "to": "feed"},
        ],
    }  # fmt: skip


@pytest.mark.slow
async def test_ten_reloads_under_load_lose_nothing_and_never_send_payment_to_social(
    harness: Harness,
) -> None:
    a = await harness.backend("pay-a", "tokopedia")
    b = await harness.backend("pay-b", "tokopedia")
    social = await harness.backend("feed", "tiktok")
    configs = [
        build_config(two_commerce(a.url, b.url, social.url, to), audit=harness.tmp / "a.log")
        for to in ("pay-a", "pay-b")
    ]
    p = await harness.proxy(two_commerce(a.url, b.url, social.url, "pay-a"))
    base = f"http://127.0.0.1:{p.data_port}"
    deadline = time.monotonic() + LOAD_SECONDS
    results: list[tuple[str, int, str]] = []

    async def client(s: aiohttp.ClientSession, n: int) -> None:
        while time.monotonic() < deadline:
            if n % 2:
                async with s.post(f"{base}/api/payment/charge", data=b'{"amount":1}') as r:
                    await r.read()
                    results.append(("payment", r.status, r.headers.get("x-backend-system", "")))
            else:
                async with s.get(f"{base}/api/feed") as r:
                    await r.read()
                    results.append(("feed", r.status, r.headers.get("x-backend-system", "")))

    async def reloader() -> int:
        done = 0
        for i in range(10):
            await asyncio.sleep(LOAD_SECONDS / 11)  # spread the reloads over the run
            assert await p.reload(configs[(i + 1) % 2])
            done += 1
        return done

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=20)) as s:
        clients = [asyncio.ensure_future(client(s, n)) for n in range(20)]
        reloads = await reloader()
        await asyncio.gather(*clients)
    assert reloads == 10
    assert len(results) > 200
    assert [r for r in results if r[1] != 200] == []
    assert {system for kind, _, system in results if kind == "payment"} == {"tokopedia"}
    assert {len(a.received) > 0, len(b.received) > 0} == {True}  # both configs served


async def test_watch_sees_a_configmap_style_symlink_swap(tmp_path: Path) -> None:
    """Kubernetes updates a mounted ConfigMap by swapping the `..data` symlink."""
    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "jalur.yaml").write_text("a: 1\n")
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "jalur.yaml").symlink_to("..data/jalur.yaml")
    changed = asyncio.Event()
    path = str(tmp_path / "jalur.yaml")
    loaded = file_signature(path)
    watcher = asyncio.create_task(watch_config(path, 0.05, changed.set, loaded))
    try:
        (tmp_path / "..v2").mkdir()
        (tmp_path / "..v2" / "jalur.yaml").write_text("a: 1\n")  # same content, new inode
        (tmp_path / "..data_tmp").symlink_to("..v2")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")  # the atomic swap
        async with asyncio.timeout(5):
            await changed.wait()
    finally:
        watcher.cancel()


async def start(path: Path, cwd: Path) -> tuple[asyncio.subprocess.Process, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", str(path),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=str(cwd),
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        while not (m := SERVING.search(line := (await proc.stderr.readline()).decode())):
            if not line:
                raise AssertionError("jalur exited before serving")
    return proc, f"http://127.0.0.1:{m.group(1)}", f"http://127.0.0.1:{m.group(2)}"


def write_config(path: Path, backend_url: str, **extra: Any) -> None:
    conf: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "access_log": {"enabled": False},
        "systems": SYSTEMS,
        "clusters": {"pay": {"system": "tokopedia", "endpoints": [backend_url]}},
        "routes": [{"name": "pay", "match": {"prefix": "/"}, "category": "payment", "to": "pay"}],
        "compliance": {"audit": {"path": "-"}},
    }
    conf.update(extra)
    path.write_text(yaml.safe_dump(conf))


async def test_running_proxy_reloads_when_the_mounted_file_changes(
    harness: Harness, tmp_path: Path
) -> None:
    one = await harness.backend("one", "tokopedia")
    two = await harness.backend("two", "tokopedia")
    (tmp_path / "..v1").mkdir()
    write_config(tmp_path / "..v1" / "jalur.yaml", one.url, reload={"interval": 0.1})
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "jalur.yaml").symlink_to("..data/jalur.yaml")
    proc, base, _admin = await start(tmp_path / "jalur.yaml", tmp_path)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/x") as r:
                assert r.headers["x-backend-cluster"] == "one"
            (tmp_path / "..v2").mkdir()
            write_config(tmp_path / "..v2" / "jalur.yaml", two.url, reload={"interval": 0.1})
            (tmp_path / "..data_tmp").symlink_to("..v2")
            os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
            async with asyncio.timeout(10):
                while True:  # poll with a deadline until the new config serves
                    async with s.get(f"{base}/x") as r:
                        if r.headers["x-backend-cluster"] == "two":
                            break
                    await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0


async def test_sigterm_drains_thirty_in_flight_requests_and_exits_zero(
    harness: Harness, tmp_path: Path
) -> None:
    """30 requests are held at the upstream; SIGTERM; /readyz turns 503 at once; the 30
    are then answered and all reach the client; the process exits 0."""
    arrived, release = asyncio.Event(), asyncio.Event()
    count = 0

    async def held(up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal count
        while True:
            await read_request(reader)
            count += 1
            if count == 30:
                arrived.set()
            await release.wait()
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()

    up = await raw_upstream(held)
    path = tmp_path / "jalur.yaml"
    write_config(path, up.url, drain={"delay": 0.5, "timeout": 10})
    proc, base, admin = await start(path, tmp_path)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as s:

        async def one() -> int:
            async with s.get(f"{base}/slow") as r:
                assert await r.read() == b"ok"
                return r.status

        tasks = [asyncio.ensure_future(one()) for _ in range(30)]
        async with asyncio.timeout(10):
            await arrived.wait()  # all 30 are in flight at the upstream
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            while True:  # poll with a deadline: readiness fails at once
                async with s.get(f"{admin}/readyz") as r:
                    if r.status == 503:
                        break
        release.set()
        statuses = await asyncio.gather(*tasks)
    async with asyncio.timeout(20):
        code = await proc.wait()
    up.server.close()
    assert statuses == [200] * 30
    assert code == 0
