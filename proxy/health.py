"""Endpoint health: one table-driven state machine per endpoint, fed by active health checks
and by passive outlier detection on real traffic.

States (``Health``)::

    HEALTHY    takes requests
    UNHEALTHY  failed ``unhealthy_threshold`` active checks in a row; back after
               ``healthy_threshold`` passes in a row
    EJECTED    failed real requests in a row (outlier detection); back when its ejection
               time is over (a failing active check makes it UNHEALTHY instead)

Every state change goes through ``EndpointState.process(event)`` and the ``TRANSITIONS``
table (the style of python-hyper/h11's ``_state.py``): a pair that is not in the table
raises ``InvalidTransition``. Counting (consecutive failures, check streaks) happens outside
the machine; an event is fired only when a threshold is crossed, and only from a state that
has a transition for it.

``ClusterHealth`` owns the endpoints of one cluster as served: the tuple of endpoints that
may take requests (``available``, rebuilt only on a transition, so the request path reads
it without allocating), the ejection timers, the background checker tasks and the
``jalur_endpoint_healthy`` gauge. It never looks beyond its own cluster: when no endpoint is
available the request is answered 503 (``NoHealthyUpstream``), never sent elsewhere.

Ejection: the n-th ejection of an endpoint lasts ``min(base_ejection_time * n,
max_ejection_time)``; n drops by one for every ``base_ejection_time`` the endpoint then stays
in service. At most ``floor(endpoints * max_ejection_percent / 100)`` endpoints are ejected at
once; a failure streak reaching the threshold while that many are out just starts over.

There is no panic mode (Envoy routes to every endpoint when too few are healthy): the
ejection cap already keeps passive detection from emptying a cluster, and when active
checks fail everywhere the honest answer is a fast 503, not payments sent to endpoints
known to be failing.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDict

from . import config as cfg
from . import errors

if TYPE_CHECKING:
    from .metrics import ClusterMetrics
    from .upstream import Endpoint, Transport

__all__ = [
    "TRANSITIONS",
    "ClusterHealth",
    "EndpointState",
    "Event",
    "Health",
    "InvalidTransition",
    "ejection_time",
]

log = logging.getLogger("jalur.health")

USER_AGENT: Final = "jalur-health-check"


class Health(enum.Enum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    EJECTED = "ejected"


class Event(enum.Enum):
    CHECK_FAILED = "check_failed"  # unhealthy_threshold active checks failed in a row
    CHECK_PASSED = "check_passed"  # healthy_threshold active checks passed in a row
    OUTLIER = "outlier"  # outlier detection's failure streak reached its threshold
    EJECTION_ENDED = "ejection_ended"  # the ejection time is over


HEALTHY: Final = Health.HEALTHY
UNHEALTHY: Final = Health.UNHEALTHY
EJECTED: Final = Health.EJECTED

TRANSITIONS: Final[Mapping[tuple[Health, Event], Health]] = {
    (HEALTHY, Event.CHECK_FAILED): UNHEALTHY,
    (HEALTHY, Event.OUTLIER): EJECTED,
    (UNHEALTHY, Event.CHECK_PASSED): HEALTHY,
    (EJECTED, Event.EJECTION_ENDED): HEALTHY,
    (EJECTED, Event.CHECK_FAILED): UNHEALTHY,
}


class InvalidTransition(Exception):
    def __init__(self, state: Health, event: Event) -> None:
        super().__init__(f"no transition from {state.value} on {event.value}")
        self.state = state
        self.event = event


def ejection_time(n: int, spec: cfg.OutlierDetection) -> float:
    """Seconds the ``n``-th ejection (n >= 1) of an endpoint lasts."""
    return min(spec.base_ejection_time * n, spec.max_ejection_time)


class EndpointState:
    """One endpoint as served: its machine, its in-flight attempts, its failure streaks."""

    __slots__ = (
        "active",
        "check_failures",
        "check_passes",
        "connect_failures",
        "ejections",
        "endpoint",
        "failures",
        "returned_at",
        "state",
        "timer",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.state = HEALTHY  # healthy until a check or outlier detection says otherwise
        self.active = 0  # attempts in flight (least_request reads it)
        self.failures = 0  # consecutive failed exchanges or 5xx responses
        self.connect_failures = 0  # consecutive failed connects
        self.check_passes = 0
        self.check_failures = 0
        self.ejections = 0  # the ejection multiplier
        self.returned_at = 0.0  # monotonic time of the last return from an ejection
        self.timer: asyncio.TimerHandle | None = None

    def process(self, event: Event) -> Health:
        """The one place the state changes."""
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise InvalidTransition(self.state, event)
        self.state = new
        return new

    def __repr__(self) -> str:
        return f"<EndpointState {self.endpoint.url} {self.state.value} active={self.active}>"


class ClusterHealth:
    """Health of one cluster's endpoints (see the module docstring)."""

    __slots__ = (
        "_closed",
        "_tasks",
        "available",
        "check",
        "clock",
        "ejected",
        "hosts",
        "max_ejected",
        "metrics",
        "name",
        "outlier",
        "transport",
    )

    def __init__(
        self,
        name: str,
        hosts: tuple[EndpointState, ...],
        spec: cfg.Cluster,
        transport: Transport,
        metrics: ClusterMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.hosts = hosts
        self.available = hosts  # the endpoints in state HEALTHY, in configured order
        self.outlier = spec.outlier_detection
        self.check = spec.health_check
        self.transport = transport
        self.metrics = metrics
        self.clock = clock
        self.ejected = 0
        self.max_ejected = len(hosts) * self.outlier.max_ejection_percent // 100
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        if metrics is not None:
            for host in hosts:
                metrics.set_endpoint_healthy(host.endpoint.url, True)

    # -- passive: outcomes of real requests ---------------------------------------------

    def succeeded(self, host: EndpointState) -> None:
        """An attempt got a response head below 500."""
        if host.failures:
            host.failures = 0
            host.connect_failures = 0

    def failed(self, host: EndpointState, connect: bool) -> None:
        """An attempt failed (``connect``: the TCP connect itself) or answered 5xx."""
        if host.state is not HEALTHY or self._closed:
            return
        host.failures += 1
        spec = self.outlier
        if connect:
            host.connect_failures += 1
            if 0 < spec.consecutive_connect_failures <= host.connect_failures:
                self._eject(host, f"{host.connect_failures} failed connects in a row")
                return
        else:
            host.connect_failures = 0
        if 0 < spec.consecutive_5xx <= host.failures:
            self._eject(host, f"{host.failures} failures in a row")

    def _eject(self, host: EndpointState, why: str) -> None:
        host.failures = 0
        host.connect_failures = 0
        if self.ejected >= self.max_ejected:
            log.warning(
                "cluster %s: endpoint %s not ejected (%s): %d of %d already out",
                self.name,
                host.endpoint.url,
                why,
                self.ejected,
                len(self.hosts),
            )
            return
        now = self.clock()
        spec = self.outlier
        if host.ejections:
            served = int((now - host.returned_at) / spec.base_ejection_time)
            host.ejections = max(0, host.ejections - served)
        host.ejections += 1
        duration = ejection_time(host.ejections, spec)
        self._fire(host, Event.OUTLIER, f"{why}; for {duration:g}s")
        host.timer = asyncio.get_running_loop().call_later(duration, self._ejection_over, host)

    def _ejection_over(self, host: EndpointState) -> None:
        host.timer = None
        if host.state is EJECTED and not self._closed:
            self._fire(host, Event.EJECTION_ENDED, "ejection time over")

    # -- active: health checks ------------------------------------------------------------

    def checked(self, host: EndpointState, passed: bool) -> None:
        """Record one active check result."""
        if self._closed or self.check is None:
            return
        if passed:
            host.check_failures = 0
            host.check_passes += 1
            if host.state is UNHEALTHY and host.check_passes >= self.check.healthy_threshold:
                self._fire(host, Event.CHECK_PASSED, f"{host.check_passes} checks passed")
        else:
            host.check_passes = 0
            host.check_failures += 1
            if host.state is not UNHEALTHY and (
                host.check_failures >= self.check.unhealthy_threshold
            ):
                self._fire(host, Event.CHECK_FAILED, f"{host.check_failures} checks failed")

    def start(self) -> None:
        """Start the background checks (no-op without ``health_check``). Needs a loop."""
        if self.check is None or self._tasks or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._check_loop(h), name=f"health {self.name} {h.endpoint.url}")
            for h in self.hosts
        ]

    async def close(self) -> None:
        """Stop checks and timers; later outcomes change nothing. Idempotent."""
        self._closed = True
        for host in self.hosts:
            if host.timer is not None:
                host.timer.cancel()
                host.timer = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _check_loop(self, host: EndpointState) -> None:
        check = self.check
        assert check is not None
        # Spread the first checks so endpoints (and worker processes) do not probe in step.
        await asyncio.sleep(random.random() * check.jitter * check.interval)
        while True:
            self.checked(host, await self.probe(host))
            spread = check.jitter * (2 * random.random() - 1)
            await asyncio.sleep(check.interval * (1 + spread))

    async def probe(self, host: EndpointState) -> bool:
        """One health check: ``GET path`` within ``timeout``, body read and dropped; 2xx
        passes."""
        check = self.check
        assert check is not None
        ep = host.endpoint
        headers: CIMultiDict[str] = CIMultiDict(
            {"Host": f"{ep.host}:{ep.port}", "User-Agent": USER_AGENT}
        )
        try:
            async with asyncio.timeout(check.timeout):
                resp = await self.transport.send(ep, "GET", check.path, headers, None)
                try:
                    while await resp.read_chunk():
                        pass
                except BaseException:
                    resp.close()
                    raise
                resp.release()
                return 200 <= resp.status < 300
        except (errors.ProxyError, TimeoutError):
            return False
        except Exception:
            log.exception("health check of %s failed unexpectedly", ep.url)
            return False

    # -- transitions ----------------------------------------------------------------------

    def _fire(self, host: EndpointState, event: Event, why: str) -> None:
        old = host.state
        new = host.process(event)
        if old is EJECTED:
            self.ejected -= 1
            host.returned_at = self.clock()
            if host.timer is not None:
                host.timer.cancel()
                host.timer = None
        elif new is EJECTED:
            self.ejected += 1
        if new is HEALTHY:
            host.failures = 0
            host.connect_failures = 0
        if (old is HEALTHY) != (new is HEALTHY):
            self.available = tuple(h for h in self.hosts if h.state is HEALTHY)
            if self.metrics is not None:
                self.metrics.set_endpoint_healthy(host.endpoint.url, new is HEALTHY)
        level = logging.INFO if new is HEALTHY else logging.WARNING
        log.log(
            level,
            "cluster %s: endpoint %s %s -> %s (%s)",
            self.name,
            host.endpoint.url,
            old.value,
            new.value,
            why,
        )
