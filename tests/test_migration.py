"""Migration control: sticky splits, monotonic ramps, live weights, shadow, measured progress."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.router import Target
from proxy.split import Splitter

from .conftest import SERVING, SYSTEMS, Harness

TOKEN = "test-admin-token"


def split_config(legacy_url: str, new_url: str, legacy: int, new: int) -> dict[str, Any]:
    return {
        "admin": {"host": "127.0.0.1", "port": 0, "token": TOKEN},
        "clusters": {
            "shop-legacy": {"system": "tiktok", "endpoints": [legacy_url]},
            "tokopedia-pay": {"system": "tokopedia", "endpoints": [new_url]},
        },
        "routes": [
            {
                "name": "checkout",
                "match": {"prefix": "/api/checkout"},
                "category": "payment",
                "split": [
                    {"cluster": "shop-legacy", "weight": legacy},
                    {"cluster": "tokopedia-pay", "weight": new},
                ],
                "sticky": {"header": "x-user-id"},
            }
        ],
        "compliance": {
            "transition_until": "2099-01-01T00:00:00+07:00",
            "legacy_clusters": ["shop-legacy"],
        },
        "access_log": {"enabled": False},
    }


@settings(max_examples=300, deadline=None, database=None)
@given(
    users=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=50),
    before=st.integers(min_value=0, max_value=100),
    step=st.integers(min_value=0, max_value=100),
)
def test_raising_the_new_weight_moves_users_only_towards_it(
    users: list[str], before: int, step: int
) -> None:
    after = min(100, before + step)
    old = Splitter("checkout", [Target("legacy", 100 - before), Target("new", before)])
    new = Splitter("checkout", [Target("legacy", 100 - after), Target("new", after)])
    for user in users:
        if old.choose(user) == "new":
            assert new.choose(user) == "new"  # nobody moves back


def test_a_ramp_moves_exactly_the_band() -> None:
    users = [f"user-{i}" for i in range(20_000)]
    at87 = Splitter("checkout", [Target("legacy", 13), Target("new", 87)])
    at90 = Splitter("checkout", [Target("legacy", 10), Target("new", 90)])
    moved = sum(1 for u in users if at87.choose(u) != at90.choose(u))
    assert abs(moved / len(users) - 0.03) < 0.005


async def test_sticky_choice_is_the_same_on_two_proxy_processes(
    harness: Harness, tmp_path: Path
) -> None:
    legacy = await harness.backend("shop-legacy", "tiktok")
    new = await harness.backend("tokopedia-pay", "tokopedia")
    conf = split_config(legacy.url, new.url, 50, 50)
    conf.update(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "systems": SYSTEMS,
            "compliance": {**conf["compliance"], "audit": {"path": str(tmp_path / "a.log")}},
        }
    )
    path = tmp_path / "jalur.yaml"
    path.write_text(yaml.safe_dump(conf))
    procs, bases = [], []
    for _ in range(2):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "-c", str(path),
            stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=str(tmp_path),
        )  # fmt: skip
        assert proc.stderr is not None
        async with asyncio.timeout(20):
            while not (m := SERVING.search(line := (await proc.stderr.readline()).decode())):
                if not line:
                    raise AssertionError("jalur exited before serving")
        procs.append(proc)
        bases.append(f"http://127.0.0.1:{m.group(1)}")
    try:
        chosen: list[dict[str, str]] = [{}, {}]
        async with aiohttp.ClientSession() as s:
            for i, base in enumerate(bases):
                for n in range(200):
                    user = f"shopper-{n}"
                    async with s.post(f"{base}/api/checkout", headers={"x-user-id": user}) as r:
                        assert r.status == 200
                        chosen[i][user] = r.headers["x-backend-cluster"]
        assert chosen[0] == chosen[1]
        assert set(chosen[0].values()) == {"shop-legacy", "tokopedia-pay"}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            async with asyncio.timeout(20):
                assert await proc.wait() == 0


async def test_measured_progress_matches_the_split_within_one_point(harness: Harness) -> None:
    legacy = await harness.backend("shop-legacy", "tiktok")
    new = await harness.backend("tokopedia-pay", "tokopedia")
    p = await harness.proxy(split_config(legacy.url, new.url, 13, 87))
    url = f"http://127.0.0.1:{p.data_port}/api/checkout"
    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def one() -> None:
            async with s.post(url, headers={"x-user-id": uuid.uuid4().hex}) as r:
                assert r.status == 200
                await r.read()

        for _ in range(20):
            await asyncio.gather(*(one() for _ in range(500)))
        async with s.get(f"http://127.0.0.1:{p.admin_port}/migration") as r:
            view = await r.json()
        async with s.get(f"http://127.0.0.1:{p.admin_port}/metrics") as r:
            text = await r.text()
    payment = view["progress"]["payment"]
    assert payment["requests"] == 10_000
    assert abs(payment["ratio"] - 0.87) <= 0.01
    assert view["progress"]["all"]["ratio"] == pytest.approx(payment["ratio"])  # only category
    shares = view["routes"]["checkout"]["observed"]
    assert abs(shares["tokopedia-pay"] - 0.87) <= 0.01
    assert f'jalur_migration_progress_ratio{{category="payment"}} {payment["ratio"]}' in text


async def test_weights_change_live_through_admin_api_and_need_the_token(
    harness: Harness,
) -> None:
    legacy = await harness.backend("shop-legacy", "tiktok")
    new = await harness.backend("tokopedia-pay", "tokopedia")
    p = await harness.proxy(split_config(legacy.url, new.url, 100, 0))
    base = f"http://127.0.0.1:{p.data_port}/api/checkout"
    admin = f"http://127.0.0.1:{p.admin_port}/migration/checkout"
    good = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(base, headers={"x-user-id": "u1"}) as r:
            assert r.headers["x-backend-cluster"] == "shop-legacy"
        body = {"weights": {"shop-legacy": 0, "tokopedia-pay": 100}}
        async with s.post(admin, json=body) as r:
            assert r.status == 401
        async with s.post(admin, json=body, headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with s.post(base, headers={"x-user-id": "u1"}) as r:
            assert r.headers["x-backend-cluster"] == "shop-legacy"  # unchanged
        async with s.post(admin, json={"weights": {"nowhere": 1}}, headers=good) as r:
            assert r.status == 400
        async with s.post(admin, json=body, headers=good) as r:
            assert r.status == 200
            assert (await r.json())["weights"] == {"shop-legacy": 0, "tokopedia-pay": 100}
        async with s.post(base, headers={"x-user-id": "u1"}) as r:
            assert r.headers["x-backend-cluster"] == "tokopedia-pay"


async def test_weights_that_break_compliance_are_refused(harness: Harness) -> None:
    legacy = await harness.backend("shop-legacy", "tiktok")
    new = await harness.backend("tokopedia-pay", "tokopedia")
    conf = split_config(legacy.url, new.url, 50, 50)
    p = await harness.proxy(conf)
    assert p.forwarder is not None
    # The deadline has passed while running: the guard now refuses the legacy cluster.
    deadline = p.state.guard.deadline
    assert deadline is not None
    p.status.clock = lambda: deadline + 1
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{p.admin_port}/migration/checkout"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        body = {"weights": {"shop-legacy": 60, "tokopedia-pay": 40}}
        async with s.post(url, json=body, headers=headers) as r:
            assert r.status == 422
            assert "social-after-deadline" in (await r.json())["error"]
        body = {"weights": {"shop-legacy": 0, "tokopedia-pay": 100}}
        async with s.post(url, json=body, headers=headers) as r:
            assert r.status == 200  # cutting the legacy share to 0 is always allowed


async def test_post_is_never_shadowed_to_a_non_sandbox_cluster(harness: Harness) -> None:
    main = await harness.backend("showcase", "tiktok")
    live = await harness.backend("showcase-next", "tiktok")
    sandbox = await harness.backend("showcase-sandbox", "tiktok")

    def route(name: str, prefix: str, shadow: str) -> dict[str, Any]:
        return {
            "name": name,
            "match": {"prefix": prefix},
            "category": "promotion",
            "to": "showcase",
            "shadow": {"cluster": shadow, "percent": 100, "compare_body": False},
        }

    p = await harness.proxy(
        {
            "clusters": {
                "showcase": {"system": "tiktok", "endpoints": [main.url]},
                "showcase-next": {"system": "tiktok", "endpoints": [live.url]},
                "showcase-sandbox": {
                    "system": "tiktok",
                    "endpoints": [sandbox.url],
                    "sandbox": True,
                },
            },
            "routes": [
                route("live", "/live", "showcase-next"),
                route("sb", "/sb", "showcase-sandbox"),
            ],
        }
    )
    base = f"http://127.0.0.1:{p.data_port}"
    async with aiohttp.ClientSession() as s:
        for path in ("/live/a", "/sb/a"):
            async with s.post(base + path, data=b"order=1") as r:
                assert r.status == 200
            async with s.get(base + path) as r:
                assert r.status == 200
        async with asyncio.timeout(5):
            await p.services.shadower.wait_idle()  # every copy answered and counted
    assert [r.method for r in live.received] == ["GET"]  # the POST was not copied
    assert sorted(r.method for r in sandbox.received) == ["GET", "POST"]
    posted = next(r for r in sandbox.received if r.method == "POST")
    assert posted.body_bytes == len(b"order=1")
    assert ("x-jalur-shadow", "true") in [(k.lower(), v) for k, v in posted.headers]
    reg = p.services.metrics.registry
    assert reg.get_sample_value("jalur_shadow_total", {"route": "sb", "outcome": "match"}) == 2


async def test_demo_config_shows_progress_from_traffic(harness: Harness) -> None:
    legacy = await harness.backend("shop-legacy", "tiktok")
    new = await harness.backend("tokopedia-pay", "tokopedia")
    p = await harness.proxy(split_config(legacy.url, new.url, 13, 87))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{p.admin_port}/migration") as r:
            empty = await r.json()
        assert empty["progress"]["payment"]["ratio"] is None  # nothing measured yet
        assert empty["routes"]["checkout"]["configured"] == {
            "shop-legacy": 13,
            "tokopedia-pay": 87,
        }


@pytest.fixture(autouse=True)
def _no_env_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
