"""The admin listener and `jalur demo` as a user runs it."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from proxy import audit
from proxy.demo.run import DEMO_AUDIT_KEY

from .conftest import Harness, jalur_demo

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
    async with jalur_demo(tmp_path) as (base, _), aiohttp.ClientSession() as s:
        async with s.get(f"{base}/api/feed") as r:
            assert r.status == 200
            assert r.headers["x-backend-system"] == "tiktok"
        async with s.post(f"{base}/api/payment/charge", data=b"{}") as r:
            assert r.status == 200
            assert r.headers["x-backend-system"] == "tokopedia"
    # The demo leaves a sealed trail that verifies under the demo key.
    verdict = audit.verify([tmp_path / "jalur-audit.log"], DEMO_AUDIT_KEY.encode(), keep=True)
    assert verdict.intact, verdict.breaks
    assert [e["route"] for e in audit.iter_requests(verdict.entries)] == ["payment"]
