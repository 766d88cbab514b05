"""Per-route traffic policy on real sockets: a whole-request deadline across retries, a
route's ``retry`` block overriding its cluster's, and the check that refuses a deadline the
tries cannot fit in."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from proxy import config as cfg

from .conftest import (
    Harness,
    RawUpstream,
    build_config,
    cluster,
    raw_upstream,
    read_request,
    until,
)
from .test_resilience import Reader, Writer, accept_and_hang, answer_ok, sample


def _routes(to: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": "pay", "match": {"prefix": "/pay"}, "category": "payment", "to": to, **extra}]


async def answer_503(up: RawUpstream, reader: Reader, writer: Writer) -> None:
    while True:
        line, _headers, _body = await read_request(reader)
        up.requests.append(line.encode())
        writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
        await writer.drain()


async def test_deadline_cuts_across_two_retries(harness: Harness) -> None:
    """Three tries of 0.4 s fit a 1.2 s route timeout on paper; the backoffs between them do
    not: the deadline ends the third try, 504 route_timeout, counted, audited."""
    hang = await raw_upstream(accept_and_hang)
    retry = {
        "attempts": 3,
        "per_try_timeout": 0.4,
        "retry_on": ["timeout"],
        "backoff": {"base": 0.1, "max": 0.1},
    }
    p = await harness.proxy(
        {
            "clusters": {"pay": cluster("tokopedia", hang.url, retry=retry)},
            "routes": _routes("pay", timeout=1.2),
        }
    )
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{p.data_port}/pay/x") as r,
    ):
        body = await r.json()
        status = r.status
    elapsed = time.monotonic() - started
    assert status == 504
    assert body["reason"] == "route_timeout"
    assert body["request_id"] == r.headers["x-request-id"]
    assert "127.0.0.1" not in body["error"]
    assert len(hang.requests) == 3  # the first try and two retries
    assert 1.2 <= elapsed < 2.0
    assert sample(p, "jalur_upstream_errors_total", cluster="pay", kind="route_timeout") == 1
    assert sample(p, "jalur_retries_total", route="pay") == 2
    trail = harness.tmp / "audit.log"
    await until(lambda: '"status":504' in trail.read_text().replace(" ", ""))


async def test_route_retry_overrides_the_clusters(harness: Harness) -> None:
    """The cluster retries nothing; the route's own retry block sends a 503 again twice.
    Another route on the same cluster keeps the cluster's policy."""
    busy = await raw_upstream(answer_503)
    p = await harness.proxy(
        {
            "clusters": {"pay": cluster("tokopedia", busy.url, retry={"attempts": 1})},
            "routes": [
                *_routes("pay", retry={"attempts": 3, "retry_on": [503]}),
                {"name": "rest", "match": {}, "category": "payment", "to": "pay"},
            ],
        }
    )
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{p.data_port}/pay/x") as r:
            assert r.status == 503
        assert len(busy.requests) == 3
        async with s.get(f"http://127.0.0.1:{p.data_port}/other") as r:
            assert r.status == 503
        assert len(busy.requests) == 4
    assert sample(p, "jalur_retries_total", route="pay") == 2
    assert sample(p, "jalur_retries_total", route="rest") == 0


async def test_an_answer_within_the_deadline_is_relayed(harness: Harness) -> None:
    ok = await raw_upstream(answer_ok)
    p = await harness.proxy(
        {
            "clusters": {"pay": cluster("tokopedia", ok.url, retry={"per_try_timeout": 0.5})},
            "routes": _routes("pay", timeout=1.0),
        }
    )
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{p.data_port}/pay/x") as r,
    ):
        assert r.status == 200
        assert await r.read() == b"ok"


@pytest.mark.parametrize(
    ("route", "cluster_retry", "path"),
    [
        # 3 tries of 0.4 s cannot fit in 1 s
        ({"timeout": 1.0, "retry": {"attempts": 3, "per_try_timeout": 0.4}}, {}, "timeout"),
        # the cluster's retry counts when the route has none
        ({"timeout": 1.0}, {"attempts": 3, "per_try_timeout": 0.4}, "timeout"),
        # no per-try timeout: each try may wait response_headers (15 s)
        ({"timeout": 5.0}, {}, "timeout"),
    ],
)
def test_check_refuses_a_deadline_the_tries_cannot_fit(
    route: dict[str, Any], cluster_retry: dict[str, Any], path: str
) -> None:
    with pytest.raises(cfg.ConfigError) as caught:
        build_config(
            {
                "clusters": {
                    "pay": cluster("tokopedia", "http://127.0.0.1:9", retry=cluster_retry)
                },
                "routes": _routes("pay", **route),
            }
        )
    assert f"$.routes[0].{path}" in str(caught.value)
    assert "tries of" in str(caught.value)


def test_check_accepts_a_deadline_the_tries_fit_in() -> None:
    conf = build_config(
        {
            "clusters": {"pay": cluster("tokopedia", "http://127.0.0.1:9")},
            "routes": _routes("pay", timeout=1.2, retry={"attempts": 3, "per_try_timeout": 0.4}),
        }
    )
    assert conf.routes[0].timeout == 1.2
