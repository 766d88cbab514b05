"""Compliance, boundary, metrics and logs as a client sees them through a running proxy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
from yarl import URL

from proxy.audit import CONTROL
from proxy.boundary import make_token

from .conftest import Harness

KEY = "0123456789abcdef-consent-key"


async def two_systems(h: Harness, **extra: Any) -> tuple[int, int]:
    """Social catch-all and commerce payment routes, like the demo."""
    social = await h.backend("feed", "tiktok")
    legacy = await h.backend("shop-legacy", "tiktok")
    commerce = await h.backend("pay", "tokopedia")
    conf: dict[str, Any] = {
        "clusters": {
            "feed": {"system": "tiktok", "endpoints": [social.url]},
            "shop-legacy": {"system": "tiktok", "endpoints": [legacy.url]},
            "pay": {"system": "tokopedia", "endpoints": [commerce.url]},
        },
        "routes": [
            {
                "name": "payment",
                "match": {"prefix": "/api/payment", "case_sensitive": False},
                "category": "payment",
                "to": "pay",
            },
            {
                "name": "feed",
                "match": {"prefix": "/api/feed"},
                "category": "promotion",
                "to": "feed",
            },
            {"name": "other", "match": {"prefix": "/"}, "category": "promotion", "to": "feed"},
        ],
        "boundary": {
            "consent": {
                "key": KEY,
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
    }
    conf.update(extra)
    p = await h.proxy(conf)
    return p.data_port, p.admin_port


async def test_cookies_and_headers_of_the_other_system_never_cross(harness: Harness) -> None:
    port, _ = await two_systems(harness)
    headers = {
        "Cookie": "tt_session=SOCIAL; lang=id; _SID_Tokopedia_=COMMERCE",
        "x-tt-user": "u-social",
        "Authorization": "Bearer commerce-token",
        "x-social-user-id": "u-social",
    }
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/api/payment/charge", headers=headers) as r:
            assert r.status == 200
            to_commerce = {k.lower(): v for k, v in (await r.json())["headers"]}
        async with s.get(f"http://127.0.0.1:{port}/api/feed", headers=headers) as r:
            assert r.status == 200
            to_social = {k.lower(): v for k, v in (await r.json())["headers"]}
    assert to_commerce["cookie"] == "lang=id; _SID_Tokopedia_=COMMERCE"
    assert "x-tt-user" not in to_commerce
    assert to_commerce["authorization"] == "Bearer commerce-token"
    assert "x-social-user-id" not in to_commerce  # no consent token
    assert to_social["cookie"] == "tt_session=SOCIAL; lang=id"
    assert "authorization" not in to_social
    assert to_social["x-tt-user"] == "u-social"


async def test_identity_crosses_only_with_a_valid_consent_token(harness: Harness) -> None:
    port, admin = await two_systems(harness)
    good = make_token(KEY, "u-1", "tiktok", "tokopedia", ["checkout"], 300)
    forged = make_token("another-key-0123456789", "u-1", "tiktok", "tokopedia", ["checkout"], 300)
    url = f"http://127.0.0.1:{port}/api/payment"
    async with aiohttp.ClientSession() as s:
        for token, expect in ((good, "u-1"), (forged, None)):
            h = {"x-social-user-id": "u-1", "x-jalur-consent": token}
            async with s.get(url, headers=h) as r:
                sent = {k.lower(): v for k, v in (await r.json())["headers"]}
            assert sent.get("x-social-user-id") == expect
            assert "x-jalur-consent" not in sent
        async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
            text = await r.text()
    assert 'jalur_consent_total{result="valid"} 1.0' in text
    assert 'jalur_consent_total{result="invalid"} 1.0' in text


async def test_underscore_header_is_400_and_not_forwarded(harness: Harness) -> None:
    port, _ = await two_systems(harness)
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{port}/api/payment", headers={"X_TT_User": "u"}) as r,
    ):
        assert r.status == 400
        body = await r.json()
    assert "request_id" in body
    assert "'_'" in body["error"]
    assert all(not b.received for b in harness.backends.values())


async def test_social_backend_cannot_set_the_commerce_session_cookie(harness: Harness) -> None:
    port, _ = await two_systems(harness)
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{port}/api/feed/_sim/set-cookie/_SID_Tokopedia_/stolen"
        async with s.get(url) as r:
            assert r.status == 200
            assert "Set-Cookie" not in r.headers
        url = f"http://127.0.0.1:{port}/api/feed/_sim/set-cookie/tt_session/fine"
        async with s.get(url) as r:
            assert r.headers["Set-Cookie"].startswith("tt_session=fine")


async def test_transaction_variant_of_a_path_to_social_is_400(harness: Harness) -> None:
    port, _ = await two_systems(harness)
    # Each passes canonicalisation, misses the payment route and would go to the social
    # catch-all, but a back end could read it as /api/payment (fullwidth p under NFKC, a
    # trailing dot or space trimmed from a segment).
    for raw in ("/api/%EF%BD%90ayment", "/api./payment", "/api%20/payment"):
        url = URL(f"http://127.0.0.1:{port}{raw}", encoded=True)
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            assert r.status == 400, raw
            body = await r.json()
            assert body["request_id"]
    assert not harness.backends["feed"].received


async def test_runtime_guard_blocks_legacy_cluster_after_deadline_without_fallback(
    harness: Harness,
) -> None:
    social = await harness.backend("shop-legacy", "tiktok")
    commerce = await harness.backend("pay", "tokopedia")
    deadline = datetime.now(UTC) + timedelta(hours=1)
    p = await harness.proxy(
        {
            "clusters": {
                "shop-legacy": {"system": "tiktok", "endpoints": [social.url]},
                "pay": {"system": "tokopedia", "endpoints": [commerce.url]},
            },
            "routes": [
                {
                    "name": "payment",
                    "match": {"prefix": "/api/payment"},
                    "category": "payment",
                    "split": [
                        {"cluster": "shop-legacy", "weight": 100},
                        {"cluster": "pay", "weight": 0},
                    ],
                }
            ],
            "compliance": {
                "transition_until": deadline.isoformat(),
                "legacy_clusters": ["shop-legacy"],
                "audit": {"path": str(harness.tmp / "audit.log")},
            },
        }
    )
    url = f"http://127.0.0.1:{p.data_port}/api/payment/charge"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=b"{}") as r:
            assert r.status == 200  # inside the transition window
            assert r.headers["x-backend-system"] == "tiktok"
        assert p.forwarder is not None
        p.forwarder.clock = lambda: deadline.timestamp() + 1  # the deadline passes while running
        async with s.post(url, data=b"{}") as r:
            assert r.status == 503
            body = await r.json()
        async with s.get(f"http://127.0.0.1:{p.admin_port}/metrics") as r:
            text = await r.text()
    assert body["reason"] == "social-after-deadline"
    assert len(social.received) == 1
    assert not commerce.received  # never a fallback
    assert (
        'jalur_compliance_blocked_total{reason="social-after-deadline",route="payment"} 1.0' in text
    )
    await p.stop(drain_delay=0)  # flushes the audit log
    lines = [orjson.loads(x) for x in (harness.tmp / "audit.log").read_bytes().splitlines()]
    lines = [x for x in lines if x["decision"] not in CONTROL]
    decisions = [(x["decision"], x["status"], x["cluster"]) for x in lines]
    assert decisions == [("allowed", 200, "shop-legacy"), ("blocked", 503, "shop-legacy")]


async def test_per_route_metrics_after_known_traffic(harness: Harness) -> None:
    port, admin = await two_systems(harness)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(f"http://127.0.0.1:{port}/api/feed") as r:
                assert r.status == 200
        for _ in range(2):
            async with s.post(f"http://127.0.0.1:{port}/api/payment", data=b"12345") as r:
                assert r.status == 200
        async with s.get(f"http://127.0.0.1:{port}/api/feed%2Fx") as r:
            assert r.status == 400
        async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
            text = await r.text()
    assert (
        'jalur_requests_total{category="promotion",cluster="feed",code="200",method="GET",'
        'route="feed"} 3.0' in text
    )
    assert (
        'jalur_requests_total{category="payment",cluster="pay",code="200",method="POST",'
        'route="payment"} 2.0' in text
    )
    assert 'jalur_request_body_bytes_total{route="payment"} 10.0' in text
    assert 'jalur_requests_rejected_total{reason="encoded-slash"} 1.0' in text
    assert 'jalur_request_duration_seconds_count{cluster="feed",route="feed"} 3.0' in text
    assert 'jalur_requests_in_flight{route="feed"} 0.0' in text
