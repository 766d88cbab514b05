"""What is written about one finished request: metrics, access log line, audit record.

Invariant: every request routed to a transaction category, and every request a compliance
rule refused, leaves an audit record; the access log is sampled before anything is
formatted.
"""

from __future__ import annotations

from .accesslog import AccessLog
from .exchange import Exchange
from .metrics import NO_CLUSTER


def record(ex: Exchange, duration: float) -> None:
    """Metrics, access log and audit record for one finished request."""
    route, cluster, state = ex.route, ex.cluster, ex.state
    bytes_in = ex.body.bytes if ex.body is not None else 0
    cluster_name = cluster.name if cluster is not None else NO_CLUSTER
    if route is not None:
        state.bound.routes[route.name].observe(
            cluster_name, ex.method, ex.status, duration, bytes_in, ex.bytes_out
        )
    trace = ex.trace
    if trace is not None:
        trace.finish(
            ex.method,
            route.name if route else None,
            ex.status,
            {"jalur.request_id": ex.request_id, "jalur.cluster": cluster_name},
        )
    services = ex.services
    access = services.access
    if access.keep(ex.status):  # sampled before anything is formatted
        _access_log(access, ex, duration, bytes_in)
    audited = route if route is not None else ex.refused_route
    if audited is not None and (ex.reason or audited.category in state.transaction_categories):
        services.audit.record(
            {
                "request_id": ex.request_id,
                "trace_id": trace.trace_id if trace is not None else None,
                "route": audited.name,
                "category": audited.category,
                "cluster": cluster_name,
                "system": cluster.system if cluster else None,
                "status": ex.status,
                "duration": round(duration, 6),
                "decision": "blocked" if ex.reason else "allowed",
                "reason": ex.reason or None,
                "consent": ex.consent,
            }
        )


def _access_log(access: AccessLog, ex: Exchange, duration: float, bytes_in: int) -> None:
    route, cluster, headers, request = ex.route, ex.cluster, ex.headers, ex.request
    access.write(
        method=ex.method,
        path=request.raw_path,
        protocol=f"HTTP/{request.version.major}.{request.version.minor}",
        response_code=ex.status,
        response_flags=ex.flags,
        bytes_received=bytes_in,
        bytes_sent=ex.bytes_out,
        duration=duration,
        upstream_service_time=ex.upstream_time,
        x_forwarded_for=headers.get("X-Forwarded-For"),
        user_agent=headers.get("User-Agent"),
        request_id=ex.request_id,
        authority=headers.get("Host"),
        upstream_host=f"{ex.endpoint.host}:{ex.endpoint.port}" if ex.endpoint else None,
        route=route.name if route else None,
        category=route.category if route else None,
        cluster=cluster.name if cluster else None,
        system=cluster.system if cluster else None,
        trace_id=ex.trace.trace_id if ex.trace is not None else None,
    )
