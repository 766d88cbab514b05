"""W3C Trace Context, and OpenTelemetry spans when an OTLP endpoint is configured.

Per request (``Tracer.start``):

- A ``traceparent`` (W3C Trace Context level 1) that parses is the request's parent: its
  trace id is kept and its sampled flag decides whether spans are exported. One that does
  not parse (bad shape, version ``ff``, an all-zero id, several lines) is ignored and a new
  trace starts, as when none came: a random 128-bit trace id, sampled with probability
  ``tracing.sample``.
- Every upstream try gets a ``traceparent`` of its own: same trace id, a new span id (the
  try's client span), the request's flags. Whatever the client sent is replaced.
- The trace id goes into the access log line and the audit record of the request.
- ``baggage`` and ``tracestate`` are not handled here: the boundary strips them toward every
  system that ``tracing.propagate`` does not list for them (``boundary.Boundary``).

With ``tracing.otlp_endpoint`` the spans are OpenTelemetry's (the ``tracing`` extra:
``opentelemetry-sdk`` and the OTLP/HTTP exporter, imported only then, so the core runs
without them): a SERVER span per request (named ``METHOD route``) and a CLIENT span per
upstream try, batched and exported over OTLP/HTTP by the SDK's worker thread. Without it
no span object is made; only ids are drawn.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any, Final

from multidict import CIMultiDictProxy

from . import config as cfg

__all__ = ["TRACEPARENT", "Trace", "Tracer", "parse_traceparent"]

TRACEPARENT: Final = "traceparent"
# version-traceid-parentid-flags; a future version may append "-..." fields (W3C 3.2.4).
_TRACEPARENT: Final = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\x00-\x20\x7f]*)?"
).fullmatch
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
SAMPLED: Final = 0x01  # the sampled bit of trace-flags
# Seconds the exporter may take to send what is left when a config is retired or at exit.
EXPORT_FLUSH: Final = 5.0


def parse_traceparent(values: Sequence[str]) -> tuple[str, str, int] | None:
    """(trace id, parent span id, flags) of a valid ``traceparent``, else None."""
    if len(values) != 1:
        return None
    m = _TRACEPARENT(values[0].strip())
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, int(flags, 16)


def _new_id(bits: int) -> str:
    width = bits // 4
    while True:
        value = random.getrandbits(bits)
        if value:
            return f"{value:0{width}x}"


class Trace:
    """One request's trace: its ids and, when exporting, its spans."""

    __slots__ = ("_current", "_server", "_tracer", "flags", "trace_id")

    def __init__(self, tracer: Any, trace_id: str, flags: str, server: Any = None) -> None:
        self._tracer = tracer  # the SDK tracer, or None
        self._server = server  # the SDK server span, or None
        self._current: Any = None  # the SDK client span of the try in flight
        self.trace_id = trace_id
        self.flags = flags

    def attempt(self, endpoint: str) -> str:
        """The ``traceparent`` of a new upstream try (its CLIENT span starts now)."""
        if self._tracer is None:
            return f"00-{self.trace_id}-{_new_id(64)}-{self.flags}"
        from opentelemetry import trace as otel

        self._end_attempt(None, "superseded")
        span = self._tracer.start_span(
            "upstream try",
            context=otel.set_span_in_context(self._server),
            kind=otel.SpanKind.CLIENT,
            attributes={"jalur.endpoint": endpoint},
        )
        self._current = span
        return f"00-{self.trace_id}-{span.get_span_context().span_id:016x}-{self.flags}"

    def attempt_done(self, status: int | None, error: str | None = None) -> None:
        """The try's head arrived (``status``) or it failed (``error``, a kind slug)."""
        if self._current is not None:
            self._end_attempt(status, error)

    def _end_attempt(self, status: int | None, error: str | None) -> None:
        span, self._current = self._current, None
        if span is None:
            return
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error is not None:
            span.set_attribute("error.type", error)
        span.end()

    def finish(
        self, method: str, route: str | None, status: int, attributes: dict[str, str]
    ) -> None:
        """End the request's spans (a try still open was cut: ``route_timeout`` or the
        client went away)."""
        server = self._server
        if server is None:
            return
        self._end_attempt(None, "cut")
        server.update_name(f"{method} {route}" if route else method)
        server.set_attribute("http.request.method", method)
        server.set_attribute("http.response.status_code", status)
        if route:
            server.set_attribute("http.route", route)
        for name, value in attributes.items():
            server.set_attribute(name, value)
        server.end()


class Tracer:
    """Built from ``tracing`` at config load; ``start`` per request."""

    __slots__ = ("_provider", "_sdk", "enabled", "sample")

    def __init__(self, spec: cfg.Tracing) -> None:
        self.enabled = spec.enabled
        self.sample = spec.sample
        self._provider: Any = None
        self._sdk: Any = None
        if spec.enabled and spec.otlp_endpoint is not None:
            self._provider, self._sdk = _sdk_tracer(spec)

    def start(self, headers: CIMultiDictProxy[str], method: str) -> Trace | None:
        """The request's trace (None when ``tracing.enabled`` is off)."""
        if not self.enabled:
            return None
        traceparent = headers.getall(TRACEPARENT, ())
        parent = parse_traceparent(traceparent) if traceparent else None
        # Parent-based sampling, decided here: an unsampled request makes no SDK object.
        sampled = bool(parent[2] & SAMPLED) if parent is not None else random.random() < self.sample
        if self._sdk is None or not sampled:
            if parent is not None:
                return Trace(None, parent[0], f"{parent[2]:02x}")
            return Trace(None, _new_id(128), "01" if sampled else "00")
        from opentelemetry import trace as otel

        context = None
        if parent is not None:
            remote = otel.SpanContext(
                trace_id=int(parent[0], 16),
                span_id=int(parent[1], 16),
                is_remote=True,
                trace_flags=otel.TraceFlags(parent[2] & 0xFF),
            )
            context = otel.set_span_in_context(otel.NonRecordingSpan(remote))
        span = self._sdk.start_span(method, context=context, kind=otel.SpanKind.SERVER)
        own = span.get_span_context()
        return Trace(self._sdk, f"{own.trace_id:032x}", f"{int(own.trace_flags):02x}", span)

    def close(self) -> None:
        """Export what is batched (bounded by ``EXPORT_FLUSH``) and stop the exporter."""
        if self._provider is not None:
            self._provider.force_flush(int(EXPORT_FLUSH * 1000))
            self._provider.shutdown()
            self._provider = None


def _sdk_tracer(spec: cfg.Tracing) -> tuple[Any, Any]:
    """An OpenTelemetry SDK provider exporting to ``spec.otlp_endpoint``, and its tracer.
    It records every span it is asked for: ``Tracer.start`` asks only for sampled requests
    (a sampled parent is followed, a new trace sampled at ``sample``)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    provider = TracerProvider(
        resource=Resource.create({"service.name": spec.service_name}),
        sampler=ALWAYS_ON,
    )
    provider.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=spec.otlp_endpoint, timeout=EXPORT_FLUSH),
            schedule_delay_millis=1000,
        )
    )
    return provider, provider.get_tracer("jalur")
