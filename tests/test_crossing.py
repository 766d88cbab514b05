"""What crosses the boundary, end to end on real sockets: the reproductions of issue #18.

Each test sends what a hostile client (or a hostile social back end) sent on ``main`` and
checks what the other side received, what the client got back, and what was logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.server import ProxyServer

from .conftest import (
    Backend,
    Harness,
    cluster,
    raw_request,
    until,
)

COMMERCE_SECRET = "S3cr3tCommerce"
SOCIAL_SECRET = "S3cr3tSocial"
PAY_HOST = "pay.shop.example"


def routes() -> list[dict[str, Any]]:
    """A host-only payment route, path transaction routes, then the social catch-all."""
    return [
        {"name": "pay-host", "match": {"host": PAY_HOST}, "category": "payment", "to": "pay"},
        {
            "name": "payment",
            "match": {"prefix": "/api/payment"},
            "category": "payment",
            "to": "pay",
        },
        {
            "name": "orders",
            "match": {"regex": "/api/orders/[0-9]+"},
            "category": "user-data",
            "to": "pay",
        },
        {"name": "cart", "match": {"exact": "/api/cart"}, "category": "merchant", "to": "pay"},
        {"name": "feed", "match": {}, "category": "promotion", "to": "social"},
    ]


async def start(h: Harness, social_url: str | None = None, **extra: Any) -> ProxyServer:
    social = social_url or (await h.backend("social", "tiktok")).url
    pay = await h.backend("pay", "tokopedia")
    conf: dict[str, Any] = {
        "clusters": {"social": cluster("tiktok", social), "pay": cluster("tokopedia", pay.url)},
        "routes": routes(),
        "access_log": {"path": str(h.tmp / "access.log"), "flush_interval": 0.01},
        "boundary": {
            "consent": {
                "identities": [
                    {
                        "header": "x-social-user-id",
                        "from_system": "tiktok",
                        "to_system": "tokopedia",
                        "scope": "checkout",
                    }
                ]
            }
        },
    }
    conf.update(extra)
    return await h.proxy(conf)


def jsonlines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def request(
    method: str, target: str, *headers: tuple[str, bytes | str], body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode()]
    names = {n.lower() for n, _ in headers}
    if "host" not in names:
        lines.append(b"Host: shop.example")
    for name, value in headers:
        lines.append(
            name.encode("latin-1")
            + b": "
            + (value if isinstance(value, bytes) else value.encode("latin-1"))
        )
    lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def received(b: Backend) -> list[dict[str, str]]:
    """Each request a back end got, as {lower-cased header name: value} (plus ``:path``)."""
    out = []
    for r in b.received:
        d = {k.lower(): v for k, v in r.headers}
        d[":path"] = r.path
        out.append(d)
    return out


# -- audit: every byte 0x80-0xff in every logged field -------------------------------------

LOGGED = ("User-Agent", "X-Forwarded-For", "Host")


@pytest.mark.parametrize("field", LOGGED)
async def test_every_high_byte_in_a_logged_field_is_audited_and_logged(
    harness: Harness, field: str
) -> None:
    """Issue #18: one ``\\xff`` made the access log raise: the payment ran with 200 and
    neither an audit record nor an access-log line was written. Every byte 0x80-0xff, for an
    allowed payment and for a compliance-blocked one."""
    p = await start(harness)
    audit, access = harness.tmp / "audit.log", harness.tmp / "access.log"
    sent = 0
    for byte in range(0x80, 0x100):
        value = b"pay\xff".replace(b"\xff", bytes([byte]))
        header = (field, value if field != "Host" else b"shop.example" + value)
        # An allowed payment, then a variant the social route may not carry (blocked, 400).
        for target, blocked in (("/api/payment/charge", False), ("/api/%EF%BD%90ayment", True)):
            resp = await raw_request(p.data_port, request("POST", target, header, body=b"{}"))
            sent += 1
            assert resp.status in ((400,) if blocked or field == "Host" else (200,)), (
                byte,
                target,
                resp.status,
                resp.body,
            )
            assert resp.status != 500
    await until(lambda: len(jsonlines(access)) == sent, within=10)
    lines = jsonlines(access)
    assert all(line["response_code"] != 500 for line in lines)
    logged = {
        line[
            {"User-Agent": "user_agent", "X-Forwarded-For": "x_forwarded_for", "Host": "authority"}[
                field
            ]
        ]
        for line in lines
    }
    assert any("\\x" in str(v) for v in logged), "the byte is shown escaped"
    if field != "Host":  # an invalid Host is refused before routing: no route, no audit
        await p.stop(drain_delay=0)
        records = jsonlines(audit)
        assert len(records) == sent
        assert sorted({r["decision"] for r in records}) == ["allowed", "blocked"]


# -- Host ----------------------------------------------------------------------------------

HOST_SPELLINGS = (
    "pay.shop.example",
    "pay.shop.example.",
    "PAY.shop.EXAMPLE.:443",
    "Pay.Shop.Example:8080",
    "pay.shop.example.:80",
    "PAY.SHOP.EXAMPLE",
)
BAD_HOSTS = (
    "u@pay.shop.example",
    "pay.shop.example/x",
    "pay.shop.example..",
    "pay.shop.example?x",
    "pay.shop.example#x",
    "pay.shop.example:99999",
    "pay.shop.example:x",
    "pay..shop.example",
    "pay.shop.example, other.example",
    "pay.shop.example%2e",
    "pay.shop.example\\x",
    "[::1",
)


async def test_a_host_route_matches_every_spelling_of_its_host(harness: Harness) -> None:
    """Issue #18: ``pay.shop.example.`` and ``PAY.shop.EXAMPLE.:443`` went to social."""
    p = await start(harness)
    for host in HOST_SPELLINGS:
        resp = await raw_request(p.data_port, request("POST", "/checkout", ("Host", host)))
        assert resp.status == 200, host
        assert orjson.loads(resp.body)["system"] == "tokopedia", host
    assert not harness.backends["social"].received


async def test_an_invalid_host_is_400_and_never_forwarded(harness: Harness) -> None:
    """Issue #18: ``u@pay.shop.example`` and ``pay.shop.example/x`` were forwarded unchanged
    (RFC 9112 section 3.2: 400). Two Host lines are 400 too."""
    p = await start(harness)
    for host in BAD_HOSTS:
        resp = await raw_request(p.data_port, request("GET", "/checkout", ("Host", host)))
        assert resp.status == 400, host
        body = orjson.loads(resp.body)
        assert body["reason"] in ("invalid-host", "several-hosts"), host
        assert body["request_id"], host
    two = request("GET", "/x", ("Host", "shop.example"), ("Host", PAY_HOST))
    assert (await raw_request(p.data_port, two)).status == 400
    assert not harness.backends["social"].received
    assert not harness.backends["pay"].received
