"""W3C Trace Context on real sockets, OpenTelemetry spans received by an in-test OTLP/HTTP
receiver, trace context stripped across systems, and the core without the SDK."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.tracing import parse_traceparent

from .conftest import (
    SYSTEMS,
    Harness,
    RawUpstream,
    cluster,
    raw_upstream,
    read_request,
    start_proxy,
    until,
)
from .test_resilience import Reader, Writer, sample

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
INCOMING = f"00-{TRACE}-{PARENT}-01"
SHAPE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})").fullmatch


@pytest.mark.parametrize(
    ("values", "parsed"),
    [
        ([INCOMING], (TRACE, PARENT, 1)),
        ([f"00-{TRACE}-{PARENT}-00"], (TRACE, PARENT, 0)),
        # a later version may add fields; its first four are read
        ([f"01-{TRACE}-{PARENT}-01-extra"], (TRACE, PARENT, 1)),
        ([f"00-{TRACE}-{PARENT}-01-extra"], None),  # version 00 has exactly four
        ([f"ff-{TRACE}-{PARENT}-01"], None),  # version ff is invalid
        ([f"00-{'0' * 32}-{PARENT}-01"], None),  # all-zero trace id
        ([f"00-{TRACE}-{'0' * 16}-01"], None),  # all-zero parent id
        ([f"00-{TRACE.upper()}-{PARENT}-01"], None),  # lower-case hex only
        ([f"00-{TRACE}-{PARENT}-1"], None),
        ([INCOMING, INCOMING], None),  # two lines: which one?
        (["garbage"], None),
        ([], None),
    ],
)
def test_traceparent_parsing(values: list[str], parsed: tuple[str, str, int] | None) -> None:
    assert parse_traceparent(values) == parsed


async def fail_once_then_ok(up: RawUpstream, reader: Reader, writer: Writer) -> None:
    """The first request is answered 503, every later one 200; each request's head kept."""
    while True:
        _line, headers, _body = await read_request(reader)
        up.requests.append(json.dumps(headers).encode())
        if len(up.requests) == 1:
            writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()


def _seen(up: RawUpstream) -> list[dict[str, str]]:
    return [json.loads(r) for r in up.requests]


def _config(url: str, **tracing: Any) -> dict[str, Any]:
    retry = {"attempts": 2, "retry_on": [503]}
    return {
        "clusters": {"pay": cluster("tokopedia", url, retry=retry)},
        "routes": [{"name": "pay", "match": {}, "category": "payment", "to": "pay"}],
        "tracing": tracing,
    }


async def _get(port: int, headers: dict[str, str] | None = None) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{port}/pay", headers=headers or {}) as r,
    ):
        await r.read()
        return r.status


async def test_a_valid_traceparent_is_continued_with_a_span_per_try(harness: Harness) -> None:
    up = await raw_upstream(fail_once_then_ok)
    p = await harness.proxy(_config(up.url))
    assert await _get(p.data_port, {"traceparent": INCOMING}) == 200
    tries = [SHAPE(h["traceparent"]) for h in _seen(up)]
    assert len(tries) == 2
    assert all(m is not None for m in tries)
    ids = [m.groups() for m in tries if m is not None]
    assert {trace for trace, _span, _flags in ids} == {TRACE}
    assert {flags for _trace, _span, flags in ids} == {"01"}
    spans = [span for _trace, span, _flags in ids]
    assert len(set(spans)) == 2
    assert PARENT not in spans
    trail = harness.tmp / "audit.log"
    await until(lambda: f'"trace_id":"{TRACE}"' in trail.read_text().replace(" ", ""))


async def test_the_trace_id_is_in_the_access_log(harness: Harness) -> None:
    up = await raw_upstream(fail_once_then_ok)
    up.requests.append(b"{}")
    log = harness.tmp / "access.log"
    p = await harness.proxy({**_config(up.url), "access_log": {"path": str(log)}})
    assert await _get(p.data_port, {"traceparent": INCOMING}) == 200
    assert await _get(p.data_port) == 200
    await until(lambda: log.exists() and len(log.read_text().splitlines()) == 2)
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    assert first["trace_id"] == TRACE
    assert re.fullmatch(r"[0-9a-f]{32}", second["trace_id"])
    assert second["trace_id"] != TRACE


@pytest.mark.parametrize(
    "incoming",
    [None, f"00-{'0' * 32}-{PARENT}-01", "00-garbage", f"ff-{TRACE}-{PARENT}-01"],
)
async def test_a_missing_or_invalid_traceparent_starts_a_trace(
    harness: Harness, incoming: str | None
) -> None:
    up = await raw_upstream(fail_once_then_ok)
    up.requests.append(b"{}")  # no 503 first: one try
    p = await harness.proxy(_config(up.url, sample=0.0))
    await _get(p.data_port, {"traceparent": incoming} if incoming else None)
    m = SHAPE(_seen(up)[-1]["traceparent"])
    assert m is not None
    trace, span, flags = m.groups()
    assert trace not in (TRACE, "0" * 32)
    assert span != "0" * 16
    assert flags == "00"  # sample 0: a new trace is not sampled


async def test_tracing_off_passes_traceparent_untouched(harness: Harness) -> None:
    up = await raw_upstream(fail_once_then_ok)
    up.requests.append(b"{}")
    p = await harness.proxy(_config(up.url, enabled=False))
    await _get(p.data_port, {"traceparent": INCOMING})
    assert _seen(up)[-1]["traceparent"] == INCOMING


async def test_baggage_and_tracestate_stripped_across_systems(harness: Harness) -> None:
    """Only tokopedia is listed for baggage; nobody for tracestate: the social system gets
    neither (its user id in the client's baggage stays out), counted as stripped headers."""
    shop = await harness.backend("shop", "tokopedia")
    feed = await harness.backend("feed", "tiktok")
    p = await harness.proxy(
        {
            "clusters": {
                "shop": cluster("tokopedia", shop.url),
                "feed": cluster("tiktok", feed.url),
            },
            "routes": [
                {"name": "pay", "match": {"prefix": "/pay"}, "category": "payment", "to": "shop"},
                {
                    "name": "feed",
                    "match": {"prefix": "/feed"},
                    "category": "promotion",
                    "to": "feed",
                },
            ],
            "tracing": {"propagate": {"tokopedia": ["baggage"]}},
        }
    )
    sent = {
        "traceparent": INCOMING,
        "baggage": "tt_user=123,tier=gold",
        "tracestate": "tiktok=abc",
    }
    async with aiohttp.ClientSession() as s:
        for path in ("/pay/x", "/feed/x"):
            async with s.get(f"http://127.0.0.1:{p.data_port}{path}", headers=sent) as r:
                assert r.status == 200
    got_shop = {k.lower(): v for k, v in shop.received[-1].headers}
    got_feed = {k.lower(): v for k, v in feed.received[-1].headers}
    assert got_shop["baggage"] == "tt_user=123,tier=gold"
    assert "tracestate" not in got_shop
    assert "baggage" not in got_feed
    assert "tracestate" not in got_feed
    assert got_feed["traceparent"].startswith(f"00-{TRACE}-")
    assert sample(p, "jalur_boundary_stripped_total", system="tiktok", kind="headers") == 2
    assert sample(p, "jalur_boundary_stripped_total", system="tokopedia", kind="headers") == 1


# -- OpenTelemetry export ---------------------------------------------------------------


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint on loopback that decodes each protobuf export."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.resources: list[dict[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        async def export(request: web.Request) -> web.Response:
            assert request.content_type == "application/x-protobuf"
            message = ExportTraceServiceRequest()
            message.ParseFromString(await request.read())
            for rs in message.resource_spans:
                attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.resources.append(attrs)
                        self.spans.append(span)
            return web.Response(
                body=ExportTraceServiceResponse().SerializeToString(),
                content_type="application/x-protobuf",
            )

        app = web.Application()
        app.router.add_post("/v1/traces", export)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"


@pytest.fixture
async def otlp() -> Any:
    pytest.importorskip("opentelemetry.proto", reason="the tracing extra is not installed")
    receiver = OtlpReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        assert receiver.runner is not None
        await receiver.runner.cleanup()


async def test_a_span_tree_reaches_an_otlp_receiver(harness: Harness, otlp: OtlpReceiver) -> None:
    """One SERVER span (child of the client's traceparent) and one CLIENT span per try
    (children of it), whose ids are the ones the upstream saw; exported over OTLP/HTTP."""
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    up = await raw_upstream(fail_once_then_ok)
    p = await harness.proxy(_config(up.url, otlp_endpoint=otlp.url, service_name="jalur-test"))
    assert await _get(p.data_port, {"traceparent": INCOMING}) == 200
    await until(lambda: len(otlp.spans) >= 3, within=15)
    assert len(otlp.spans) == 3
    server = [s for s in otlp.spans if s.kind == Span.SPAN_KIND_SERVER]
    client = [s for s in otlp.spans if s.kind == Span.SPAN_KIND_CLIENT]
    assert len(server) == 1
    assert len(client) == 2
    root = server[0]
    assert root.trace_id.hex() == TRACE
    assert root.parent_span_id.hex() == PARENT
    assert root.name == "GET pay"
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["http.response.status_code"].int_value == 200
    assert attrs["http.route"].string_value == "pay"
    for span in client:
        assert span.trace_id.hex() == TRACE
        assert span.parent_span_id == root.span_id
    seen = sorted(h["traceparent"].split("-")[2] for h in _seen(up))
    assert sorted(s.span_id.hex() for s in client) == seen
    statuses = sorted(
        {a.key: a.value for a in s.attributes}["http.response.status_code"].int_value
        for s in client
    )
    assert statuses == [200, 503]
    assert {r["service.name"] for r in otlp.resources} == {"jalur-test"}


async def test_an_unsampled_parent_exports_nothing(harness: Harness, otlp: OtlpReceiver) -> None:
    up = await raw_upstream(fail_once_then_ok)
    up.requests.append(b"{}")
    p = await harness.proxy(_config(up.url, otlp_endpoint=otlp.url))
    assert await _get(p.data_port, {"traceparent": f"00-{TRACE}-{PARENT}-00"}) == 200
    assert await _get(p.data_port, {"traceparent": INCOMING}) == 200
    await until(lambda: len(otlp.spans) >= 2, within=15)
    assert {s.trace_id.hex() for s in otlp.spans} == {TRACE}
    assert len(otlp.spans) == 2  # the sampled request's server and client span only
    assert _seen(up)[1]["traceparent"].endswith("-00")  # the decision is passed on


# -- the core without the SDK -------------------------------------------------------------

# Run before anything else in a subprocess: `import opentelemetry` fails as if not installed.
BLOCK_SDK = "import sys\nsys.modules['opentelemetry'] = None\n"


def _blocked_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "no-otel"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK_SDK)
    return {"PYTHONPATH": str(site)}


def test_check_without_the_sdk_refuses_an_otlp_endpoint(tmp_path: Path) -> None:
    conf = {
        "systems": SYSTEMS,
        "clusters": {"pay": cluster("tokopedia", "http://127.0.0.1:9")},
        "routes": [{"name": "pay", "match": {}, "category": "payment", "to": "pay"}],
    }
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(conf))
    exported = tmp_path / "exported.yaml"
    exported.write_text(
        yaml.safe_dump({**conf, "tracing": {"otlp_endpoint": "http://127.0.0.1:4318/v1/traces"}})
    )
    env = {**_blocked_env(tmp_path), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "proxy", "check"]
    ok = subprocess.run([*cmd, str(plain)], env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(
        [*cmd, str(exported)], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0
    assert "$.tracing.otlp_endpoint" in refused.stderr + refused.stdout
    assert "jalur[tracing]" in refused.stderr + refused.stdout


async def test_the_core_traces_without_the_sdk(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`jalur run` where opentelemetry cannot be imported: traceparent still continued."""
    monkeypatch.setenv("PYTHONPATH", _blocked_env(tmp_path)["PYTHONPATH"])
    up = await raw_upstream(fail_once_then_ok)
    up.requests.append(b"{}")
    proc, data, _admin = await start_proxy(tmp_path, _config(up.url))
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{data}/pay", headers={"traceparent": INCOMING}) as r,
        ):
            assert r.status == 200
        assert _seen(up)[-1]["traceparent"].startswith(f"00-{TRACE}-")
    finally:
        proc.terminate()
        async with asyncio.timeout(15):
            await proc.wait()
