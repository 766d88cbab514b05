"""The admin surface: where it listens, who may mutate, and that it never mixes with the data
listener (the admin port serves no proxied traffic, the data port serves nothing of admin)."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

import aiohttp
import orjson
import pytest

from proxy import config as cfg
from proxy.server import ProxyServer

from .conftest import Harness, raw_request

TOKEN = "admin-s3cret-token"
ADMIN_PATHS = ("/metrics", "/migration", "/readyz", "/healthz", "/livez", "/config")


async def split_proxy(h: Harness, admin: dict[str, Any], **extra: Any) -> ProxyServer:
    """A proxy with a migration split on ``/api/checkout`` (weights changeable through the
    admin API) and a promotion route on ``/api/feed``."""
    legacy = await h.backend("shop-legacy", "tiktok")
    new = await h.backend("tokopedia-pay", "tokopedia")
    feed = await h.backend("feed", "tiktok")
    return await h.proxy(
        {
            "admin": admin,
            "clusters": {
                "shop-legacy": {"system": "tiktok", "endpoints": [legacy.url]},
                "tokopedia-pay": {"system": "tokopedia", "endpoints": [new.url]},
                "feed": {"system": "tiktok", "endpoints": [feed.url]},
            },
            "routes": [
                {
                    "name": "checkout",
                    "match": {"prefix": "/api/checkout"},
                    "category": "payment",
                    "split": [
                        {"cluster": "shop-legacy", "weight": 50},
                        {"cluster": "tokopedia-pay", "weight": 50},
                    ],
                },
                {"name": "feed", "match": {"prefix": "/api/feed"}, "category": "promotion",
                 "to": "feed"},
            ],
            "compliance": {
                "transition_until": "2099-01-01T00:00:00+00:00",
                "legacy_clusters": ["shop-legacy"],
                "audit": {"path": str(h.tmp / "audit.log")},
            },
            **extra,
        }
    )  # fmt: skip


def weights(p: ProxyServer) -> dict[str, int]:
    view = p.state.migration.view()["routes"]["checkout"]
    return dict(view["weights"])


def received(h: Harness) -> int:
    return sum(len(b.received) for b in h.backends.values())


def test_admin_defaults_to_loopback() -> None:
    assert cfg.Admin().host == "127.0.0.1"
    assert cfg.Admin().token is None  # mutations refused until a token is set


async def test_admin_socket_is_bound_to_loopback_by_default(harness: Harness) -> None:
    p = await split_proxy(harness, {"port": 0})  # no host given
    assert p.config.admin.host == "127.0.0.1"
    runner = p._admin_runner
    assert runner is not None
    hosts = {addr[0] for addr in runner.addresses}
    assert hosts == {"127.0.0.1"}, hosts


@pytest.mark.parametrize(
    ("authorization", "challenge"),
    [
        (None, 'Bearer realm="jalur-admin"'),
        ("Bearer wrong-token", 'Bearer realm="jalur-admin", error="invalid_token"'),
        (f"Basic {TOKEN}", 'Bearer realm="jalur-admin", error="invalid_token"'),
        (f"Bearer {TOKEN}x", 'Bearer realm="jalur-admin", error="invalid_token"'),
        (f"Bearer {TOKEN[:-1]}", 'Bearer realm="jalur-admin", error="invalid_token"'),
        ("Bearer", 'Bearer realm="jalur-admin"'),
    ],
)
async def test_migration_update_needs_the_bearer_token(
    harness: Harness, authorization: str | None, challenge: str
) -> None:
    p = await split_proxy(harness, {"host": "127.0.0.1", "port": 0, "token": TOKEN})
    before = weights(p)
    headers = {} if authorization is None else {"Authorization": authorization}
    body = {"weights": {"shop-legacy": 0, "tokopedia-pay": 100}}
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{p.admin_port}/migration/checkout"
        async with s.post(url, json=body, headers=headers) as r:
            assert r.status == 401
            assert r.content_type == "application/json"
            assert "bearer token" in (await r.json())["error"]
            assert r.headers["WWW-Authenticate"] == challenge
    assert weights(p) == before


async def test_mutations_are_refused_when_no_token_is_configured(harness: Harness) -> None:
    p = await split_proxy(harness, {"host": "127.0.0.1", "port": 0})
    before = weights(p)
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{p.admin_port}/migration/checkout"
        body = {"weights": {"shop-legacy": 0, "tokopedia-pay": 100}}
        # Not even an empty bearer matches "no token".
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
            async with s.post(url, json=body, headers=headers) as r:
                assert r.status == 403
                assert "admin.token" in (await r.json())["error"]
    assert weights(p) == before


async def test_a_non_utf8_token_is_a_401_not_a_crash(harness: Harness) -> None:
    p = await split_proxy(harness, {"host": "127.0.0.1", "port": 0, "token": TOKEN})
    body = b'{"weights": {"shop-legacy": 0, "tokopedia-pay": 100}}'
    r = await raw_request(
        p.admin_port,
        b"POST /migration/checkout HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe"
        + TOKEN.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body,
    )
    assert r.status == 401, r.body
    assert orjson.loads(r.body)["error"] == "missing or wrong bearer token"
    assert weights(p)["tokopedia-pay"] == 50


async def test_the_token_is_compared_in_constant_time(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module proxy.admin calls
    p = await split_proxy(harness, {"host": "127.0.0.1", "port": 0, "token": TOKEN})
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{p.admin_port}/migration/checkout"
        body = {"weights": {"shop-legacy": 10, "tokopedia-pay": 90}}
        for given in ("nope", TOKEN):
            async with s.post(url, json=body, headers={"Authorization": f"Bearer {given}"}) as r:
                assert r.status == (200 if given == TOKEN else 401)
    assert calls == [(b"nope", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]
    assert weights(p) == {"shop-legacy": 10, "tokopedia-pay": 90}


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
async def test_mutating_endpoint_is_post_only(harness: Harness, method: str) -> None:
    p = await split_proxy(harness, {"host": "127.0.0.1", "port": 0, "token": TOKEN})
    before = weights(p)
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{p.admin_port}/migration/checkout"
        body = {"weights": {"shop-legacy": 0, "tokopedia-pay": 100}}
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with s.request(method, url, json=body, headers=headers) as r:
            assert r.status == 405
            assert r.headers["Allow"] == "POST"
            assert r.content_type == "application/json"
            assert (await r.json())["error"] == "method not allowed"
    assert weights(p) == before


async def test_read_only_admin_endpoints_refuse_post(harness: Harness) -> None:
    p = await split_proxy(harness, {"host": "127.0.0.1", "port": 0, "token": TOKEN})
    async with aiohttp.ClientSession() as s:
        for path in ADMIN_PATHS:
            url = f"http://127.0.0.1:{p.admin_port}{path}"
            async with s.post(url, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 405, path
                assert "GET" in r.headers["Allow"], path
                assert r.content_type == "application/json", path


async def test_admin_port_never_serves_proxied_traffic(harness: Harness) -> None:
    p = await split_proxy(harness, {"host": "127.0.0.1", "port": 0, "token": TOKEN})
    feed = harness.backends["feed"]
    async with aiohttp.ClientSession() as s:
        for method, path in (("GET", "/api/feed"), ("POST", "/api/checkout"),
                             ("GET", "/api/feed/_sim/bytes/10"), ("GET", "/")):  # fmt: skip
            url = f"http://127.0.0.1:{p.admin_port}{path}"
            async with s.request(method, url, headers={"x-user-id": "u1"}) as resp:
                assert resp.status in (404, 405), (method, path)
                assert resp.content_type == "application/json"
                assert "x-backend-system" not in resp.headers
    # Absolute-form target and the back end's own Host: still not forwarded.
    r = await raw_request(
        p.admin_port,
        f"GET {feed.url}/api/feed HTTP/1.1\r\nHost: 127.0.0.1:{feed.port}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert r.status == 404
    assert received(harness) == 0
    # The data port does forward the same request (the set-up is sound).
    r = await raw_request(
        p.data_port, b"GET /api/feed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert r.status == 200
    assert r.header("x-backend-system") == "tiktok"


async def test_data_port_without_a_matching_route_never_answers_admin_paths(
    harness: Harness,
) -> None:
    p = await split_proxy(harness, {"host": "127.0.0.1", "port": 0, "token": TOKEN})
    before = weights(p)
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    for method, path in [("GET", x) for x in ADMIN_PATHS] + [("POST", "/migration/checkout")]:
        body = b'{"weights": {"shop-legacy": 0, "tokopedia-pay": 100}}' if method == "POST" else b""
        r = await raw_request(
            p.data_port,
            f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body,
        )
        assert r.status == 404, (path, r.body)
        error = orjson.loads(r.body)
        assert error["request_id"], path
        assert b"jalur_" not in r.body  # no metrics
        assert TOKEN.encode() not in r.body  # no config
        assert b"ready" not in r.body
    assert weights(p) == before
    assert received(harness) == 0


async def test_data_port_routes_admin_paths_as_ordinary_paths(harness: Harness) -> None:
    """Under a catch-all route, /metrics and friends are the back end's paths, never admin."""
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(
        {
            "admin": {"host": "127.0.0.1", "port": 0, "token": TOKEN},
            "clusters": {"pay": {"system": "tokopedia", "endpoints": [b.url]}},
            "routes": [{"name": "all", "match": {"prefix": "/"}, "category": "promotion",
                        "to": "pay"}],
        }
    )  # fmt: skip
    async with aiohttp.ClientSession() as s:
        for path in ADMIN_PATHS:
            async with s.get(f"http://127.0.0.1:{p.data_port}{path}") as r:
                assert r.status == 200, path
                assert r.headers["x-backend-cluster"] == "pay", path
                echo = await r.json()
                assert echo["path"] == path
                assert "jalur_requests_total" not in orjson.dumps(echo).decode()
        async with s.post(
            f"http://127.0.0.1:{p.data_port}/migration/all",
            json={"weights": {"pay": 1}},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r:
            assert r.status == 200
            assert (await r.json())["path"] == "/migration/all"  # forwarded, not applied
    assert [r.path for r in b.received] == [*ADMIN_PATHS, "/migration/all"]


async def test_admin_listener_is_a_separate_socket(harness: Harness) -> None:
    p = await split_proxy(harness, {"host": "127.0.0.1", "port": 0, "token": TOKEN})
    assert p.admin_port != p.data_port
    # Each answers only its own kind of request on the same connection: no cross-talk on
    # keep-alive either.
    reader, writer = await asyncio.open_connection("127.0.0.1", p.admin_port)
    try:
        writer.write(
            b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\nGET /api/feed HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(5):
            first = await reader.readuntil(b"\r\n\r\n")
            length = int(first.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            second = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert first.startswith(b"HTTP/1.1 200")
    assert second.startswith(b"HTTP/1.1 404")
    assert received(harness) == 0
