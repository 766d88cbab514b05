"""Reload: atomic swap, in-flight requests finish on their config, invalid configs refused."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from .conftest import Harness, RawUpstream, build_config, raw_upstream, read_request


def routes_to(cluster: str) -> list[dict[str, Any]]:
    return [{"name": "pay", "match": {"prefix": "/"}, "category": "payment", "to": cluster}]


async def test_reload_swaps_routes_and_in_flight_request_finishes_on_old_config(
    harness: Harness,
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held(up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        arrived.set()
        await release.wait()  # the response is held until the test has reloaded
        w.write(b"HTTP/1.1 200 OK\r\nx-backend-cluster: old\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()

    old = await raw_upstream(held)
    new = await harness.backend("new", "tokopedia")
    clusters = {
        "old": {"system": "tokopedia", "endpoints": [old.url]},
        "new": {"system": "tokopedia", "endpoints": [new.url]},
    }
    p = await harness.proxy({"clusters": clusters, "routes": routes_to("old")})
    base = f"http://127.0.0.1:{p.data_port}"
    async with aiohttp.ClientSession() as s:
        slow = asyncio.ensure_future(s.get(f"{base}/slow"))
        async with asyncio.timeout(5):
            await arrived.wait()
        old_state = p.state
        assert old_state.active == 1
        ok = await p.reload(build_config({"clusters": clusters, "routes": routes_to("new")}))
        assert ok
        async with s.get(f"{base}/x") as r:
            assert r.headers["x-backend-cluster"] == "new"
        release.set()
        r = await slow
        assert r.status == 200
        assert r.headers["x-backend-cluster"] == "old"
        assert await r.read() == b"ok"
    old.server.close()
    assert old_state.active == 0
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{p.admin_port}/metrics") as r:
        text = await r.text()
    assert 'jalur_config_reloads_total{result="success"} 2.0' in text


async def test_reload_sending_payment_to_social_after_deadline_is_refused_and_serving_continues(
    harness: Harness, tmp_path: Any
) -> None:
    social = await harness.backend("shop-legacy", "tiktok")
    commerce = await harness.backend("pay", "tokopedia")
    clusters = {
        "shop-legacy": {"system": "tiktok", "endpoints": [social.url]},
        "pay": {"system": "tokopedia", "endpoints": [commerce.url]},
    }
    p = await harness.proxy({"clusters": clusters, "routes": routes_to("pay")})
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    bad = tmp_path / "bad.yaml"
    import yaml

    from .conftest import SYSTEMS

    bad.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": 0},
                "admin": {"host": "127.0.0.1", "port": 0},
                "systems": SYSTEMS,
                "clusters": clusters,
                "routes": routes_to("shop-legacy"),
                "compliance": {"transition_until": past, "legacy_clusters": ["shop-legacy"]},
            }
        )
    )
    p.config_path = str(bad)
    assert await p.reload() is False
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{p.data_port}/api/payment", data=b"{}") as r:
            assert r.status == 200
            assert r.headers["x-backend-system"] == "tokopedia"
        async with s.get(f"http://127.0.0.1:{p.admin_port}/metrics") as r:
            text = await r.text()
    assert not social.received
    assert 'jalur_config_reloads_total{result="failure"} 1.0' in text


async def test_a_truncated_or_duplicated_file_is_refused_and_readyz_names_the_generation(
    harness: Harness, tmp_path: Any
) -> None:
    """A non-atomic write under ``reload.watch`` leaves an empty file for a moment: the
    reload is refused (counted as a failure), the old routes keep serving, and /readyz says
    which generation serves and why the last reload did not take."""
    import yaml

    commerce = await harness.backend("pay", "tokopedia")
    clusters = {"pay": {"system": "tokopedia", "endpoints": [commerce.url]}}
    p = await harness.proxy({"clusters": clusters, "routes": routes_to("pay")})
    f = tmp_path / "jalur.yaml"
    p.config_path = str(f)
    admin = f"http://127.0.0.1:{p.admin_port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{admin}/readyz") as r:
            assert r.status == 200
            assert (await r.json())["config_generation"] == 1
        good = yaml.safe_dump(
            {
                "admin": {"host": "127.0.0.1", "port": 0},
                "systems": {"tokopedia": {"kind": "commerce"}},
                "clusters": clusters,
                "routes": routes_to("pay"),
            }
        )
        f.write_text(good)
        assert await p.reload() is True
        for text in ("", good + "clusters: {}\n"):
            f.write_text(text)
            assert await p.reload() is False
            async with s.get(f"{admin}/readyz") as r:
                assert r.status == 200
                body = await r.json()
            assert body["config_generation"] == 2
            assert body["last_reload"]["result"] == "refused"
            assert ("empty" if not text else "duplicate key") in body["last_reload"]["error"]
            async with s.post(f"http://127.0.0.1:{p.data_port}/api/payment", data=b"{}") as r:
                assert r.status == 200
        async with s.get(f"{admin}/metrics") as r:
            text = await r.text()
    assert 'jalur_config_reloads_total{result="failure"} 2.0' in text
