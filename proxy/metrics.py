"""Every Prometheus collector Jalur exports, created once; per-route children bound at load.

``Metrics`` owns one instance of each collector, all prefixed ``jalur_``, in base units,
registered on an explicit ``CollectorRegistry`` (never the process-global one). Label values
are bounded: route and cluster *names* from the config, HTTP methods outside the standard
nine are folded into ``OTHER``, reasons and kinds are the proxy's own slugs.

The request path never calls ``labels()``. ``Metrics.bind(router, config)`` runs at every
config load and returns a ``Bound`` whose ``routes[name]`` is a ``RouteMetrics`` holding
pre-bound children (in-flight gauge, body byte counters, a duration histogram per cluster of
the route) and a small dict cache for the ``requests_total`` child of each
``(cluster, method, code)``; a request costs a few dict lookups and ``inc``/``observe`` calls.
In the request handler, in order::

    rm = bound.routes[route.name]
    rm.enter()                                    # before anything can fail
    try:
        ...                                       # choose a cluster, forward
        bound.clusters[cluster].upstream_response(head_seconds)   # when a head arrived
        bound.clusters[cluster].error(exc.kind)   # on an upstream failure
    finally:
        rm.exit()
        rm.observe(cluster, method, status, seconds, bytes_in, bytes_out)

Requests refused before a route is known (a path ``paths`` rejects, no route) are counted in
``Metrics.rejected(reason)`` instead, so the ``route`` label of the other series stays the
set of configured route names.

A reload calls ``bind`` again: routes whose name and category are unchanged keep their
``RouteMetrics`` (and their series); series of routes, clusters and endpoints that are gone
are removed from the exposition. Requests still running on the old config keep updating
their (now detached) children, harmlessly. Histogram buckets are fixed when ``Metrics`` is
created; a reload that changes ``metrics.buckets`` is logged and takes effect on restart.

Multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set, several worker processes): every
process writes its values to memory-mapped files in that directory, and ``render`` reads all
of them through a ``MultiProcessCollector`` on a fresh registry. The variable must be set
*before* ``prometheus_client`` is first imported (the client picks its value storage at
import time); ``Metrics`` raises if it was not. Gauges aggregate across workers as follows:
``requests_in_flight`` sums live workers (``livesum``); ``circuit_open`` takes the largest
(open in any live worker: ``livemax``); ``endpoint_healthy`` the smallest (ejected in any live
worker: ``livemin``); ``migration_progress_ratio`` the most recently set value of a live
worker (``livemostrecent``); ``build_info`` and the last-reload timestamp the largest
(``max``). The supervisor must call ``mark_process_dead(pid)`` for each worker that exits
and empty the directory before starting workers. Removing series on reload is a no-op there.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.exposition import generate_latest as _text_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as _OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as _openmetrics_latest

from . import __version__, compliance, errors
from . import config as cfg
from .boundary import CONSENT_RESULTS
from .boundary import KINDS as STRIPPED_KINDS
from .idempotency import policy_of as idempotency_policy
from .router import Router

__all__ = [
    "DEFAULT_BUCKETS",
    "METHODS",
    "MULTIPROC_ENV",
    "NO_CLUSTER",
    "OPENMETRICS_CONTENT_TYPE",
    "OTHER_METHOD",
    "TEXT_CONTENT_TYPE",
    "Bound",
    "ClusterMetrics",
    "Metrics",
    "RouteMetrics",
    "bounded_method",
    "exposition",
    "mark_process_dead",
    "multiprocess_registry",
    "wants_openmetrics",
]

log = logging.getLogger("jalur.metrics")

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
# OpenTelemetry's default explicit bucket boundaries, in seconds.
DEFAULT_BUCKETS: Final[tuple[float, ...]] = cfg.Metrics().buckets
# Methods that get their own label value; every other method is counted as "OTHER".
METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)
OTHER_METHOD: Final = "OTHER"
# Status codes that keep their own ``code`` label value: those registered with IANA (HTTP
# Status Code Registry, RFC 9110 and extensions). Any other code a back end sends (a 299,
# a 499, a 520 from a CDN...) is counted in its class, "2xx" ... "5xx": the label has at
# most 63 + 5 values whatever the back ends answer.
KNOWN_CODES: Final = frozenset(
    {100, 101, 102, 103}
    | {200, 201, 202, 203, 204, 205, 206, 207, 208, 226}
    | {300, 301, 302, 303, 304, 305, 307, 308}
    | set(range(400, 418))  # 418 is registered as unused
    | {421, 422, 423, 424, 425, 426, 428, 429, 431, 451}
    | {500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511}
)


def code_label(code: int) -> str:
    """The ``code`` label value of a status: itself when known, else its class."""
    return str(code) if code in KNOWN_CODES else f"{code // 100}xx"


# The ``cluster`` label of a request answered before any cluster was chosen (e.g. blocked
# by the compliance guard).
NO_CLUSTER: Final = "-"
# Label values exported at 0 from the start, so a dashboard panel or a rate() shows 0 rather
# than "No data" before the first event (and, under --workers, the family exists at all).
# Bounded: one series per value per route / cluster / system; adding a slug here costs a
# series per route, never per request.
BLOCK_REASONS: Final = (
    compliance.SOCIAL_NOT_ALLOWED,
    compliance.SOCIAL_AFTER_DEADLINE,
    compliance.UNKNOWN_CLUSTER,
    compliance.TRANSACTION_VARIANT,
    compliance.AMBIGUOUS_VARIANT,
)
IDEMPOTENCY_OUTCOMES: Final = (
    "stored",
    "replayed",
    "conflict",
    "mismatch",
    "missing",
    "invalid",
    "full",
    "unknown",
    "released",
    "store_error",
)
SHADOW_OUTCOMES: Final = ("match", "mismatch", "error", "dropped", "blocked")
REJECT_REASONS: Final = (
    "no_route",
    "version",
    "transfer_encoding",
    "body_too_large",
    "body_timeout",
)


def _upstream_error_kinds() -> tuple[str, ...]:
    kinds: list[str] = []
    todo: list[type[errors.UpstreamError]] = [errors.UpstreamError]
    while todo:
        cls = todo.pop(0)
        if cls.kind not in kinds:
            kinds.append(cls.kind)
        todo.extend(cls.__subclasses__())
    return tuple(kinds)


# Every ``errors.UpstreamError.kind`` (connect, timeout, reset, ...).
UPSTREAM_ERROR_KINDS: Final = _upstream_error_kinds()
TEXT_CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
OPENMETRICS_CONTENT_TYPE: Final = _OPENMETRICS_TYPE


def bounded_method(method: str) -> str:
    """The ``method`` label value: the method itself if standard, else ``OTHER``."""
    return method if method in METHODS else OTHER_METHOD


class RouteMetrics:
    """Pre-bound children of one route. Only the event loop thread calls these."""

    __slots__ = (
        "_blocked",
        "_durations",
        "_idempotency",
        "_limited",
        "_metrics",
        "_requests",
        "_shadow",
        "category",
        "in_flight",
        "name",
        "request_bytes",
        "response_bytes",
        "retries",
    )

    def __init__(
        self,
        metrics: Metrics,
        name: str,
        category: str,
        clusters: Iterable[str],
        spec: cfg.Route | None = None,
    ):
        self._metrics = metrics
        self.name = name
        self.category = category
        self.in_flight: Gauge = metrics.requests_in_flight.labels(name)
        self.request_bytes: Counter = metrics.request_body_bytes.labels(name)
        self.response_bytes: Counter = metrics.response_body_bytes.labels(name)
        self.retries: Counter = metrics.retries.labels(name)
        self._requests: dict[tuple[str, str, int], Counter] = {}
        self._durations: dict[str, Histogram] = {}
        self._blocked: dict[str, Counter] = {}
        self._shadow: dict[str, Counter] = {}
        self._idempotency: dict[str, Counter] = {}
        self._limited: dict[str, Counter] = {}
        for cluster in clusters:
            self._duration_child(cluster)
        if spec is not None:
            self.prebind(spec)

    def prebind(self, spec: cfg.Route) -> None:
        """Export this route's reasons and outcomes at 0 (``BLOCK_REASONS``; the
        idempotency and shadow outcomes of a route that has those policies)."""
        for reason in BLOCK_REASONS:
            self._blocked.setdefault(
                reason, self._metrics.compliance_blocked.labels(self.name, reason)
            )
        if idempotency_policy(spec) is not None:
            for outcome in IDEMPOTENCY_OUTCOMES:
                if outcome not in self._idempotency:
                    self._idempotency[outcome] = self._metrics.idempotency.labels(
                        self.name, outcome
                    )
        if spec.shadow is not None:
            for outcome in SHADOW_OUTCOMES:
                if outcome not in self._shadow:
                    self._shadow[outcome] = self._metrics.shadow.labels(self.name, outcome)

    # -- per request ---------------------------------------------------------------------

    def enter(self) -> None:
        """A request of this route started (in-flight +1). Pair with ``exit``."""
        self.in_flight.inc()

    def exit(self) -> None:
        """A request of this route finished, however it ended (in-flight -1)."""
        self.in_flight.dec()

    def observe(
        self,
        cluster: str,
        method: str,
        code: int,
        duration: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """Count one finished request: ``requests_total``, its duration (seconds, from the
        first byte of the request to the last byte of the response) and body bytes."""
        if method not in METHODS:
            method = OTHER_METHOD
        key = (cluster, method, code)
        child = self._requests.get(key)
        if child is None:
            child = self._requests_child(key)
        child.inc()
        hist = self._durations.get(cluster)
        if hist is None:
            hist = self._duration_child(cluster)
        hist.observe(duration)
        if bytes_in:
            self.request_bytes.inc(bytes_in)
        if bytes_out:
            self.response_bytes.inc(bytes_out)

    def retry(self) -> None:
        """One more upstream attempt for a request of this route."""
        self.retries.inc()

    def blocked(self, reason: str) -> None:
        """The compliance guard refused a request of this route (bounded ``reason`` slug)."""
        child = self._blocked.get(reason)
        if child is None:
            child = self._blocked[reason] = self._metrics.compliance_blocked.labels(
                self.name, reason
            )
        child.inc()

    def idempotency(self, outcome: str) -> None:
        """An idempotency-gate decision for a request of this route (bounded slug)."""
        child = self._idempotency.get(outcome)
        if child is None:
            child = self._idempotency[outcome] = self._metrics.idempotency.labels(
                self.name, outcome
            )
        child.inc()

    def rate_limited(self, reason: str) -> None:
        """A request of this route found a bucket empty (``route``, ``user``) or the shared
        store silent (``store_error``: let through)."""
        child = self._limited.get(reason)
        if child is None:
            child = self._limited[reason] = self._metrics.rate_limited.labels(self.name, reason)
        child.inc()

    def shadow(self, outcome: str) -> None:
        """A shadow copy of a request of this route ended (``match``, ``mismatch``,
        ``error``, ``skipped``: the shadow module's bounded slugs)."""
        child = self._shadow.get(outcome)
        if child is None:
            child = self._shadow[outcome] = self._metrics.shadow.labels(self.name, outcome)
        child.inc()

    # -- binding -------------------------------------------------------------------------

    def _requests_child(self, key: tuple[str, str, int]) -> Counter:
        cluster, method, code = key
        child: Counter = self._metrics.requests.labels(
            self.name, self.category, cluster, method, code_label(code)
        )
        self._requests[key] = child
        return child

    def _duration_child(self, cluster: str) -> Histogram:
        child: Histogram = self._metrics.request_duration.labels(self.name, cluster)
        self._durations[cluster] = child
        return child

    def _retire(self) -> None:
        """Remove every series of this route from the exposition."""
        m = self._metrics
        name = self.name
        for cluster, method, code in self._requests:
            _remove(m.requests, name, self.category, cluster, method, code_label(code))
        for cluster in self._durations:
            _remove(m.request_duration, name, cluster)
        for reason in self._blocked:
            _remove(m.compliance_blocked, name, reason)
        for outcome in self._shadow:
            _remove(m.shadow, name, outcome)
        for outcome in self._idempotency:
            _remove(m.idempotency, name, outcome)
        for reason in self._limited:
            _remove(m.rate_limited, name, reason)
        for collector in (m.requests_in_flight, m.request_body_bytes, m.response_body_bytes):
            _remove(collector, name)
        _remove(m.retries, name)
        # A request still running on the old config counts anew (a new series), not into a
        # removed child: the pre-bound reasons and outcomes are forgotten with the route.
        self._blocked.clear()
        self._shadow.clear()
        self._idempotency.clear()


class ClusterMetrics:
    """Pre-bound children of one cluster."""

    __slots__ = ("_errors", "_healthy", "_metrics", "circuit", "name", "upstream_seconds")

    def __init__(self, metrics: Metrics, name: str, endpoints: Iterable[str]) -> None:
        self._metrics = metrics
        self.name = name
        self.upstream_seconds: Histogram = metrics.upstream_response.labels(name)
        self.circuit: Gauge = metrics.circuit_open.labels(name)
        self._errors: dict[str, Counter] = {
            kind: metrics.upstream_errors.labels(name, kind) for kind in UPSTREAM_ERROR_KINDS
        }
        self._healthy: dict[str, Gauge] = {}
        self._sync_endpoints(endpoints)

    def upstream_response(self, seconds: float) -> None:
        """Time from sending the request upstream to receiving the response head."""
        self.upstream_seconds.observe(seconds)

    def error(self, kind: str) -> None:
        """An upstream exchange failed; ``kind`` is ``errors.UpstreamError.kind``."""
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = self._metrics.upstream_errors.labels(self.name, kind)
        child.inc()

    def set_circuit_open(self, is_open: bool) -> None:
        self.circuit.set(1 if is_open else 0)

    def set_endpoint_healthy(self, endpoint: str, healthy: bool) -> None:
        """``endpoint`` is the endpoint URL as configured (``upstream.Endpoint.url``)."""
        child = self._healthy.get(endpoint)
        if child is None:
            child = self._healthy[endpoint] = self._metrics.endpoint_healthy.labels(
                self.name, endpoint
            )
        child.set(1 if healthy else 0)

    def _sync_endpoints(self, endpoints: Iterable[str]) -> None:
        wanted = [e.rstrip("/") for e in endpoints]
        for gone in set(self._healthy) - set(wanted):
            del self._healthy[gone]
            if not self._metrics.multiprocess_dir:
                _remove(self._metrics.endpoint_healthy, self.name, gone)
        for endpoint in wanted:
            if endpoint not in self._healthy:
                # Healthy until a health check or outlier detection says otherwise.
                self.set_endpoint_healthy(endpoint, True)

    def _retire(self) -> None:
        m = self._metrics
        _remove(m.upstream_response, self.name)
        _remove(m.circuit_open, self.name)
        for kind in self._errors:
            _remove(m.upstream_errors, self.name, kind)
        for endpoint in self._healthy:
            _remove(m.endpoint_healthy, self.name, endpoint)
        self._errors.clear()  # a late error of a request in flight counts anew (RouteMetrics)


@dataclass(frozen=True, slots=True)
class Bound:
    """The metric children of one loaded config; lives as long as that config's state."""

    routes: Mapping[str, RouteMetrics]
    clusters: Mapping[str, ClusterMetrics]


class Metrics:
    """Every collector, created once per process on ``registry``.

    ``buckets`` are the histogram upper bounds in seconds (default: OpenTelemetry's).
    ``multiprocess_dir`` defaults to ``$PROMETHEUS_MULTIPROC_DIR``; when set, ``render``
    aggregates every process's values from that directory.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        version: str = __version__,
        multiprocess_dir: str | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.buckets = _check_buckets(buckets)
        self.version = version
        if multiprocess_dir is None:
            multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        if multiprocess_dir is not None and values.ValueClass is values.MutexValue:
            raise RuntimeError(
                f"{MULTIPROC_ENV} must be set before prometheus_client is first imported"
            )
        self.multiprocess_dir = multiprocess_dir
        self._routes: dict[str, RouteMetrics] = {}
        self._clusters: dict[str, ClusterMetrics] = {}
        self._rejected: dict[str, Counter] = {}
        self._stripped: dict[tuple[str, str], Counter] = {}
        self._consent: dict[str, Counter] = {}
        reg = self.registry
        b = self.buckets

        self.requests = Counter(
            "jalur_requests_total",
            "Requests answered, by route, category, cluster, method and status code.",
            ["route", "category", "cluster", "method", "code"],
            registry=reg,
        )
        self.request_duration = Histogram(
            "jalur_request_duration_seconds",
            "Time from the request head to the last response byte, by route and cluster.",
            ["route", "cluster"],
            buckets=b,
            registry=reg,
        )
        self.upstream_response = Histogram(
            "jalur_upstream_response_seconds",
            "Time from sending a request upstream to receiving its response head.",
            ["cluster"],
            buckets=b,
            registry=reg,
        )
        self.requests_in_flight = Gauge(
            "jalur_requests_in_flight",
            "Requests being served now, by route.",
            ["route"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.request_body_bytes = Counter(
            "jalur_request_body_bytes_total",
            "Request body bytes received from clients, by route.",
            ["route"],
            registry=reg,
        )
        self.response_body_bytes = Counter(
            "jalur_response_body_bytes_total",
            "Response body bytes sent to clients, by route.",
            ["route"],
            registry=reg,
        )
        self.upstream_errors = Counter(
            "jalur_upstream_errors_total",
            "Failed upstream exchanges, by cluster and kind (connect, timeout, reset, ...).",
            ["cluster", "kind"],
            registry=reg,
        )
        self.retries = Counter(
            "jalur_retries_total",
            "Upstream attempts after the first, by route.",
            ["route"],
            registry=reg,
        )
        self.compliance_blocked = Counter(
            "jalur_compliance_blocked_total",
            "Requests refused by the compliance guard, by route and reason.",
            ["route", "reason"],
            registry=reg,
        )
        self.boundary_stripped = Counter(
            "jalur_boundary_stripped_total",
            "Headers and cookies kept from crossing into a system, by system and kind.",
            ["system", "kind"],
            registry=reg,
        )
        self.consent_checks = Counter(
            "jalur_consent_total",
            "Consent checks for cross-system identities, by result.",
            ["result"],
            registry=reg,
        )
        self.migration_progress = Gauge(
            "jalur_migration_progress_ratio",
            "Share of each category's traffic served by its target system; category=all "
            "is the weighted total.",
            ["category"],
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self.migration_requests = Counter(
            "jalur_migration_requests",
            "Requests of a migrated category answered by an upstream, by the kind of system "
            "that served them (social|commerce): summable over workers and replicas, the "
            "fleet's progress is sum(rate(commerce)) / sum(rate(all)).",
            ["category", "kind"],
            registry=reg,
        )
        self.migration_category_weight = Gauge(
            "jalur_migration_category_weight",
            "Weight of each category in the weighted progress figure (migration.weights).",
            ["category"],
            registry=reg,
            multiprocess_mode="max",
        )
        self.migration_weights_held = Gauge(
            "jalur_migration_weights_held",
            "1 while the config file's split gives commerce a smaller share than the live "
            "weights (a rollback not asked for: the live weights stay).",
            ["route"],
            registry=reg,
            multiprocess_mode="max",
        )
        self.endpoint_healthy = Gauge(
            "jalur_endpoint_healthy",
            "1 if the endpoint may take requests, 0 if ejected or failing health checks.",
            ["cluster", "endpoint"],
            registry=reg,
            multiprocess_mode="livemin",
        )
        self.circuit_open = Gauge(
            "jalur_circuit_open",
            "1 while the cluster's circuit breaker is open.",
            ["cluster"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.shadow = Counter(
            "jalur_shadow_total",
            "Shadow copies of requests, by route and outcome.",
            ["route", "outcome"],
            registry=reg,
        )
        self.idempotency = Counter(
            "jalur_idempotency_total",
            "Idempotency gate decisions, by route and outcome (stored, replayed, conflict, "
            "mismatch, missing, store_error).",
            ["route", "outcome"],
            registry=reg,
        )
        self.rate_limited = Counter(
            "jalur_rate_limited_total",
            "Requests answered 429 by a route's rate limit, by route and bucket (route, user); "
            "reason store_error: the shared store did not answer and the request went through.",
            ["route", "reason"],
            registry=reg,
        )
        self.config_reloads = Counter(
            "jalur_config_reloads_total",
            "Configuration reloads, by result (success, failure).",
            ["result"],
            registry=reg,
        )
        self.config_last_reload_success = Gauge(
            "jalur_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load.",
            registry=reg,
            multiprocess_mode="max",
        )
        self.build_info = Gauge(
            "jalur_build_info",
            "Always 1; the version label names the running build.",
            ["version"],
            registry=reg,
            multiprocess_mode="max",
        )
        self.requests_rejected = Counter(
            "jalur_requests_rejected_total",
            "Requests refused by Jalur itself before or instead of forwarding them (malformed, "
            "invalid path, no route, listener limits, body too large or stalled), by reason.",
            ["reason"],
            registry=reg,
        )
        self.tls_reloads = Counter(
            "jalur_tls_reloads_total",
            "Certificate file reloads (changed on disk or SIGHUP), by result (success; "
            "failure: the new files did not load and the previous ones are still served).",
            ["result"],
            registry=reg,
        )
        self.tls_certificate_expiry = Gauge(
            "jalur_tls_certificate_expiry_seconds",
            "Unix time at which a loaded certificate expires (the earliest of a CA bundle), "
            "by TLS section (listen.tls, admin.tls, clusters.NAME.tls), role and file.",
            ["section", "role", "file"],
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self.build_info.labels(version).set(1)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
            self.tls_reloads.labels(result)
        for reason in REJECT_REASONS:
            self.rejected(reason, 0)
        for consent in CONSENT_RESULTS:
            self._consent[consent] = self.consent_checks.labels(consent)

    @classmethod
    def from_config(cls, config: cfg.Config, registry: CollectorRegistry | None = None) -> Metrics:
        """``Metrics(registry, buckets=config.metrics.buckets)``; call once per process."""
        return cls(registry, buckets=config.metrics.buckets)

    # -- binding -------------------------------------------------------------------------

    def bind(self, router: Router, config: cfg.Config) -> Bound:
        """Pre-bind the children for ``router``'s routes and ``config``'s clusters.

        Call at every config load, in the event loop thread, and keep the result with the
        state built from the same config."""
        if tuple(config.metrics.buckets) != self.buckets:
            log.warning("metrics.buckets changed; the new buckets take effect on restart")
        routes: dict[str, RouteMetrics] = {}
        for route in router.routes:
            clusters = [t.cluster for t in route.targets]
            old = self._routes.get(route.name)
            if old is not None and old.category == route.category:
                for cluster in clusters:
                    if cluster not in old._durations:
                        old._duration_child(cluster)
                old.prebind(route.spec)
                routes[route.name] = old
                continue
            if old is not None:
                self._retire_route(old)
            routes[route.name] = RouteMetrics(
                self, route.name, route.category, clusters, route.spec
            )
        for name, old in self._routes.items():
            if name not in routes:
                self._retire_route(old)
        self._routes = routes

        clusters_bound: dict[str, ClusterMetrics] = {}
        for name, spec in config.clusters.items():
            existing = self._clusters.get(name)
            if existing is not None:
                existing._sync_endpoints(spec.endpoints)
                clusters_bound[name] = existing
            else:
                clusters_bound[name] = ClusterMetrics(self, name, spec.endpoints)
        for name, gone in self._clusters.items():
            if name not in clusters_bound and not self.multiprocess_dir:
                gone._retire()
        self._clusters = clusters_bound
        for system in sorted({spec.system for spec in config.clusters.values()}):
            for kind in STRIPPED_KINDS:
                self.stripped(system, kind, 0)
        return Bound(routes=dict(routes), clusters=dict(clusters_bound))

    def _retire_route(self, rm: RouteMetrics) -> None:
        if not self.multiprocess_dir:
            rm._retire()

    # -- process-wide events -------------------------------------------------------------

    def rejected(self, reason: str, count: int = 1) -> None:
        """A request refused by the proxy itself: ``no_route``, a ``paths.PathError.reason``
        slug, ``malformed``, a listener limit (``max_connections``), ``transfer_encoding``,
        or a body limit (``body_too_large``, ``body_timeout``; also counted under the route).
        Pass only bounded slugs, never request data."""
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected[reason] = self.requests_rejected.labels(reason)
        child.inc(count)

    def upstream_error(self, cluster: str, kind: str) -> None:
        """Same as ``bound.clusters[cluster].error(kind)``, for callers without a Bound."""
        cm = self._clusters.get(cluster)
        if cm is not None:
            cm.error(kind)
        else:
            self.upstream_errors.labels(cluster, kind).inc()

    def stripped(self, system: str, kind: str, count: int = 1) -> None:
        """``count`` headers/cookies (``kind``: ``header``, ``cookie``, ``set-cookie``, ...)
        were kept from crossing into ``system``."""
        key = (system, kind)
        child = self._stripped.get(key)
        if child is None:
            child = self._stripped[key] = self.boundary_stripped.labels(system, kind)
        child.inc(count)

    def consent(self, result: str) -> None:
        """One consent check (``granted``, ``missing``, ``invalid``, ``expired``, ...)."""
        child = self._consent.get(result)
        if child is None:
            child = self._consent[result] = self.consent_checks.labels(result)
        child.inc()

    def set_migration_progress(self, ratios: Mapping[str, float]) -> None:
        """Set the progress ratio (0..1) per category; include ``"all"`` for the total."""
        for category, ratio in ratios.items():
            self.migration_progress.labels(category).set(ratio)

    def migration_child(self, category: str, kind: str) -> Counter:
        """The counter of ``category``'s requests served by a ``kind`` system (bind once)."""
        child: Counter = self.migration_requests.labels(category, kind)
        return child

    def migration_counts(self) -> dict[tuple[str, str], float]:
        """``jalur_migration_requests_total`` by (category, kind), summed over every process
        of the pod (multiprocess mode) or this process's own."""
        registry = (
            multiprocess_registry(self.multiprocess_dir) if self.multiprocess_dir else self.registry
        )
        out: dict[tuple[str, str], float] = {}
        for family in registry.collect():
            if family.name != "jalur_migration_requests":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = (sample.labels["category"], sample.labels["kind"])
                    out[key] = out.get(key, 0.0) + sample.value
        return out

    def set_migration_config(
        self, category_weights: Mapping[str, float], held: Mapping[str, bool]
    ) -> None:
        for category, weight in category_weights.items():
            self.migration_category_weight.labels(category).set(weight)
            for kind in ("social", "commerce"):  # exported at 0 before the first request
                self.migration_requests.labels(category, kind)
        for route, is_held in held.items():
            self.migration_weights_held.labels(route).set(1 if is_held else 0)

    def config_reload(self, ok: bool, timestamp: float | None = None) -> None:
        """Count a config (re)load, the first load included; a success also records its
        time (Unix seconds, default now)."""
        self.config_reloads.labels("success" if ok else "failure").inc()
        if ok:
            self.config_last_reload_success.set(time.time() if timestamp is None else timestamp)

    def tls_reload(self, ok: bool) -> None:
        """Count one certificate reload (``tls.Rotating.refresh``)."""
        self.tls_reloads.labels("success" if ok else "failure").inc()

    def tls_expiry(self, section: str, role: str, file: str, timestamp: float) -> None:
        """Export a loaded certificate's expiry (Unix seconds)."""
        self.tls_certificate_expiry.labels(section, role, file).set(timestamp)

    # -- exposition ----------------------------------------------------------------------

    def render(self, request_accept_header: str | None) -> tuple[bytes, str]:
        """The exposition body and its Content-Type, negotiated from an Accept header:
        OpenMetrics 1.0 when the client prefers ``application/openmetrics-text``,
        otherwise the Prometheus text format 0.0.4."""
        if self.multiprocess_dir:
            registry = multiprocess_registry(self.multiprocess_dir)
        else:
            registry = self.registry
        return exposition(registry, request_accept_header)


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """Render ``registry`` in the format ``accept`` prefers (see ``wants_openmetrics``)."""
    if wants_openmetrics(accept):
        body: bytes = _openmetrics_latest(registry)  # type: ignore[no-untyped-call]
        return body, OPENMETRICS_CONTENT_TYPE
    return _text_latest(registry), TEXT_CONTENT_TYPE


def multiprocess_registry(path: str | None = None) -> CollectorRegistry:
    """A fresh registry collecting every process's values from ``path`` (default
    ``$PROMETHEUS_MULTIPROC_DIR``)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry


def mark_process_dead(pid: int, path: str | None = None) -> None:
    """Drop a dead worker's live gauges (call from the supervisor when a worker exits)."""
    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def wants_openmetrics(accept: str | None) -> bool:
    """True if ``accept`` ranks ``application/openmetrics-text`` above zero and not below
    ``text/plain``; ``*/*`` or a missing header mean the text format."""
    if not accept:
        return False
    best_om = 0.0
    best_text = -1.0
    for part in accept.split(","):
        fields = part.split(";")
        media = fields[0].strip().lower()
        q = 1.0
        for param in fields[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                if not math.isfinite(q):
                    q = 0.0
        if media == "application/openmetrics-text":
            best_om = max(best_om, q)
        elif media == "text/plain":
            best_text = max(best_text, q)
    return best_om > 0 and best_om >= best_text


def _check_buckets(buckets: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(b) for b in buckets)
    if not out:
        raise ValueError("at least one histogram bucket is required")
    if any(not math.isfinite(b) or b <= 0 for b in out):
        raise ValueError("histogram buckets must be finite and positive")
    if any(a >= b for a, b in itertools.pairwise(out)):
        raise ValueError("histogram buckets must be strictly increasing")
    return out


def _remove(collector: Counter | Gauge | Histogram, *labelvalues: str) -> None:
    with contextlib.suppress(KeyError):
        collector.remove(*labelvalues)
