"""One request's context: what the steps read and what they decided, reported once at the end.

Per request, per attempt, per retry are three objects (as in Envoy's router): this is the
per-request one; ``attempts.Retries`` is the per-retry state and each ``Transport.send``
the attempt. Every step of ``steps.STEPS`` takes the ``Exchange`` and either fills in some
of its fields or returns the answer that ends the request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from multidict import CIMultiDict, CIMultiDictProxy

from .listener import Request, Response, Stream

if TYPE_CHECKING:
    from . import idempotency as idem
    from . import paths, routepolicy, tracing
    from .clientbody import ClientBody
    from .health import EndpointState
    from .router import Route
    from .shadow import Copy
    from .state import Services, State
    from .upstream import ClusterRuntime, Endpoint

# What a step answers with when it ends the request: a whole answer or a streamed one.
Answer = Response | Stream


class Exchange:
    """What one request did, filled in as it goes and reported once at the end."""

    __slots__ = (
        "admitted",
        "body",
        "bytes_out",
        "cluster",
        "consent",
        "copy",
        "endpoint",
        "flags",
        "gate",
        "hash_key",
        "headers",
        "host",
        "host_name",
        "limit",
        "method",
        "out_headers",
        "policy",
        "reason",
        "refused_route",
        "request",
        "request_id",
        "retrying",
        "route",
        "services",
        "started",
        "state",
        "status",
        "target",
        "ticket",
        "trace",
        "upstream_target",
        "upstream_time",
    )

    def __init__(
        self,
        state: State,
        services: Services,
        request: Request,
        request_id: str,
        started: float = 0.0,
    ) -> None:
        self.state = state  # the config this request started with, kept to its end
        self.services = services
        self.request = request
        self.method = request.method
        self.headers: CIMultiDictProxy[str] = request.headers
        self.request_id = request_id
        self.started = started  # time.monotonic() when the request arrived
        self.trace: tracing.Trace | None = None
        # Filled in by the steps, in their order:
        self.host_name = ""  # canonical Host (canonical_path)
        self.target: paths.Target | None = None  # canonical target (canonical_path)
        self.route: Route | None = None  # (route)
        self.policy: routepolicy.RoutePolicy | None = None  # (route)
        self.cluster: ClusterRuntime | None = None  # (split)
        self.limit = 0  # request body limit in bytes (body_limit)
        self.gate: idem.Gate | None = None  # the idempotency gate holding this request
        self.ticket: idem.Ticket | None = None  # an idempotency lock this request holds
        self.body: ClientBody | None = None
        self.admitted: ClusterRuntime | None = None  # counted by its circuit breaker (admit)
        self.hash_key: str | None = None  # the lb_policy: hash key (admit)
        self.host: EndpointState | None = None  # the endpoint whose attempt it holds
        self.endpoint: Endpoint | None = None
        self.out_headers: CIMultiDict[str] | None = None  # as forwarded (headers, scrub)
        self.upstream_target = ""  # path?query as forwarded (headers)
        self.copy: Copy | None = None  # the shadow copy (shadow)
        self.retrying = False  # holds a slot of the cluster's retry budget
        # Outcome, for metrics, the access log and the audit record:
        self.status = 0
        self.flags = "-"
        self.reason = ""  # compliance/boundary refusal slug, for the audit log
        # The transaction route a request refused before routing was addressed to (audited).
        self.refused_route: Route | None = None
        self.consent: str | None = None  # the consent check's outcome, for the audit log
        self.bytes_out = 0
        self.upstream_time: float | None = None
