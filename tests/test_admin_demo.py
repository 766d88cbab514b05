"""The admin listener and `jalur demo` as a user runs it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import yaml

from .conftest import Harness, free_port

DEMO = Path(__file__).parent.parent / "config" / "demo.yaml"


async def test_admin_health_readiness_and_masked_config(harness: Harness) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(
        {
            "admin": {"host": "127.0.0.1", "port": 0, "token": "s3cret"},
            "clusters": {"pay": {"system": "tokopedia", "endpoints": [b.url]}},
            "routes": [{"name": "all", "match": {}, "category": "payment", "to": "pay"}],
        }
    )
    admin = f"http://127.0.0.1:{p.admin_port}"
    async with aiohttp.ClientSession() as s:
        for path in ("/healthz", "/livez"):
            async with s.get(admin + path) as r:
                assert r.status == 200
        async with s.get(admin + "/readyz") as r:
            assert r.status == 200
        async with s.get(admin + "/config", headers={"Authorization": "Bearer s3cret"}) as r:
            conf = await r.json()
        assert conf["admin"]["token"] == "***"
        assert conf["routes"][0]["name"] == "all"
        # The admin listener never proxies: an API path there is not forwarded.
        async with s.get(admin + "/api/payment") as r:
            assert r.status == 404
        assert not b.received
        p.status.draining = True
        async with s.get(admin + "/readyz") as r:
            assert r.status == 503
            assert (await r.json())["reason"] == "draining"


async def test_jalur_demo_serves_social_and_commerce_and_stops_on_sigint(tmp_path: Path) -> None:
    conf = yaml.safe_load(DEMO.read_text())
    conf["listen"]["port"] = 0
    conf["admin"]["port"] = 0
    ports: dict[str, int] = {}
    for cluster in conf["clusters"].values():
        new = []
        for url in cluster["endpoints"]:
            ports.setdefault(url, free_port())
            new.append(f"http://127.0.0.1:{ports[url]}")
        cluster["endpoints"] = new
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(conf))
    cwd = tmp_path
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "demo",
        "-c",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=str(cwd),
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            first = (await proc.stdout.readline()).decode()
        m = re.search(r"proxy on (http://\S+), admin on (http://\S+)", first)
        assert m, first
        base = m.group(1)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/api/feed") as r:
                assert r.status == 200
                assert r.headers["x-backend-system"] == "tiktok"
            async with s.post(f"{base}/api/payment/charge", data=b"{}") as r:
                assert r.status == 200
                assert r.headers["x-backend-system"] == "tokopedia"
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            code = await proc.wait()
    assert code == 0
