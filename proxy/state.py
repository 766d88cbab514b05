"""What one config compiles to (``State``) and the process-wide collaborators (``Services``).

Per request nothing here is computed: the handler's steps only look things up in a
``State`` built at config load. A request keeps the ``State`` it started with even if a
reload swaps in a new one meanwhile; the old one closes its upstream pools once its last
request is done (``retire``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import idempotency as idem
from . import ratelimit, routepolicy, tls, tracing
from .accesslog import AccessLog
from .boundary import Boundary
from .compliance import AuditLog, Guard, VariantCheck
from .config import Config
from .h1transport import H1Transport
from .metrics import Bound, Metrics
from .migration import Migration
from .router import Router
from .shadow import Plan, Shadower
from .split import Splitter
from .upstream import ClusterRuntime, Transport

log = logging.getLogger("jalur")


@dataclass(slots=True)
class Services:
    """Process-wide collaborators that outlive any one config."""

    metrics: Metrics
    access: AccessLog
    audit: AuditLog
    shadower: Shadower
    idempotency: idem.Store
    clock: Callable[[], float] = time.time  # wall clock the guard's deadlines are judged by


@dataclass(slots=True)
class State:
    """Everything built from one Config. Immutable once serving; replaced whole on reload."""

    config: Config
    router: Router
    clusters: dict[str, ClusterRuntime]
    splitters: dict[str, Splitter]
    guard: Guard
    variants: VariantCheck
    boundary: Boundary
    bound: Bound
    migration: Migration
    shadows: dict[str, Plan]
    idempotency: dict[str, idem.Gate]
    transaction_categories: frozenset[str]
    policies: dict[str, routepolicy.RoutePolicy]
    tracer: tracing.Tracer
    limiters: dict[str, ratelimit.Limiter] = field(default_factory=dict)
    transports: list[Transport] = field(default_factory=list)
    active: int = 0  # requests currently using this state
    _idle: asyncio.Event | None = None  # set when retired and the last request is done

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            self._idle.set()

    async def retire(self, grace: float) -> None:
        """Close the upstream pools once no request uses this state (or after ``grace``)."""
        # Health checks and ejections stop at once: the new state has its own.
        await asyncio.gather(*(c.close() for c in self.clusters.values()))
        if self.active:
            self._idle = asyncio.Event()
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                log.warning("retired config still had %d requests after %.0fs", self.active, grace)
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clusters.values()))
        closing = list(self.transports)
        await asyncio.gather(*(t.close() for t in closing), return_exceptions=True)
        await ratelimit.close(self.limiters)
        await asyncio.to_thread(self.tracer.close)  # flushes spans; bounded, off the loop


def build_state(config: Config, metrics: Metrics) -> State:
    """Compile a validated Config. Must run inside the event loop (sessions are created)."""
    router = Router(config.routes)
    bound = metrics.bind(router, config)
    clusters: dict[str, ClusterRuntime] = {}
    transports: list[Transport] = []
    for name, spec in config.clusters.items():
        transport = H1Transport(
            spec,
            config.listen,
            pool_idle_timeout=spec.keepalive_idle_timeout,
            tls=tls.for_cluster(name, spec, metrics),
        )
        transports.append(transport)
        clusters[name] = ClusterRuntime(
            name, spec, config.systems[spec.system], transport, bound.clusters[name]
        )
    splitters = {r.name: Splitter(r.name, r.targets) for r in router.routes}
    guard = Guard(config, router)
    kinds = {name: c.kind for name, c in clusters.items()}
    migration = Migration(
        routes=router.by_name,
        splitters=splitters,
        cluster_kinds=kinds,
        category_weights=config.migration.weights,
        window=config.migration.window,
        guard=guard,
        counters={
            (r.name, t.cluster): metrics.migration_child(r.category, kinds[t.cluster])
            for r in router.routes
            if r.category in config.migration.weights
            for t in r.targets
        },
    )
    shadows = {
        r.name: Plan(r.spec.shadow, clusters[r.spec.shadow.cluster], r.spec.shadow.percent / 100)
        for r in router.routes
        if r.spec.shadow is not None
    }
    limiters = ratelimit.build(config)
    state = State(
        config=config,
        policies=routepolicy.build(config, router, clusters, limiters),
        tracer=tracing.Tracer(config.tracing),
        limiters=limiters,
        idempotency=idem.gates(config),
        shadows=shadows,
        router=router,
        clusters=clusters,
        splitters=splitters,
        migration=migration,
        guard=guard,
        variants=VariantCheck(config, router),
        boundary=Boundary(config),
        bound=bound,
        transaction_categories=frozenset(config.compliance.transaction_categories),
        transports=transports,
    )
    for cluster in clusters.values():
        cluster.start()  # health checks, once nothing above can fail any more
    return state
