"""Hostile upstream responses, end to end through the proxy (H1Transport underneath).

A ``WireUpstream`` answers the first request on its first connection with the bytes of the
case and keeps that connection open; every later request gets a plain ``200 ok``. For each
case the client must get a 502 JSON ``{"error", "request_id"}`` (or, when the response head
was already relayed, a cut connection, never a clean short answer), the error must be
counted in ``jalur_upstream_errors_total{cluster,kind}``, and the next request must be
served on a *new* upstream connection: the hostile one is discarded, never reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import pytest

from proxy.server import ProxyServer

from .conftest import Harness
from .wire import OK, Answer, WireUpstream, converse, wire_upstream

GET = b"GET /x HTTP/1.1\r\nHost: shop\r\n\r\n"
GET_AND_CLOSE = b"GET /next HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n"
SMUGGLE = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsmuggle"


@dataclass(frozen=True)
class Case:
    name: str
    response: bytes
    kind: str = "protocol"  # jalur_upstream_errors_total kind
    outcome: str = "502"  # "502", or "cut": head relayed, then the connection aborted
    close_after: bool = False  # the upstream closes after writing the response


def head(*lines: bytes, status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(x + b"\r\n" for x in lines) + b"\r\n"


CASES: list[Case] = [
    Case("bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"),
    Case("bare-lf-one-header", b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 2\r\n\r\nok"),
    Case("obs-fold", head(b"X-A: a", b" b", b"Content-Length: 2") + b"ok"),
    Case("content-length-differing", head(b"Content-Length: 2", b"Content-Length: 3") + b"ok!"),
    Case("content-length-equal-twice", head(b"Content-Length: 2", b"Content-Length: 2") + b"ok"),
    Case("content-length-not-a-number", head(b"Content-Length: 2x") + b"ok"),
    Case("content-length-negative", head(b"Content-Length: -2") + b"ok"),
    Case(
        "content-length-and-chunked",
        head(b"Content-Length: 2", b"Transfer-Encoding: chunked") + b"2\r\nok\r\n0\r\n\r\n",
    ),
    Case("nul-in-header-value", head(b"X-A: a\x00b", b"Content-Length: 2") + b"ok"),
    Case("cr-in-header-value", head(b"X-A: a\rb", b"Content-Length: 2") + b"ok"),
    Case("space-before-colon", head(b"Content-Length : 2") + b"ok"),
    Case("status-999", head(b"Content-Length: 2", status=b"999 Weird") + b"ok"),
    Case("status-099", head(b"Content-Length: 2", status=b"099 Low") + b"ok"),
    Case("status-line-garbage", b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok"),
    Case("status-line-not-http", b"SMTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    Case("status-line-no-code", b"HTTP/1.1\r\nContent-Length: 2\r\n\r\nok"),
    Case("unsolicited-101", head(b"Upgrade: websocket", b"Connection: Upgrade", status=b"101 X")),
    Case("too-many-headers", head(*(b"X-%d: v" % i for i in range(200)), b"Content-Length: 0")),
    Case("header-over-field-limit", head(b"X-A: " + b"a" * 9000, b"Content-Length: 0")),
    Case(
        "head-over-max-head",  # 80 KiB of fields, each under the field limit
        head(*(b"X-%d: %s" % (i, b"h" * 1000) for i in range(80)), b"Content-Length: 0"),
    ),
    Case(
        "truncated-content-length-body",
        head(b"Content-Length: 100") + b"only this",
        kind="reset",
        outcome="cut",
        close_after=True,
    ),
    Case(
        "bad-chunk-size",
        head(b"Transfer-Encoding: chunked") + b"2\r\nok\r\nzz\r\nxx\r\n0\r\n\r\n",
        outcome="cut",
    ),
    Case(
        "chunk-without-crlf",
        head(b"Transfer-Encoding: chunked") + b"2\r\nokXX0\r\n\r\n",
        outcome="cut",
    ),
    Case(
        "chunk-size-overflow",
        head(b"Transfer-Encoding: chunked") + b"2\r\nok\r\n" + b"f" * 20 + b"\r\nx\r\n",
        outcome="cut",
    ),
    Case(
        "truncated-chunked-body",
        head(b"Transfer-Encoding: chunked") + b"2\r\nok\r\n10\r\nshort",
        kind="reset",
        outcome="cut",
        close_after=True,
    ),
]


def upstream_errors(p: ProxyServer, kind: str) -> float:
    value = p.services.metrics.registry.get_sample_value(
        "jalur_upstream_errors_total", {"cluster": "hostile", "kind": kind}
    )
    return 0.0 if value is None else value


async def hostile_proxy(
    h: Harness, first: bytes, close_after: bool = False
) -> tuple[ProxyServer, WireUpstream]:
    def answer(up: WireUpstream, index: int) -> Answer:
        return Answer(first, close_after) if index == 0 else Answer(OK)

    up = await wire_upstream(answer)
    p = await h.proxy(
        {
            "clusters": {
                "hostile": {
                    "system": "tokopedia",
                    "endpoints": [up.url],
                    "retry": {"attempts": 1},
                    "timeouts": {"response_headers": 1, "idle": 1},
                }
            },
            "routes": [{"name": "all", "match": {}, "category": "promotion", "to": "hostile"}],
        }
    )
    return p, up


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_hostile_response(harness: Harness, case: Case) -> None:
    p, up = await hostile_proxy(harness, case.response, case.close_after)
    # A 502 keeps the client connection; a cut one is read until the proxy closes it.
    first = await converse(p.data_port, GET, linger=3 if case.outcome == "cut" else 0)
    if case.outcome == "502":
        assert first.statuses == [502], first.raw[:300]
        answer = first.responses[0]
        body = orjson.loads(answer.body)
        assert body["error"]
        assert body["request_id"] == answer.header("x-request-id")
        assert body["kind"] == body["reason"] == case.kind
        # The kind of failure, never the internal address or the parser's detail.
        assert f":{up.port}".encode() not in answer.body
        assert b"127.0.0.1" not in answer.body
    else:
        # The head went out before the body failed: the client connection is cut, so
        # no complete response is ever parsed from it.
        assert first.raw.startswith(b"HTTP/1.1 200 "), first.raw[:300]
        assert first.statuses == []
        assert first.closed
    assert upstream_errors(p, case.kind) == 1
    # The proxy still serves, on a fresh upstream connection.
    second = await converse(p.data_port, GET_AND_CLOSE)
    assert second.statuses == [200]
    assert second.responses[0].body == b"ok"
    assert up.connections == 2
    await up.until(lambda u: u.closed >= 1)  # the hostile connection was dropped
    up.close()


async def test_a_204_with_a_body_never_answers_the_next_request(harness: Harness) -> None:
    """The bytes after a 204 look like a response; on a reused connection they would be
    taken as the answer to the next request. They are not: the connection is dropped."""
    p, up = await hostile_proxy(harness, head(status=b"204 No Content") + SMUGGLE)
    first = await converse(p.data_port, GET)
    assert first.statuses == [204]
    assert first.responses[0].body == b""
    second = await converse(p.data_port, GET_AND_CLOSE)
    assert second.statuses == [200]
    assert second.responses[0].body == b"ok"
    assert up.connections == 2
    assert up.targets() == ["/x", "/next"]
    up.close()


async def test_a_204_with_content_length_and_a_body(harness: Harness) -> None:
    p, up = await hostile_proxy(
        harness, head(b"Content-Length: 7", status=b"204 No Content") + b"smuggle"
    )
    first = await converse(p.data_port, GET)
    assert first.statuses == [204]
    assert first.responses[0].body == b""
    second = await converse(p.data_port, GET_AND_CLOSE)
    assert second.responses[0].body == b"ok"
    assert up.connections == 2
    up.close()
