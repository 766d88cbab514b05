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

__all__ = ["RoutePolicy", "build"]


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
