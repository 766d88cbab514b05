"""proxy.metrics: values per route, bounded labels, buckets, exposition, multiprocess mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy import admin
from proxy import config as cfg
from proxy.metrics import (
    DEFAULT_BUCKETS,
    NO_CLUSTER,
    OPENMETRICS_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    Bound,
    Metrics,
    exposition,
    mark_process_dead,
    multiprocess_registry,
    wants_openmetrics,
)
from proxy.router import Router

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
systems:
  tiktok: {kind: social}
  tokopedia: {kind: commerce}
clusters:
  feed: {system: tiktok, endpoints: ["http://127.0.0.1:9001"]}
  pay-a: {system: tokopedia, endpoints: ["http://127.0.0.1:9003", "http://127.0.0.1:9004/"]}
  pay-b: {system: tokopedia, endpoints: ["http://127.0.0.1:9005"]}
routes:
  - name: feed
    match: {prefix: /api/feed}
    category: promotion
    to: feed
  - name: payment
    match: {prefix: /api/payment}
    category: payment
    split:
      - {cluster: pay-a, weight: 70}
      - {cluster: pay-b, weight: 30}
"""

# What Prometheus 2.x sends when scraping.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def load(text: str = CONFIG) -> cfg.Config:
    return cfg.parse(text)


def bind(metrics: Metrics, config: cfg.Config) -> Bound:
    return metrics.bind(Router(config.routes), config)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_observe_counts_per_route(registry: CollectorRegistry, metrics: Metrics) -> None:
    bound = bind(metrics, load())
    feed, pay = bound.routes["feed"], bound.routes["payment"]
    for _ in range(3):
        feed.enter()
        feed.observe("feed", "GET", 200, 0.02, 0, 1000)
        feed.exit()
    feed.observe("feed", "GET", 404, 0.003, 0, 50)
    pay.observe("pay-a", "POST", 201, 0.3, 120, 40)
    pay.observe("pay-b", "POST", 502, 12.0, 120, 0)

    req = "jalur_requests_total"
    assert value(
        registry, req, route="feed", category="promotion", cluster="feed", method="GET", code="200"
    ) == pytest.approx(3)
    assert value(
        registry, req, route="feed", category="promotion", cluster="feed", method="GET", code="404"
    ) == pytest.approx(1)
    assert value(
        registry,
        req,
        route="payment",
        category="payment",
        cluster="pay-a",
        method="POST",
        code="201",
    ) == pytest.approx(1)
    assert value(
        registry,
        req,
        route="payment",
        category="payment",
        cluster="pay-b",
        method="POST",
        code="502",
    ) == pytest.approx(1)
    # Nothing leaks across routes.
    assert (
        value(
            registry,
            req,
            route="payment",
            category="payment",
            cluster="feed",
            method="GET",
            code="200",
        )
        is None
    )

    dur = "jalur_request_duration_seconds"
    assert value(registry, dur + "_count", route="feed", cluster="feed") == 4
    assert value(registry, dur + "_sum", route="feed", cluster="feed") == pytest.approx(0.063)
    assert value(registry, dur + "_bucket", route="feed", cluster="feed", le="0.005") == 1
    assert value(registry, dur + "_bucket", route="feed", cluster="feed", le="0.025") == 4
    assert value(registry, dur + "_bucket", route="payment", cluster="pay-b", le="10.0") == 0
    assert value(registry, dur + "_bucket", route="payment", cluster="pay-b", le="+Inf") == 1

    assert value(registry, "jalur_request_body_bytes_total", route="feed") == 0
    assert value(registry, "jalur_request_body_bytes_total", route="payment") == 240
    assert value(registry, "jalur_response_body_bytes_total", route="feed") == 3050
    assert value(registry, "jalur_response_body_bytes_total", route="payment") == 40
    assert value(registry, "jalur_requests_in_flight", route="feed") == 0


def test_children_are_bound_at_load(registry: CollectorRegistry, metrics: Metrics) -> None:
    bind(metrics, load())
    # Every route and cluster exports its series before the first request.
    assert value(registry, "jalur_requests_in_flight", route="payment") == 0
    for cluster in ("pay-a", "pay-b"):
        assert (
            value(
                registry, "jalur_request_duration_seconds_count", route="payment", cluster=cluster
            )
            == 0
        )
    assert value(registry, "jalur_upstream_response_seconds_count", cluster="feed") == 0
    assert value(registry, "jalur_circuit_open", cluster="pay-a") == 0
    # Endpoint labels are the URLs as upstream.Endpoint spells them (no trailing slash).
    assert (
        value(registry, "jalur_endpoint_healthy", cluster="pay-a", endpoint="http://127.0.0.1:9004")
        == 1
    )
    assert value(registry, "jalur_config_reloads_total", result="failure") == 0
    assert value(registry, "jalur_build_info", version=metrics.version) == 1


def test_in_flight_enter_exit(registry: CollectorRegistry, metrics: Metrics) -> None:
    rm = bind(metrics, load()).routes["payment"]
    rm.enter()
    rm.enter()
    assert value(registry, "jalur_requests_in_flight", route="payment") == 2
    rm.exit()
    assert value(registry, "jalur_requests_in_flight", route="payment") == 1
    rm.exit()
    assert value(registry, "jalur_requests_in_flight", route="payment") == 0


def test_methods_outside_the_standard_set_are_other(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    rm = bind(metrics, load()).routes["feed"]
    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"]
    for method in methods:
        rm.observe("feed", method, 200, 0.01, 0, 0)
    for i in range(50):
        rm.observe("feed", f"X{i}", 200, 0.01, 0, 0)
    rm.observe("feed", "get", 200, 0.01, 0, 0)  # methods are case-sensitive (RFC 9110)

    seen = {
        s.labels["method"]: s.value
        for family in registry.collect()
        if family.name == "jalur_requests"
        for s in family.samples
        if s.name == "jalur_requests_total"
    }
    assert seen == {**{m: 1.0 for m in methods}, "OTHER": 51.0}


def test_route_level_events(registry: CollectorRegistry, metrics: Metrics) -> None:
    bound = bind(metrics, load())
    pay = bound.routes["payment"]
    pay.retry()
    pay.retry()
    pay.blocked("social_after_deadline")
    pay.shadow("match")
    pay.shadow("mismatch")
    pay.shadow("mismatch")
    pay.observe(NO_CLUSTER, "POST", 503, 0.001, 0, 80)
    assert value(registry, "jalur_retries_total", route="payment") == 2
    assert (
        value(
            registry,
            "jalur_compliance_blocked_total",
            route="payment",
            reason="social_after_deadline",
        )
        == 1
    )
    assert value(registry, "jalur_shadow_total", route="payment", outcome="mismatch") == 2
    assert (
        value(
            registry,
            "jalur_requests_total",
            route="payment",
            category="payment",
            cluster="-",
            method="POST",
            code="503",
        )
        == 1
    )


def test_cluster_and_process_events(registry: CollectorRegistry, metrics: Metrics) -> None:
    bound = bind(metrics, load())
    pay = bound.clusters["pay-a"]
    pay.upstream_response(0.04)
    pay.error("timeout")
    pay.error("timeout")
    metrics.upstream_error("pay-a", "reset")
    pay.set_circuit_open(True)
    pay.set_endpoint_healthy("http://127.0.0.1:9003", False)
    metrics.rejected("no_route")
    metrics.rejected("encoded-slash")
    metrics.rejected("no_route")
    metrics.stripped("tokopedia", "cookie", 3)
    metrics.consent("granted")
    metrics.set_migration_progress({"payment": 0.87, "all": 0.7})
    metrics.config_reload(True, timestamp=1_700_000_000.0)
    metrics.config_reload(False)

    assert value(registry, "jalur_upstream_response_seconds_count", cluster="pay-a") == 1
    assert value(registry, "jalur_upstream_errors_total", cluster="pay-a", kind="timeout") == 2
    assert value(registry, "jalur_upstream_errors_total", cluster="pay-a", kind="reset") == 1
    assert value(registry, "jalur_circuit_open", cluster="pay-a") == 1
    assert (
        value(registry, "jalur_endpoint_healthy", cluster="pay-a", endpoint="http://127.0.0.1:9003")
        == 0
    )
    assert value(registry, "jalur_requests_rejected_total", reason="no_route") == 2
    assert value(registry, "jalur_requests_rejected_total", reason="encoded-slash") == 1
    assert value(registry, "jalur_boundary_stripped_total", system="tokopedia", kind="cookie") == 3
    assert value(registry, "jalur_consent_total", result="granted") == 1
    assert value(registry, "jalur_migration_progress_ratio", category="payment") == 0.87
    assert value(registry, "jalur_migration_progress_ratio", category="all") == 0.7
    assert value(registry, "jalur_config_reloads_total", result="success") == 1
    assert value(registry, "jalur_config_reloads_total", result="failure") == 1
    assert value(registry, "jalur_config_last_reload_success_timestamp_seconds") == 1.7e9


def test_reload_keeps_unchanged_routes_and_drops_removed_series(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    first = bind(metrics, load())
    first.routes["feed"].observe("feed", "GET", 200, 0.01, 0, 10)
    first.routes["payment"].observe("pay-a", "POST", 200, 0.01, 0, 10)

    changed = CONFIG.replace('"http://127.0.0.1:9003", ', "").replace(
        "category: promotion", "category: promo"
    )
    changed = changed[: changed.index("  - name: payment")]
    changed = changed.replace("pay-b: {system: tokopedia", "pay-c: {system: tokopedia")
    second = bind(metrics, load(changed))

    assert set(second.routes) == {"feed"}
    # feed changed category: a new RouteMetrics, the old category's series are gone.
    assert second.routes["feed"] is not first.routes["feed"]
    assert (
        value(
            registry,
            "jalur_requests_total",
            route="feed",
            category="promotion",
            cluster="feed",
            method="GET",
            code="200",
        )
        is None
    )
    # payment is gone entirely.
    assert value(registry, "jalur_requests_in_flight", route="payment") is None
    assert (
        value(registry, "jalur_request_duration_seconds_count", route="payment", cluster="pay-a")
        is None
    )
    # Removed cluster and endpoint series are gone, new ones are there.
    assert value(registry, "jalur_circuit_open", cluster="pay-b") is None
    assert value(registry, "jalur_circuit_open", cluster="pay-c") == 0
    assert (
        value(registry, "jalur_endpoint_healthy", cluster="pay-a", endpoint="http://127.0.0.1:9003")
        is None
    )
    assert (
        value(registry, "jalur_endpoint_healthy", cluster="pay-a", endpoint="http://127.0.0.1:9004")
        == 1
    )
    # A request still running on the old config may finish without errors.
    first.routes["payment"].exit()
    first.routes["payment"].observe("pay-a", "POST", 200, 0.01, 0, 10)

    # Same name and category: the same object and its counts survive the reload.
    third = bind(metrics, load(changed))
    assert third.routes["feed"] is second.routes["feed"]
    third.routes["feed"].observe("feed", "GET", 200, 0.01, 0, 10)
    second.routes["feed"].observe("feed", "GET", 200, 0.01, 0, 10)
    assert (
        value(
            registry,
            "jalur_requests_total",
            route="feed",
            category="promo",
            cluster="feed",
            method="GET",
            code="200",
        )
        == 2
    )


def test_default_buckets_are_opentelemetrys(metrics: Metrics) -> None:
    otel = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
    assert otel == DEFAULT_BUCKETS
    assert metrics.buckets == otel
    assert load().metrics.buckets == otel


def test_buckets_from_config(registry: CollectorRegistry) -> None:
    config = load(CONFIG + "metrics: {buckets: [0.1, 0.5, 2]}\n")
    assert config.metrics.buckets == (0.1, 0.5, 2.0)
    metrics = Metrics.from_config(config, registry)
    assert metrics.registry is registry
    bound = bind(metrics, config)
    bound.routes["feed"].observe("feed", "GET", 200, 0.3, 0, 0)
    bound.clusters["feed"].upstream_response(1.0)
    les = sorted(
        {
            s.labels["le"]
            for family in registry.collect()
            if family.name == "jalur_request_duration_seconds"
            for s in family.samples
            if s.name.endswith("_bucket")
        }
    )
    assert les == sorted(["0.1", "0.5", "2.0", "+Inf"])
    labels = {"route": "feed", "cluster": "feed"}
    bucket = "jalur_request_duration_seconds_bucket"
    assert registry.get_sample_value(bucket, {**labels, "le": "0.1"}) == 0
    assert registry.get_sample_value(bucket, {**labels, "le": "0.5"}) == 1
    up = "jalur_upstream_response_seconds_bucket"
    assert registry.get_sample_value(up, {"cluster": "feed", "le": "0.5"}) == 0
    assert registry.get_sample_value(up, {"cluster": "feed", "le": "2.0"}) == 1


@pytest.mark.parametrize(
    ("buckets", "message"),
    [
        ("[0.5, 0.1]", "strictly increasing"),
        ("[0.1, 0.1]", "strictly increasing"),
        ("[]", "length"),
        ("[0, 1]", "> 0"),
        ("[-1]", "> 0"),
    ],
)
def test_bad_buckets_are_config_errors(buckets: str, message: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        load(CONFIG + f"metrics: {{buckets: {buckets}}}\n")
    assert any(e.path.startswith("$.metrics") and message in e.message for e in info.value.errors)


@pytest.mark.parametrize("buckets", [[], [1.0, 0.5], [0.0], [float("inf")], [float("nan")]])
def test_bad_buckets_rejected_by_metrics(buckets: list[float]) -> None:
    with pytest.raises(ValueError, match="bucket"):
        Metrics(CollectorRegistry(), buckets=buckets)


def test_default_registry_is_fresh_not_global() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    assert a.registry is not REGISTRY
    assert a.registry is not b.registry
    assert REGISTRY.get_sample_value("jalur_build_info", {"version": a.version}) is None


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        (None, False),
        ("", False),
        ("*/*", False),
        ("text/plain", False),
        ("text/plain;version=0.0.4;q=1,*/*;q=0.1", False),
        ("text/html,application/xhtml+xml,*/*;q=0.8", False),
        ("application/openmetrics-text", True),
        ("application/openmetrics-text; version=1.0.0; charset=utf-8", True),
        (PROMETHEUS_ACCEPT, True),
        ("application/openmetrics-text;q=0", False),
        ("application/openmetrics-text;q=0.2,text/plain;q=0.9", False),
        ("text/plain;q=0.3,application/openmetrics-text;q=0.5", True),
        ("application/openmetrics-text;q=bogus", False),
    ],
)
def test_negotiation(accept: str | None, openmetrics: bool) -> None:
    assert wants_openmetrics(accept) is openmetrics


def test_render_openmetrics(metrics: Metrics) -> None:
    bind(metrics, load()).routes["feed"].observe("feed", "GET", 200, 0.02, 0, 10)
    body, content_type = metrics.render("application/openmetrics-text")
    assert content_type == OPENMETRICS_CONTENT_TYPE
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    assert b"# TYPE jalur_requests counter" in body
    assert b'jalur_requests_total{category="promotion",cluster="feed",code="200"' in body


def test_render_text(metrics: Metrics) -> None:
    bind(metrics, load()).routes["feed"].observe("feed", "GET", 200, 0.02, 0, 10)
    for accept in (None, "*/*", "text/plain;version=0.0.4"):
        body, content_type = metrics.render(accept)
        assert content_type == TEXT_CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
        assert b"# EOF" not in body
        families = {f.name for f in text_string_to_metric_families(body.decode())}
        assert {"jalur_requests", "jalur_request_duration_seconds", "jalur_build_info"} <= families


def _populated(metrics: Metrics) -> None:
    bound = bind(metrics, load())
    feed = bound.routes["feed"]
    feed.enter()
    feed.observe("feed", "GET", 200, 0.02, 0, 1000)
    feed.observe("feed", "BREW", 418, 0.02, 0, 10)
    feed.exit()
    bound.routes["payment"].retry()
    bound.routes["payment"].blocked("social_after_deadline")
    bound.routes["payment"].shadow("match")
    bound.clusters["pay-a"].error("timeout")
    bound.clusters["pay-a"].upstream_response(0.2)
    metrics.rejected("no_route")
    metrics.stripped("tiktok", "header")
    metrics.consent("missing")
    metrics.set_migration_progress({"payment": 0.87, "all": 0.7})
    metrics.config_reload(True)


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool (Prometheus) is not on PATH; CI installs it (Debian package 'prometheus')",
)
def test_promtool_check_metrics(metrics: Metrics) -> None:
    _populated(metrics)
    body, _ = metrics.render(None)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, output
    assert output.strip() == "", output


async def test_admin_metrics_route(metrics: Metrics) -> None:
    _populated(metrics)
    app = admin.make_app(admin.Status(), metrics)
    assert app[admin.METRICS] is metrics
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
        assert r.status == 200
        assert r.headers["Content-Type"] == OPENMETRICS_CONTENT_TYPE
        body = await r.read()
        assert body.endswith(b"# EOF\n")
        r = await client.get("/metrics")
        assert r.status == 200
        assert r.headers["Content-Type"] == TEXT_CONTENT_TYPE
        assert b"jalur_requests_rejected_total" in await r.read()


async def test_admin_without_metrics_has_no_route() -> None:
    app: web.Application = admin.make_app(admin.Status())
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/metrics")
        assert r.status == 404


# -- multiprocess mode ------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, sys
    from proxy import config as cfg
    from proxy.metrics import Metrics
    from proxy.router import Router

    config = cfg.parse(sys.stdin.read())
    metrics = Metrics()
    assert metrics.multiprocess_dir == os.environ["PROMETHEUS_MULTIPROC_DIR"]
    bound = metrics.bind(Router(config.routes), config)
    feed = bound.routes["feed"]
    for _ in range(int(sys.argv[1])):
        feed.enter()
        feed.observe("feed", "GET", 200, 0.02, 5, 100)
        feed.exit()
    if sys.argv[2] == "hold":
        feed.enter()  # still in flight when the process ends
    bound.clusters["feed"].set_circuit_open(sys.argv[2] == "hold")
    bound.clusters["feed"].set_endpoint_healthy("http://127.0.0.1:9001", sys.argv[2] != "hold")
    print(os.getpid())
    """
)


def _child_env(multiproc_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("prometheus_multiproc_dir", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if multiproc_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)
    return env


def test_multiprocess_mode_sums_workers(tmp_path: Path) -> None:
    n = 250
    env = _child_env(tmp_path)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(n), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        for mode in ("done", "hold")
    ]
    pids = []
    for child in children:
        out, err = child.communicate(CONFIG.encode(), timeout=60)
        assert child.returncode == 0, err.decode()
        pids.append(int(out))
    assert any(p.name.startswith("counter_") for p in tmp_path.iterdir())

    registry = multiprocess_registry(str(tmp_path))
    labels = {"route": "feed", "category": "promotion", "cluster": "feed", "method": "GET"}
    assert registry.get_sample_value("jalur_requests_total", {**labels, "code": "200"}) == 2 * n
    dur = {"route": "feed", "cluster": "feed"}
    assert registry.get_sample_value("jalur_request_duration_seconds_count", dur) == 2 * n
    assert registry.get_sample_value("jalur_request_body_bytes_total", {"route": "feed"}) == 10 * n
    assert registry.get_sample_value("jalur_response_body_bytes_total", {"route": "feed"}) == (
        200 * n
    )
    # build_info is "max", not summed over the workers.
    build = {"version": Metrics(CollectorRegistry()).version}
    assert registry.get_sample_value("jalur_build_info", build) == 1
    # Live gauges: in-flight sums the workers, the circuit is open if open in any.
    assert registry.get_sample_value("jalur_requests_in_flight", {"route": "feed"}) == 1
    assert registry.get_sample_value("jalur_circuit_open", {"cluster": "feed"}) == 1
    healthy = {"cluster": "feed", "endpoint": "http://127.0.0.1:9001"}
    assert registry.get_sample_value("jalur_endpoint_healthy", healthy) == 0  # ejected in one
    # Once the supervisor marks the worker dead, its live gauges stop counting.
    mark_process_dead(pids[1], str(tmp_path))
    registry = multiprocess_registry(str(tmp_path))
    assert registry.get_sample_value("jalur_requests_in_flight", {"route": "feed"}) == 0
    assert registry.get_sample_value("jalur_circuit_open", {"cluster": "feed"}) == 0
    assert registry.get_sample_value("jalur_endpoint_healthy", healthy) == 1
    assert registry.get_sample_value("jalur_requests_total", {**labels, "code": "200"}) == 2 * n

    body, content_type = exposition(registry, "application/openmetrics-text")
    assert content_type == OPENMETRICS_CONTENT_TYPE
    assert body.endswith(b"# EOF\n")
    body, _ = exposition(registry, None)
    assert f'code="200",method="GET",route="feed"}} {2 * n:.1f}'.encode() in body


def test_multiprocess_env_set_too_late_is_an_error(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os
        import prometheus_client
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ.pop("LATE_DIR")
        from proxy.metrics import Metrics
        try:
            Metrics()
        except RuntimeError as exc:
            print(exc)
        """
    )
    env = _child_env(None)
    env["LATE_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert b"must be set before prometheus_client is first imported" in result.stdout


async def test_status_code_label_keeps_known_codes_and_buckets_the_rest(tmp_path: Path) -> None:
    """Through a running proxy: a back end answering whatever status it likes cannot grow
    the ``code`` label beyond the registered codes and five classes (issue #19)."""
    import asyncio

    import aiohttp

    from .conftest import Harness, raw_upstream, read_request

    async def answer(up: object, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await read_request(reader)
            status = line.split()[1].rsplit("/", 1)[1]
            w.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
            await w.drain()

    up = await raw_upstream(answer)
    h = Harness(tmp_path)
    try:
        p = await h.proxy(
            {
                "clusters": {"any": {"system": "tokopedia", "endpoints": [up.url]}},
                "routes": [{"name": "all", "match": {}, "category": "promotion", "to": "any"}],
            }
        )
        sent = [200, 299, 404, 418, 429, 451, 499, 503, 520, 599]
        async with aiohttp.ClientSession() as s:
            for code in sent:
                async with s.get(f"http://127.0.0.1:{p.data_port}/s/{code}") as r:
                    assert r.status == code
        registry = p.services.metrics.registry

        def count(label: str) -> float:
            labels = {"route": "all", "category": "promotion", "cluster": "any"}
            value = registry.get_sample_value(
                "jalur_requests_total", {**labels, "method": "GET", "code": label}
            )
            return value or 0.0

        for label in ("200", "404", "429", "451", "503"):
            assert count(label) == 1, label
        assert count("2xx") == 1  # 299
        assert count("4xx") == 2  # 418 (registered as unused), 499
        assert count("5xx") == 2  # 520, 599
        labels = {
            s.labels["code"]
            for m in registry.collect()
            if m.name == "jalur_requests"
            for s in m.samples
        }
        assert labels == {"200", "404", "429", "451", "503", "2xx", "4xx", "5xx"}
    finally:
        await h.close()
        up.server.close()
