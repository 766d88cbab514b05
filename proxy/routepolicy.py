"""A route's traffic policy, resolved at config load: its deadline, the retry policy for
each cluster it sends to (its own ``retry`` block, else the cluster's) and its rate limit.

Per request the handler looks the route's ``RoutePolicy`` up once; nothing here is
computed per request.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import config as cfg
from .ratelimit import Limiter
from .retry import RetryPolicy
from .router import Router
from .upstream import ClusterRuntime

__all__ = ["RoutePolicy", "build", "describe"]


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    # Seconds from the request's arrival to the upstream response head, retries included.
    timeout: float | None
    # The retry policy per target cluster name (the route's ``retry``, else the cluster's).
    retry: dict[str, RetryPolicy]
    limiter: Limiter | None


def build(
    config: cfg.Config,
    router: Router,
    clusters: dict[str, ClusterRuntime],
    limiters: dict[str, Limiter],
) -> dict[str, RoutePolicy]:
    out: dict[str, RoutePolicy] = {}
    for route in router.routes:
        spec = route.spec
        retry: dict[str, RetryPolicy] = {}
        for target in route.targets:
            cluster = clusters[target.cluster]
            retry[target.cluster] = (
                cluster.retry
                if spec.retry is None
                else RetryPolicy(spec.retry, cluster.spec.timeouts.response_headers)
            )
        out[route.name] = RoutePolicy(spec.timeout, retry, limiters.get(route.name))
    return out


def describe(config: cfg.Config) -> list[str]:
    """``jalur check``'s lines for the routes' policies and tracing (none when all off)."""
    lines: list[str] = []
    for route in config.routes:
        parts: list[str] = []
        if route.timeout is not None:
            parts.append(f"timeout {route.timeout:g}s")
        if route.retry is not None:
            per_try = route.retry.per_try_timeout
            each = f" of {per_try:g}s" if per_try is not None else ""
            parts.append(f"retry {route.retry.attempts} tries{each}")
        limit = route.rate_limit
        if limit is not None:
            for name, bucket in (("route", limit.route), ("user", limit.user)):
                if bucket is not None:
                    parts.append(f"{name} {bucket.rate:g}/s burst {bucket.burst} ({limit.scope})")
        if parts:
            lines.append(f"  {route.name:<26} {', '.join(parts)}")
    if lines:
        lines.insert(0, "traffic policy:")
    tracing = config.tracing
    if not tracing.enabled:
        lines.append("tracing: off (traceparent passed through)")
    elif tracing.otlp_endpoint is not None:
        lines.append(f"tracing: spans to {tracing.otlp_endpoint} (sample {tracing.sample:g})")
    else:
        lines.append("tracing: W3C trace context (no spans exported)")
    return lines
