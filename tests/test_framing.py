"""Framing and smuggling catalogue: one table of named raw requests, one test over it.

Every case is written to the proxy in one ``write`` on a fresh connection, with a smuggled
payment request (``SMUGGLED``) placed where a parser that read the framing differently
would execute it: after the message for a rejected case, inside the body for an accepted
one. Two ``WireUpstream``s (social ``feed``, commerce ``pay``) record every byte they get.

A rejected case must get exactly its status as a JSON ``{"error", "request_id"}`` answer,
the connection closed after it, zero bytes (and zero connections) at either upstream, and
``jalur_requests_rejected_total{reason}`` counted once. An accepted case must reach its
upstream as exactly one request with the body the proxy framed (never the smuggled one as
a request), plus any header check the case names.

Decisions (Envoy/NGINX where the RFC leaves room): duplicate Content-Length is refused
even when equal; a Transfer-Encoding other than exactly ``chunked`` is 501; a 400 closes
the connection; a chunked request or an Upgrade the proxy does not perform closes the
connection after its answer (aiohttp's C parser leaks the last trailer field into the next
request's headers, and drops bytes pipelined behind an upgrade). ``Connection`` may name
any field (RFC 9110 §7.6.1: it is then dropped, which can only remove data), except
``Host`` and ``Idempotency-Key``, and never the headers the proxy sets itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from proxy.server import ProxyServer

from .conftest import Harness
from .wire import Message, WireUpstream, converse, wire_upstream

SMUGGLED = b"GET /api/payment/smuggled HTTP/1.1\r\nHost: shop\r\n\r\n"
PAY_LIMIT = 1024  # routes[pay].max_body_bytes
N = b"%d" % len(SMUGGLED)


def request(
    head: bytes,
    body: bytes = b"",
    *,
    method: bytes = b"POST",
    target: bytes = b"/api/feed/x",
    version: bytes = b"HTTP/1.1",
    host: bytes = b"Host: shop\r\n",
) -> bytes:
    """A request with ``head`` as its extra header lines (each ending in CRLF)."""
    return method + b" " + target + b" " + version + b"\r\n" + host + head + b"\r\n" + body


def chunked(*extra: bytes, body: bytes = SMUGGLED, trailer: bytes = b"") -> bytes:
    """``Transfer-Encoding`` header lines ``extra`` and ``body`` as one chunk."""
    framed = b"%x\r\n%s\r\n0\r\n%s\r\n" % (len(body), body, trailer)
    return request(b"".join(extra), framed)


def sized(*extra: bytes, length: bytes | None = None, body: bytes = SMUGGLED) -> bytes:
    value = length if length is not None else str(len(body)).encode()
    return request(b"Content-Length: " + value + b"\r\n" + b"".join(extra), body)


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    status: int
    reason: str = "malformed"  # jalur_requests_rejected_total label (rejected cases)
    upstream: str | None = None  # accepted: the upstream that gets exactly one request
    target: str = "/api/feed/x"
    body: bytes = SMUGGLED  # accepted: the body it must get
    check: Callable[[Message], None] | None = None
    # Accepted: the connection stays open for the next request: nothing is pipelined behind
    # ``data`` (it would rightly be executed); a second request is sent once the first is
    # answered, and must be answered too.
    keep_alive: bool = False

    @property
    def accepted(self) -> bool:
        return self.upstream is not None

    @property
    def then(self) -> bytes:
        """Written right after ``data``, in the same write."""
        return b"" if self.keep_alive else SMUGGLED


def absent(*names: str) -> Callable[[Message], None]:
    def check(m: Message) -> None:
        for name in names:
            assert m.header(name) == [], f"{name} reached the upstream"

    return check


def proxy_headers_intact(m: Message) -> None:
    """Naming them in Connection does not remove what the proxy sets: it reads the
    client's values as usual and appends its own (of X-Forwarded-For, with no trusted hop
    configured, only the peer address)."""
    assert m.header("X-Forwarded-For") == ["127.0.0.1"]
    assert m.header("Via") == ["1.0 evil, 1.1 jalur"]
    assert m.header("X-Forwarded-Host") == ["shop"]  # from Host, never the client's value
    assert len(m.header("X-Request-Id")) == 1


def two_connection_lines(m: Message) -> None:
    absent("X-Hop-A", "X-Hop-B", "Connection")(m)
    assert m.header("X-Kept") == ["3"]


def host_and_key_kept(m: Message) -> None:
    assert m.header("Host") == ["shop"]
    assert m.header("Idempotency-Key") == ["k-2"]


CL = b"Content-Length: "
TE = b"Transfer-Encoding: "
NUL, VT = b"\x00", b"\x0b"

CASES: list[Case] = [
    # -- Content-Length -------------------------------------------------------------------
    Case("cl-and-te", request(CL + b"4\r\n" + TE + b"chunked\r\n", b"0\r\n\r\n"), 400),
    Case("cl-duplicate-equal", sized(CL + N + b"\r\n"), 400),
    Case("cl-duplicate-differing", sized(CL + b"5\r\n"), 400),
    Case("cl-list", sized(length=N + b", " + N), 400),
    Case("cl-plus", sized(length=b"+" + N), 400),
    Case("cl-hex", sized(length=b"0x%x" % len(SMUGGLED)), 400),
    Case("cl-empty", sized(length=b""), 400),
    Case("cl-negative", sized(length=b"-1"), 400),
    Case("cl-inner-space", sized(length=N[:1] + b" " + N[1:]), 400),
    Case("cl-overflow", sized(length=b"9" * 25), 400),
    Case("cl-space-before-colon", request(b"Content-Length : " + N + b"\r\n", SMUGGLED), 400),
    Case("cl-leading-zero", sized(length=b"00" + N), 200, upstream="feed", keep_alive=True),
    Case("cl-on-get", sized().replace(b"POST", b"GET", 1), 200, upstream="feed", keep_alive=True),
    # -- Transfer-Encoding ----------------------------------------------------------------
    Case("te-xchunked", chunked(TE + b"xchunked\r\n"), 400),
    Case("te-chunked-identity", chunked(TE + b"chunked, identity\r\n"), 400),
    Case("te-identity-chunked", chunked(TE + b"identity, chunked\r\n"), 501, "transfer_encoding"),
    Case("te-gzip", chunked(TE + b"gzip\r\n"), 400),
    Case("te-chunked-twice-in-list", chunked(TE + b"chunked, chunked\r\n"), 400),
    Case("te-trailing-comma", chunked(TE + b"chunked,\r\n"), 400),
    Case("te-space-before-colon", chunked(b"Transfer-Encoding : chunked\r\n"), 400),
    Case("te-vertical-tab", chunked(b"Transfer-Encoding:" + VT + b"chunked\r\n"), 400),
    Case("te-duplicate", chunked(TE + b"chunked\r\n" + TE + b"chunked\r\n"), 400),
    Case("te-duplicate-identity", chunked(TE + b"chunked\r\n" + TE + b"identity\r\n"), 400),
    Case(
        "te-on-http10",
        request(TE + b"chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n", version=b"HTTP/1.0"),
        400,
    ),
    Case(
        "te-and-cl-on-http10",
        request(TE + b"chunked\r\n" + CL + b"5\r\n", b"hello", version=b"HTTP/1.0"),
        400,
    ),
    Case("te-tab-before-value", chunked(b"Transfer-Encoding:\tchunked\r\n"), 200, upstream="feed"),
    Case("te-uppercase", chunked(TE + b"CHUNKED\r\n"), 200, upstream="feed"),
    Case("te-trailing-space", chunked(TE + b"chunked \r\n"), 200, upstream="feed"),
    # -- chunk sizes and extensions -------------------------------------------------------
    Case(
        "chunk-size-overflow", request(TE + b"chunked\r\n", b"1" + b"0" * 16 + b"1\r\nx\r\n"), 400
    ),
    Case("chunk-size-negative", request(TE + b"chunked\r\n", b"-1\r\nx\r\n0\r\n\r\n"), 400),
    Case("chunk-size-0x", request(TE + b"chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n"), 400),
    Case("chunk-size-space", request(TE + b"chunked\r\n", b"5 \r\nhello\r\n0\r\n\r\n"), 400),
    Case(
        "chunk-ext-nul", request(TE + b"chunked\r\n", b"5;" + NUL + b"\r\nhello\r\n0\r\n\r\n"), 400
    ),
    Case("chunk-ext-bare-lf", request(TE + b"chunked\r\n", b"5;a=b\nhello\r\n0\r\n\r\n"), 400),
    Case("chunk-without-crlf", request(TE + b"chunked\r\n", b"5\r\nhelloXX0\r\n\r\n"), 400),
    Case(
        "chunk-ext-valid",
        request(TE + b"chunked\r\n", b"%x;a=b\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)),
        200,
        upstream="feed",
    ),
    # -- trailers -------------------------------------------------------------------------
    Case("trailer-content-length", chunked(TE + b"chunked\r\n", trailer=CL + b"60\r\n"), 400),
    Case("trailer-host", chunked(TE + b"chunked\r\n", trailer=b"Host: evil\r\n"), 400),
    Case("trailer-te", chunked(TE + b"chunked\r\n", trailer=TE + b"chunked\r\n"), 400),
    Case(
        "trailer-identity-headers",
        chunked(
            TE + b"chunked\r\n",
            trailer=b"Authorization: Bearer t\r\nX-TT-User: 7\r\nIdempotency-Key: k\r\n",
        ),
        200,
        upstream="feed",
        check=absent("Authorization", "X-TT-User", "Idempotency-Key"),
    ),
    # -- header lines ---------------------------------------------------------------------
    Case("value-cr", request(b"X-A: a\rb\r\n"), 400),
    Case("value-lf", request(b"X-A: a\nX-B: b\r\n"), 400),
    Case("value-nul", request(b"X-A: a" + NUL + b"b\r\n"), 400),
    Case("name-space", request(b"X A: b\r\n"), 400),
    Case("obs-fold", request(b"X-A: a\r\n b\r\n"), 400),
    Case("bare-lf-everywhere", b"GET /api/feed/x HTTP/1.1\nHost: shop\n\n", 400),
    Case("bare-lf-one-header", request(b"X-A: b\n"), 400),
    Case("underscore-header", request(b"X_TT_User: 7\r\n"), 400, "underscore_header"),
    Case("header-over-limit", request(b"X-A: " + b"a" * 9000 + b"\r\n"), 400),
    Case("too-many-headers", request(b"".join(b"X-%d: v\r\n" % i for i in range(150))), 400),
    # -- Host -----------------------------------------------------------------------------
    Case("host-duplicate", request(b"", host=b"Host: shop\r\nHost: evil\r\n"), 400),
    Case("host-missing-http11", request(b"", host=b""), 400),
    Case(
        "absolute-form-other-host",
        request(b"", method=b"GET", target=b"http://evil/api/payment/x"),
        400,
        "authority-mismatch",
    ),
    # -- request line ---------------------------------------------------------------------
    Case("method-lowercase", request(b"", method=b"get"), 400),
    Case("method-with-space", request(b"", method=b"GE T"), 400),
    Case("method-garbage", request(b"", method=b"G\x01T"), 400),
    Case("target-with-space", request(b"", target=b"/api/feed/x y"), 400),
    Case("version-garbage", request(b"", version=b"HTTP/1.x"), 400),
    Case("request-line-over-limit", request(b"", target=b"/" + b"a" * 9000), 400),
    Case("http09", b"GET /api/feed/x\r\n", 400),
    Case("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    # -- Expect ---------------------------------------------------------------------------
    Case(
        "expect-100-over-route-limit",
        request(
            CL + b"%d\r\nExpect: 100-continue\r\n" % (PAY_LIMIT * 4), target=b"/api/payment/pay"
        ),
        413,
        "body_too_large",
    ),
    # -- Connection naming end-to-end fields ----------------------------------------------
    Case(
        "connection-authorization-to-social",
        sized(b"Connection: authorization\r\nAuthorization: Bearer t\r\n"),
        200,
        upstream="feed",
        check=absent("Authorization", "Connection"),
        keep_alive=True,
    ),
    Case(
        "connection-social-identity-to-commerce",
        sized(
            b"Connection: x-tt-user\r\nX-TT-User: 7\r\nIdempotency-Key: k-1\r\n",
        ).replace(b"/api/feed/x", b"/api/payment/x"),
        200,
        upstream="pay",
        target="/api/payment/x",
        check=absent("X-TT-User", "Connection"),
        keep_alive=True,
    ),
    Case(
        "connection-proxy-set-headers",
        sized(
            b"Connection: x-forwarded-for, via, x-request-id, x-forwarded-host\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\nVia: 1.0 evil\r\nX-Forwarded-Host: evil\r\n"
        ),
        200,
        upstream="feed",
        check=proxy_headers_intact,
        keep_alive=True,
    ),
    Case(
        "connection-host-and-idempotency-key",
        sized(b"Connection: host, idempotency-key\r\nIdempotency-Key: k-2\r\n").replace(
            b"/api/feed/x", b"/api/payment/x"
        ),
        200,
        upstream="pay",
        target="/api/payment/x",
        check=host_and_key_kept,
        keep_alive=True,
    ),
    Case(
        "connection-two-header-lines",
        sized(
            b"Connection: x-hop-a\r\nX-Hop-A: 1\r\nConnection: x-hop-b\r\nX-Hop-B: 2\r\n"
            b"X-Kept: 3\r\n"
        ),
        200,
        upstream="feed",
        check=two_connection_lines,
        keep_alive=True,
    ),
    # -- upgrades the proxy does not perform ----------------------------------------------
    Case(
        "upgrade-h2c",
        sized(
            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n"
        ),
        200,
        upstream="feed",
        check=absent("Upgrade", "HTTP2-Settings", "Connection"),
    ),
]


def _config(feed: WireUpstream, pay: WireUpstream) -> dict[str, Any]:
    return {
        "clusters": {
            "feed": {"system": "tiktok", "endpoints": [feed.url]},
            "pay": {"system": "tokopedia", "endpoints": [pay.url]},
        },
        "routes": [
            {
                "name": "pay",
                "match": {"prefix": "/api/payment"},
                "category": "payment",
                "to": "pay",
                "max_body_bytes": PAY_LIMIT,
            },
            {"name": "feed", "match": {"prefix": "/"}, "category": "promotion", "to": "feed"},
        ],
    }


def rejected(p: ProxyServer, reason: str) -> float:
    value = p.services.metrics.registry.get_sample_value(
        "jalur_requests_rejected_total", {"reason": reason}
    )
    return 0.0 if value is None else value


def test_the_catalogue_is_large_and_names_are_unique() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 30
    assert sum(not c.accepted for c in CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_framing_case(harness: Harness, case: Case) -> None:
    feed, pay = await wire_upstream(), await wire_upstream()
    try:
        p = await harness.proxy(_config(feed, pay))
        # A keep-alive case must still serve a second request on its connection once the
        # first is answered; any other case must be closed by the proxy (linger observes it).
        again = request(b"", method=b"GET", target=case.target.encode())
        if case.keep_alive:
            talk = await converse(p.data_port, case.data, responses=2, followup=again)
        else:
            talk = await converse(p.data_port, case.data + case.then, linger=3)
        ups = {"feed": feed, "pay": pay}
        smuggled = [m for u in ups.values() for m in u.messages if "smuggled" in m.target]
        assert smuggled == [], "the smuggled request was executed"
        expected = [case.status, 200] if case.keep_alive else [case.status]
        assert talk.statuses == expected, talk.raw[:300]
        answer = talk.responses[0]
        if not case.accepted:
            body = orjson.loads(answer.body)
            assert body["request_id"]
            assert body["error"]
            assert answer.header("x-request-id") in (None, body["request_id"])
            assert talk.closed, "the connection stayed open after a refusal"
            assert b"100 Continue" not in talk.raw
            for name, up in ups.items():
                assert up.connections == 0, f"a connection reached {name}"
                assert not up.received, f"bytes reached {name}"
            assert rejected(p, case.reason) == 1
            return
        assert talk.closed != case.keep_alive
        up = ups[case.upstream or ""]
        for name, other in ups.items():
            if other is not up:
                assert not other.received, f"bytes reached {name}"
        await up.until(lambda u: len(u.messages) >= len(expected))
        assert up.malformed == 0
        forwarded = [(case.target, case.body)] + [(case.target, b"")] * case.keep_alive
        assert [(m.target, m.body) for m in up.messages] == forwarded
        if case.check is not None:
            case.check(up.messages[0])
    finally:
        feed.close()
        pay.close()
