"""``jalur report`` from a trail written by a real proxy, checked against figures the test
computes on its own (from what each back end received and what each client was answered)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

from proxy import audit, report
from proxy import config as cfg
from proxy.boundary import make_token
from proxy.compliance import AuditLog
from proxy.server import ProxyServer

from .conftest import Harness, build_config, cluster

AUDIT_KEY = "audit-key-0123456789abcdef"
CONSENT_KEY = "0123456789abcdef-consent-key"
WEIGHTS = {"payment": 0.6, "user-data": 0.2, "merchant": 0.2}


def proxy_config(h: Harness, deadline: datetime) -> dict[str, Any]:
    b = h.backends
    return {
        "admin": {"host": "127.0.0.1", "port": 0, "token": "admin-token"},
        "clusters": {
            "shop-legacy": cluster("tiktok", b["shop-legacy"].url),
            "pay": cluster("tokopedia", b["pay"].url),
            "shop": cluster("tokopedia", b["shop"].url),
            "feed": cluster("tiktok", b["feed"].url),
        },
        "routes": [
            {
                "name": "checkout",
                "match": {"prefix": "/api/checkout"},
                "category": "payment",
                "split": [
                    {"cluster": "shop-legacy", "weight": 40},
                    {"cluster": "pay", "weight": 60},
                ],
                "sticky": {"header": "x-user-id"},
            },
            {
                "name": "orders",
                "match": {"prefix": "/api/orders"},
                "category": "user-data",
                "to": "shop",
            },
            {
                "name": "cart",
                "match": {"prefix": "/api/cart"},
                "category": "merchant",
                "to": "shop",
            },
            {"name": "other", "match": {"prefix": "/"}, "category": "promotion", "to": "feed"},
        ],
        "compliance": {
            "transition_until": deadline.isoformat(),
            "legacy_clusters": ["shop-legacy"],
            # Small files: the trail rotates many times during the test.
            "audit": {"path": str(h.tmp / "audit.log"), "max_bytes": 8192, "backups": 100},
        },
        "boundary": {
            "consent": {
                "key": CONSENT_KEY,
                "identities": [
                    {
                        "header": "x-social-user-id",
                        "from_system": "tiktok",
                        "to_system": "tokopedia",
                        "scope": "checkout",
                    }
                ],
            }
        },
        "migration": {"weights": WEIGHTS},
    }


async def backends(h: Harness) -> None:
    for name, system in (
        ("shop-legacy", "tiktok"),
        ("pay", "tokopedia"),
        ("shop", "tokopedia"),
        ("feed", "tiktok"),
    ):
        await h.backend(name, system)


async def start(h: Harness, deadline: datetime) -> ProxyServer:
    conf = build_config(proxy_config(h, deadline), env={"JALUR_AUDIT__KEY": AUDIT_KEY})
    p = ProxyServer(conf)
    await p.start()
    h.proxies.append(p)
    return p


class Expected:
    """The figures, counted from the client side and the back ends."""

    def __init__(self) -> None:
        self.blocked: dict[str, dict[str, int]] = {}
        self.consent: dict[str, int] = {}

    def block(self, route: str, reason: str) -> None:
        per = self.blocked.setdefault(route, {})
        per[reason] = per.get(reason, 0) + 1


async def test_report_from_real_traffic_equals_independent_figures(harness: Harness) -> None:
    h = harness
    await backends(h)
    deadline = datetime.now(UTC) + timedelta(days=1)
    since = datetime.now(UTC) - timedelta(seconds=1)
    p = await start(h, deadline)
    base = f"http://127.0.0.1:{p.data_port}"
    admin = f"http://127.0.0.1:{p.admin_port}/migration/checkout"
    want = Expected()
    good = make_token(CONSENT_KEY, "u-1", "tiktok", "tokopedia", ["checkout"], 300)
    forged = make_token("another-key-0123456789", "u-1", "tiktok", "tokopedia", ["checkout"], 300)

    async def checkouts(s: aiohttp.ClientSession, users: range, consent: bool = False) -> None:
        for u in users:
            headers = {"x-user-id": f"shopper-{u}"}
            token = (good if u % 3 else forged) if consent else None
            if token is not None:
                headers |= {"x-social-user-id": "u-1", "x-jalur-consent": token}
            async with s.post(f"{base}/api/checkout", headers=headers, data=b"{}") as r:
                body = await r.json()
                if r.status == 503:
                    want.block("checkout", body["reason"])
                    continue
                assert r.status == 200
                if token is not None and r.headers["x-backend-system"] == "tokopedia":
                    outcome = "valid" if token == good else "invalid"
                    want.consent[outcome] = want.consent.get(outcome, 0) + 1

    async def ramp(
        s: aiohttp.ClientSession, weights: dict[str, int], actor: str, rollback: bool = False
    ) -> None:
        headers = {"Authorization": "Bearer admin-token", "X-Jalur-Actor": actor}
        body = {"weights": weights, "rollback": rollback}
        async with s.post(admin, json=body, headers=headers) as r:
            assert r.status == 200, await r.text()

    async with aiohttp.ClientSession() as s:
        await checkouts(s, range(0, 60), consent=True)
        for _ in range(15):
            async with s.get(f"{base}/api/orders/1") as r:
                assert r.status == 200
        for _ in range(7):
            async with s.post(f"{base}/api/cart", data=b"{}") as r:
                assert r.status == 200
        for raw in ("/api./checkout", "/api%20/checkout", "/api/%EF%BD%83heckout"):
            async with s.get(URL(base + raw, encoded=True)) as r:
                assert r.status == 400
                want.block("other", (await r.json())["reason"])
        async with s.get(f"{base}/api/feed") as r:  # promotion: not audited
            assert r.status == 200
        await ramp(s, {"shop-legacy": 0, "pay": 100}, "ops-alice")
        await checkouts(s, range(60, 80))
        await ramp(s, {"shop-legacy": 50, "pay": 50}, "ops-bob", rollback=True)
        await checkouts(s, range(80, 100))
        assert p.forwarder is not None
        p.forwarder.clock = lambda: deadline.timestamp() + 1  # the deadline passes
        await checkouts(s, range(100, 130))
    await p.stop(drain_delay=0)
    # A restart on the same trail.
    p2 = await start(h, deadline)
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.get(f"http://127.0.0.1:{p2.data_port}/api/orders/2") as r:
                assert r.status == 200
    await p2.stop(drain_delay=0)
    until = datetime.now(UTC) + timedelta(seconds=1)

    files = sorted(h.tmp.glob("audit.log*"))
    assert len(files) > 3  # rotated
    built = report.build(files, AUDIT_KEY.encode(), since, until)

    b = h.backends
    legacy = len(b["shop-legacy"].received)
    pay = len(b["pay"].received)
    orders = sum(1 for x in b["shop"].received if x.path.startswith("/api/orders"))
    cart = sum(1 for x in b["shop"].received if x.path.startswith("/api/cart"))
    assert (orders, cart) == (20, 7)
    assert want.blocked["checkout"]["social-after-deadline"] > 0  # the split still picks legacy
    assert want.consent["valid"] > 0
    assert want.consent["invalid"] > 0
    rows = {r["route"]: r for r in built["routes"]}
    assert rows == {
        "checkout": {
            "category": "payment",
            "route": "checkout",
            "commerce": pay,
            "social": legacy,
            "blocked": want.blocked["checkout"],
            "consent": dict(sorted(want.consent.items())),
        },
        "orders": {
            "category": "user-data",
            "route": "orders",
            "commerce": orders,
            "social": 0,
            "blocked": {},
            "consent": {},
        },
        "cart": {
            "category": "merchant",
            "route": "cart",
            "commerce": cart,
            "social": 0,
            "blocked": {},
            "consent": {},
        },
        "other": {
            "category": "promotion",
            "route": "other",
            "commerce": 0,
            "social": 0,
            "blocked": want.blocked["other"],
            "consent": {},
        },
    }
    ratio = 0.6 * pay / (pay + legacy) + 0.2 * 1.0 + 0.2 * 1.0
    assert built["progress"]["ratio"] == pytest.approx(ratio)
    assert built["progress"]["categories"]["payment"] == {
        "commerce": pay,
        "requests": pay + legacy,
        "ratio": pytest.approx(pay / (pay + legacy)),
    }
    assert built["progress"]["weights"] == WEIGHTS
    assert [d["ratio"] for d in built["daily"]] == [pytest.approx(ratio)] * len(built["daily"])
    blocked_total = sum(sum(v.values()) for v in want.blocked.values())
    assert built["requests"] == pay + legacy + orders + cart + blocked_total
    assert built["dropped"] == 0
    changes = [(c["actor"], c["rollback"], c["weights"]) for c in built["weight_changes"]]
    assert changes == [
        ("ops-alice", False, {"shop-legacy": 0, "pay": 100}),
        ("ops-bob", True, {"shop-legacy": 50, "pay": 50}),
    ]
    assert built["weight_changes"][1]["commerce_share"] == {"before": 1.0, "after": 0.5}

    # The command line gives the same figures, and refuses a trail with a break.
    await asyncio.to_thread(command_line, h.tmp, files, since, until, built)


def command_line(
    tmp: Path, files: list[Path], since: datetime, until: datetime, built: dict[str, Any]
) -> None:
    out = tmp / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "proxy",
        "report",
        "--audit",
        *map(str, files),
        "--since",
        since.isoformat(),
        "--until",
        until.isoformat(),
        "--format",
        "json",
        "--out",
        str(out),
    ]
    env = {"JALUR_AUDIT__KEY": AUDIT_KEY, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(out.read_bytes())["routes"] == built["routes"]
    for fmt in ("markdown", "html"):
        text = subprocess.run(
            [*cmd[: cmd.index("--format")], "--format", fmt],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert text.returncode == 0, text.stderr
        assert "checkout" in text.stdout
        assert ("<polyline" in text.stdout) == (fmt == "html")
    victim = audit.order_paths(files)[1]
    victim.write_bytes(victim.read_bytes().replace(b'"status":200', b'"status":201', 1))
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "not intact" in refused.stderr
    with pytest.raises(report.NotVerified):
        report.build(files, AUDIT_KEY.encode(), since, until)


async def test_the_trail_holds_no_shopper_identity(harness: Harness) -> None:
    """Sticky keys, cookies, identity headers and consent tokens never reach the trail."""
    h = harness
    await backends(h)
    p = await start(h, datetime.now(UTC) + timedelta(days=1))
    token = make_token(CONSENT_KEY, "uid-secret-7", "tiktok", "tokopedia", ["checkout"], 300)
    secrets = ["sticky-shopper-4711", "uid-secret-7", "TTSESSION123", "SIDTOKO456", "bearer-x9"]
    headers = {
        "x-user-id": secrets[0],
        "x-social-user-id": secrets[1],
        "x-jalur-consent": token,
        "Cookie": f"tt_session={secrets[2]}; _SID_Tokopedia_={secrets[3]}",
        "Authorization": f"Bearer {secrets[4]}",
        "x-tt-user": secrets[1],
    }
    async with aiohttp.ClientSession() as s:
        for path in ("/api/checkout", "/api/orders/9", "/api/cart", "/api./checkout"):
            async with s.post(
                URL(f"http://127.0.0.1:{p.data_port}{path}", encoded=True),
                headers=headers,
                data=b"{}",
            ) as r:
                assert r.status in (200, 400)
    await p.stop(drain_delay=0)
    trail = b"".join(f.read_bytes() for f in h.tmp.glob("audit.log*"))
    assert trail.count(b'"decision":"allowed"') == 3
    assert trail.count(b'"decision":"blocked"') == 1
    for secret in [*secrets, token]:
        assert secret.encode() not in trail


def conf_record(at: str, weights: dict[str, float], legacy: int) -> dict[str, Any]:
    return {
        "time": at,
        "decision": "config",
        "category_weights": weights,
        "clusters": {
            "shop-legacy": {"system": "tiktok", "kind": "social"},
            "pay": {"system": "tokopedia", "kind": "commerce"},
        },
        "routes": {
            "checkout": {
                "category": "payment",
                "weights": {"shop-legacy": legacy, "pay": 100 - legacy},
            },
            "orders": {"category": "user-data", "weights": {"pay": 1}},
        },
    }


def served(at: str, route: str, category: str, cluster: str) -> dict[str, Any]:
    return {"time": at, "route": route, "category": category, "cluster": cluster,
            "status": 200, "decision": "allowed"}  # fmt: skip


def test_daily_figures_use_the_weights_of_their_day_and_reloads_are_weight_changes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(cfg.Audit(path=str(path)), AUDIT_KEY)
    log.start()
    day1, day2 = "2026-03-01T", "2026-03-02T"
    for r in (
        conf_record(day1 + "00:00:00.000Z", {"payment": 0.5, "user-data": 0.5}, 50),
        *(served(day1 + f"01:00:0{i}.000Z", "checkout", "payment", "pay") for i in range(3)),
        served(day1 + "02:00:00.000Z", "checkout", "payment", "shop-legacy"),
        *(served(day1 + f"03:00:0{i}.000Z", "orders", "user-data", "pay") for i in range(2)),
        # A reload on day 2: payment weighs everything, checkout all on commerce.
        conf_record(day2 + "00:00:00.000Z", {"payment": 1.0, "user-data": 0.0}, 0),
        *(served(day2 + f"01:00:0{i}.000Z", "checkout", "payment", "pay") for i in range(2)),
        # Another reload moves shoppers back: a rollback by config.
        conf_record(day2 + "05:00:00.000Z", {"payment": 1.0, "user-data": 0.0}, 20),
        served("2026-03-03T00:00:00.000Z", "checkout", "payment", "shop-legacy"),  # after until
    ):
        log.record(r)
    log.close()
    built = report.build(
        [path], AUDIT_KEY.encode(), report.parse_time("2026-03-01"), report.parse_time("2026-03-03")
    )
    daily = {d["day"]: d for d in built["daily"]}
    assert daily["2026-03-01"]["ratio"] == pytest.approx(0.5 * 3 / 4 + 0.5 * 1.0)
    assert daily["2026-03-01"]["weights"] == {"payment": 0.5, "user-data": 0.5}
    assert daily["2026-03-02"]["ratio"] == pytest.approx(1.0)
    # The window: the weights in effect at its end, over all of its traffic.
    assert built["progress"]["weights"] == {"payment": 1.0, "user-data": 0.0}
    assert built["progress"]["ratio"] == pytest.approx(5 / 6)
    assert built["requests"] == 8
    changes = [
        (c["time"][:10], c["actor"], c["rollback"], c["via"]) for c in built["weight_changes"]
    ]
    assert changes == [
        ("2026-03-02", "config reload", False, "config"),
        ("2026-03-02", "config reload", True, "config"),
    ]
    assert built["series"]["points"][0]["at"].startswith("2026-03-01")


def test_report_times() -> None:
    assert report.parse_time("2026-03-01") == datetime(2026, 3, 1, tzinfo=UTC)
    assert report.parse_time("2026-03-01T07:00:00+07:00") == datetime(2026, 3, 1, tzinfo=UTC)
    assert report.parse_time("2026-03-01T00:00:00Z") == datetime(2026, 3, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="RFC 3339"):
        report.parse_time("yesterday")
