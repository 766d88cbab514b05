"""What crosses the boundary, end to end on real sockets: the reproductions of issue #18.

Each test sends what a hostile client (or a hostile social back end) sent on ``main`` and
checks what the other side received, what the client got back, and what was logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy import audit as trail
from proxy import config as cfg
from proxy.server import ProxyServer

from .conftest import (
    Backend,
    Harness,
    RawUpstream,
    cluster,
    raw_request,
    raw_upstream,
    read_request,
    until,
)

COMMERCE_SECRET = "S3cr3tCommerce"
SOCIAL_SECRET = "S3cr3tSocial"
PAY_HOST = "pay.shop.example"


# A social identity that commerce may receive with the user's consent only.
BOUNDARY: dict[str, Any] = {
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
}


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


async def start(
    h: Harness, social_url: str | None = None, pay_url: str | None = None, **extra: Any
) -> ProxyServer:
    social = social_url or (await h.backend("social", "tiktok")).url
    pay = pay_url or (await h.backend("pay", "tokopedia")).url
    conf: dict[str, Any] = {
        "clusters": {"social": cluster("tiktok", social), "pay": cluster("tokopedia", pay)},
        "routes": routes(),
        "access_log": {"path": str(h.tmp / "access.log"), "flush_interval": 0.01},
        "boundary": BOUNDARY,
    }
    conf.update(extra)
    return await h.proxy(conf)


def jsonlines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def audited(path: Path) -> list[dict[str, Any]]:
    """The audit trail's request records (not its chain and config records)."""
    return list(trail.iter_requests(jsonlines(path)))


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
        records = audited(audit)
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


# -- request lines -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [b"GET /x HTTP/2.0", b"GET /x HTTP/0.9", b"GET /x HTTP/1.2", b"GET /x HTTP/3.0", b"GET /x"],
)
async def test_only_http_1_0_and_1_1_request_lines_are_served(
    harness: Harness, line: bytes
) -> None:
    """Issue #18: ``GET /x`` with an HTTP/0.9 or ``HTTP/2.0`` request line was proxied."""
    p = await start(harness)
    resp = await raw_request(p.data_port, line + b"\r\nHost: shop.example\r\n\r\n")
    # llhttp itself refuses 1.2 and 3.0 as a bad request line (400, never proxied).
    assert resp.status == (400 if line.endswith((b"1.2", b"3.0")) else 505), resp
    assert not harness.backends["social"].received
    ok = await raw_request(p.data_port, b"GET /x HTTP/1.0\r\nHost: shop.example\r\n\r\n")
    assert ok.status == 200


# -- cookies, both directions ----------------------------------------------------------------

# Separators a lenient parser splits at and RFC 6265 does not; spellings PHP folds.
SEPARATORS = (" ", ",", "\t", ", ", " ,", ",\t")


def spellings(owned: str) -> list[str]:
    """Names some stack reads as ``owned`` (PHP folds '.', ' ' and '[' into '_',
    percent-decodes and reads ``a[x]`` as ``a``; several compare without case)."""
    i = owned.index("_", 1)  # an inner '_'
    return [
        owned,
        *(owned[:i] + c + owned[i + 1 :] for c in (".", "[", " ", "%5F", "%5f", "%2E")),
        owned.upper(),
        owned + "[x]",
        " " + owned,
    ]


def foreign_cookies(owned: str, secret: str) -> list[str]:
    out = [f"a=1{sep}{name}={secret}" for sep in SEPARATORS for name in spellings(owned)]
    out += [f"a=1; {name}={secret}" for name in spellings(owned)]
    out += [f'a="1 {owned}={secret}"', f"{owned}{secret}", f"a=1;{owned}={secret},b=2"]
    return out


@pytest.mark.parametrize(
    ("path", "system", "owned", "secret"),
    [
        ("/feed", "social", "_SID_Tokopedia_", COMMERCE_SECRET),
        ("/api/payment/charge", "pay", "tt_session", SOCIAL_SECRET),
    ],
)
async def test_no_spelling_of_a_foreign_cookie_crosses(
    harness: Harness, path: str, system: str, owned: str, secret: str
) -> None:
    """Issue #18: ``Cookie: a=1 _SID_Tokopedia_=S`` (space, comma or tab instead of ``; ``)
    passed unchanged and aiohttp read the commerce session at social; PHP read
    ``_SID[Tokopedia_=x`` as ``_SID_Tokopedia_``. The same in the other direction."""
    p = await start(harness)
    cookies = foreign_cookies(owned, secret)
    for cookie in cookies:
        resp = await raw_request(p.data_port, request("GET", path, ("Cookie", cookie)))
        assert resp.status == 200, cookie
    got = received(harness.backends[system])
    assert len(got) == len(cookies)
    for cookie, req in zip(cookies, got, strict=True):
        assert secret not in req.get("cookie", ""), cookie
        # What is left is one canonical spelling: strict pairs joined by "; ".
        assert req.get("cookie", "a=1") in ("a=1", "a=1; b=2"), (cookie, req.get("cookie"))


# -- header names ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reject", "drop"])
async def test_header_names_outside_letters_digits_dash_never_cross(
    harness: Harness, mode: str
) -> None:
    """Issue #18: ``X-Shop.User`` was not stripped (PHP reads ``HTTP_X_SHOP_USER``); a
    consent-gated identity crossed the same way without a token."""
    boundary = {"header_names": mode, "underscore_headers": mode}
    p = await start(harness, boundary={**BOUNDARY, **boundary})
    names = [
        ("X-TT.User", "/api/payment/charge", "pay"),
        ("X-Social.User-Id", "/api/payment/charge", "pay"),
        ("x-social.user.id", "/api/payment/charge", "pay"),
        ("X-TT User", "/api/payment/charge", "pay"),
        ("Authorization.", "/feed", "social"),
        ("Authori~zation", "/feed", "social"),
        ("X-TT_User", "/api/payment/charge", "pay"),
        ("X-Shop.User", "/feed", "social"),
        ("X-Shop+User", "/feed", "social"),
        ("X-Shop!User", "/feed", "social"),
    ]
    for name, path, _ in names:
        if " " in name:
            continue  # not a field name at all: the parser refuses it (400)
        resp = await raw_request(p.data_port, request("GET", path, (name, "u-42")))
        assert resp.status == (400 if mode == "reject" else 200), name
        if mode == "reject":
            body = orjson.loads(resp.body)
            assert body["reason"] in ("header_name", "underscore_header")
    for b in harness.backends.values():
        for req in received(b):
            assert "u-42" not in req.values(), req
    if mode == "drop":
        assert len(received(harness.backends["pay"])) + len(
            received(harness.backends["social"])
        ) == sum(" " not in n for n, _, _ in names)


# -- Set-Cookie from a back end ----------------------------------------------------------------


def plants(owned: str) -> list[str]:
    """Set-Cookie lines after which a browser holds a cookie some stack reads as ``owned``."""
    i = owned.index("_", 1)
    return [
        f"={owned}=x",  # nameless: sent back as "_SID_Tokopedia_=x"
        f"{owned[:i]}[{owned[i + 1 :]}=x",
        f"{owned[:i]}.{owned[i + 1 :]}=x",
        f"{owned[:i]}%5F{owned[i + 1 :]}=x",
        f"tt_x=1 {owned}=x",
        f"tt_x=1,{owned}=x",
        f"tt_x=1\t{owned}=x; Path=/",
        f'tt_x="1 {owned}=x"',
        f" {owned} =x; Path=/",
        f"{owned.upper()}=x; HttpOnly",
        f"{owned}=x; Domain=shop.example",
        f"{owned}",  # nameless, value only
        f"{owned}[a]=x",
    ]


SAFE_SET_COOKIES = ["lang=id; Path=/", "theme=dark", 'q="v"; Secure']


async def set_cookie_upstream(lines: list[str]) -> RawUpstream:
    async def answer(up: RawUpstream, reader: Any, writer: Any) -> None:
        while True:
            await read_request(reader)
            head = ["HTTP/1.1 200 OK", "Content-Length: 2"]
            head += [f"Set-Cookie: {line}" for line in lines]
            writer.write(("\r\n".join(head) + "\r\n\r\nok").encode("latin-1"))
            await writer.drain()

    return await raw_upstream(answer)


@pytest.mark.parametrize(
    ("system", "path", "owned"),
    [("social", "/feed", "_SID_Tokopedia_"), ("pay", "/api/payment/x", "tt_session")],
)
async def test_a_back_end_cannot_plant_another_systems_cookie(
    harness: Harness, system: str, path: str, owned: str
) -> None:
    """Issue #18: the social back end planted the commerce session with
    ``=_SID_Tokopedia_=x``, ``_SID[Tokopedia_=x`` and ``tt_x=1 _SID_Tokopedia_=x``."""
    own = "tt_session=mine; Path=/" if system == "social" else "_SID_Tokopedia_=mine; Secure"
    up = await set_cookie_upstream([*plants(owned), *SAFE_SET_COOKIES, own])
    if system == "social":
        p = await start(harness, social_url=up.url)
    else:
        p = await start(harness, pay_url=up.url)
    try:
        resp = await raw_request(p.data_port, request("GET", path))
    finally:
        up.server.close()
    assert resp.status == 200
    got = [v for k, v in resp.headers if k.lower() == "set-cookie"]
    assert got == [*SAFE_SET_COOKIES, own]  # the sender's own cookie still passes


# -- forwarding and override headers -----------------------------------------------------------

OVERRIDES = {
    "Forwarded": "for=10.9.9.9;host=pay.shop.example",
    "X-Real-IP": "10.9.9.9",
    "True-Client-IP": "10.9.9.9",
    "X-Original-URL": "/api/payment/charge",
    "X-Rewrite-URL": "/api/payment/charge",
    "X-HTTP-Method-Override": "DELETE",
    "X-HTTP-Method": "DELETE",
    "X-Method-Override": "DELETE",
    "X-Forwarded-Prefix": "/api/payment",
    "X-Forwarded-Port": "8443",
    "X-Forwarded-Ssl": "on",
    "X-Forwarded-Scheme": "https",
    "X-Forwarded-Server": "pay.shop.example",
}


@pytest.mark.parametrize(
    ("hops", "passed", "xff"),
    [
        (0, [], "127.0.0.1"),
        (1, ["X-Real-IP"], "10.0.0.2, 127.0.0.1"),
        (2, [], "10.0.0.1, 10.0.0.2, 127.0.0.1"),
    ],
)
async def test_forwarding_and_override_headers_are_the_proxys_own(
    harness: Harness, hops: int, passed: list[str], xff: str
) -> None:
    """Issue #18: a client's X-Forwarded-For was trusted; Forwarded, X-Real-IP,
    True-Client-IP and the URL / method overrides passed unchanged."""
    forwarding = {"xff_num_trusted_hops": hops, "pass_headers": passed}
    p = await start(harness, boundary={**BOUNDARY, "forwarding": forwarding})
    sent = [("X-Forwarded-For", "6.6.6.6, 10.0.0.1"), ("X-Forwarded-For", "10.0.0.2")]
    sent += list(OVERRIDES.items())
    resp = await raw_request(p.data_port, request("GET", "/feed", *sent))
    assert resp.status == 200
    (got,) = received(harness.backends["social"])
    assert got["x-forwarded-for"] == xff
    left = {name for name in OVERRIDES if name.lower() in got}
    assert left == set(passed)
    assert got[":path"] == "/feed"


async def test_pass_headers_names_only_forwarding_headers(harness: Harness) -> None:
    with pytest.raises(cfg.ConfigError, match=r"\$\.boundary\.forwarding\.pass_headers\[0\]"):
        await start(harness, boundary={"forwarding": {"pass_headers": ["authorization"]}})


# -- paths as other stacks route them -----------------------------------------------------------

PATH_READINGS = [
    "/ap%C4%B1/payment/charge",  # dotless i: Java's equalsIgnoreCase reads "api"
    "/AP%C4%B0/PAYMENT",  # dotted I: lower-cases to "i" in Java
    "/ap%C4%B1/cart",
    "/AP%C4%B0/orders/7",
    "/api/orders/+1",  # Long.parseLong("+1") == 1
    "/api/orders/-01abc%20",  # parseInt: -1, routed to the orders handler all the same
    "/api/orders/7abc",  # parseInt / (int): 7
    "/api/orders/" + "1" * 5000 + "x",  # longer than int() reads: never an exception
    "/api/orders/%D9%A1",  # Arabic-Indic one
    "/api/orders/%DB%B1",  # extended Arabic-Indic one
    "/api/orders/%E0%A5%A7",  # Devanagari one
    "/api/orders/%EF%BC%91",  # fullwidth one
    "/api/orders/1.json",  # format suffix
    "/api/orders/1.xml",
    "/api/orders/1/items",  # trailing segment
    "/api/cart.json",
    "/API/CART.JSON",
    "/api/cart/x",
    "/api/cart/",
]


async def test_no_reading_of_a_transaction_path_reaches_social(harness: Harness) -> None:
    """Issue #18: each of these went to the social catch-all, and a Java, PHP or Go back end
    read it as a payment, an order or the cart. Now 400 ``transaction-variant``, audited."""
    p = await start(harness)
    for target in PATH_READINGS:
        resp = await raw_request(p.data_port, request("POST", target, body=b"{}"))
        assert resp.status == 400, (target, resp.status, resp.body)
        assert orjson.loads(resp.body)["reason"] == "transaction-variant", target
    assert not harness.backends["social"].received
    await p.stop(drain_delay=0)
    records = audited(harness.tmp / "audit.log")
    assert len(records) == len(PATH_READINGS)
    assert {r["decision"] for r in records} == {"blocked"}


async def test_a_clients_x_forwarded_host_never_passes(harness: Harness) -> None:
    """Without a Host (HTTP/1.0) the client's X-Forwarded-Host was forwarded as is."""
    p = await start(harness)
    data = b"GET /feed HTTP/1.0\r\nX-Forwarded-Host: pay.shop.example\r\n\r\n"
    assert (await raw_request(p.data_port, data)).status == 200
    (got,) = received(harness.backends["social"])
    assert "x-forwarded-host" not in got
