"""Migration control: live split weights and the measured migration-progress figure.

Progress is measured from traffic, not declared: for each category, the share of its
requests in a sliding window (``migration.window``, default 5 minutes) that were served by a
cluster of a ``kind: commerce`` system. The total is the weighted mean over categories with
``migration.weights`` (default payment 0.6, user-data 0.2, merchant 0.2); a category with no
traffic in the window has no figure and is left out of the mean (its weight is spread over
the others), so the total never pretends a silent category is done or not done.

Invariants:
- Counting costs one clock read, one integer division and two dict updates per request;
  the window is a ring of ``SLOTS`` time slots, so memory is bounded whatever the traffic.
- ``check_weights`` accepts weights only for clusters the route already names, and refuses
  any weight the compliance guard would refuse now (a social cluster after its deadline).
  The live weights are the fleet's (``fleet.Fleet``): ``apply`` installs them here.
- Every served request of a migrated category is also counted in
  ``jalur_migration_requests_total{category,kind}`` (summable): with several workers the
  supervisor's ``PodProgress`` reads the pod's figure from those counters; one process
  measures its own window here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from .compliance import Guard
from .router import Route, Target
from .split import Splitter

# Time slots in a sliding window: the window moves in steps of window / SLOTS seconds.
SLOTS: Final = 60


class SlidingCounter:
    """Counts per key over the last ``window`` seconds, in ``SLOTS`` slots."""

    __slots__ = ("_clock", "_epochs", "_slots", "_width")

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._width = window / SLOTS
        self._clock = clock
        self._slots: list[dict[Any, int]] = [{} for _ in range(SLOTS)]
        self._epochs = [-1] * SLOTS

    def add(self, key: Any) -> None:
        epoch = int(self._clock() / self._width)
        i = epoch % SLOTS
        slot = self._slots[i]
        if self._epochs[i] != epoch:
            slot.clear()
            self._epochs[i] = epoch
        slot[key] = slot.get(key, 0) + 1

    def totals(self) -> dict[Any, int]:
        now = int(self._clock() / self._width)
        out: dict[Any, int] = {}
        for epoch, slot in zip(self._epochs, self._slots, strict=True):
            if now - epoch < SLOTS:
                for key, n in slot.items():
                    out[key] = out.get(key, 0) + n
        return out


@dataclass(frozen=True, slots=True)
class Figure:
    ratio: float | None  # None: no requests of this category in the window
    requests: int
    commerce: int


class WeightError(ValueError):
    """New weights that cannot be applied; ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Migration:
    """Per-config migration state: measured traffic and the live weights of split routes."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        splitters: dict[str, Splitter],
        cluster_kinds: Mapping[str, str],
        category_weights: Mapping[str, float],
        window: float,
        guard: Guard,
        clock: Callable[[], float] = time.monotonic,
        counters: Mapping[tuple[str, str], Any] | None = None,
    ) -> None:
        self.routes = routes
        self._counters = dict(counters or {})  # (route, cluster) -> its category/kind child
        self.splitters = splitters
        self.weights: dict[str, tuple[Target, ...]] = {n: r.targets for n, r in routes.items()}
        self.kinds = cluster_kinds
        self.category_weights = dict(category_weights)
        self.window = window
        self.guard = guard
        self._served = SlidingCounter(window, clock)  # (route, cluster) -> requests

    def served(self, route: str, cluster: str) -> None:
        """Count one request of ``route`` answered by an upstream of ``cluster``."""
        self._served.add((route, cluster))
        child = self._counters.get((route, cluster))
        if child is not None:
            child.inc()

    # -- figures ---------------------------------------------------------------------------

    def progress(self) -> dict[str, Figure]:
        by_category: dict[str, list[int]] = {}
        for (route, cluster), n in self._served.totals().items():
            r = self.routes.get(route)
            if r is None or r.category not in self.category_weights:
                continue  # only the categories being migrated have a progress figure
            counts = by_category.setdefault(r.category, [0, 0])
            counts[0] += n
            if self.kinds.get(cluster) == "commerce":
                counts[1] += n
        return weighted(by_category, self.category_weights)

    def observed_shares(self) -> dict[str, dict[str, float]]:
        counts: dict[str, dict[str, int]] = {}
        for (route, cluster), n in self._served.totals().items():
            counts.setdefault(route, {})[cluster] = n
        return {
            route: {c: n / sum(per.values()) for c, n in per.items()}
            for route, per in counts.items()
        }

    def view(self) -> dict[str, Any]:
        """The JSON body of ``GET /migration``."""
        observed = self.observed_shares()
        served = self._served.totals()
        routes = {}
        for name, route in self.routes.items():
            if len(route.targets) < 2:
                continue
            routes[name] = {
                "category": route.category,
                "configured": {t.cluster: t.weight for t in route.targets},
                "weights": {t.cluster: t.weight for t in self.weights[name]},
                "observed": observed.get(name, {}),
                "requests": sum(n for (r, _), n in served.items() if r == name),
                "systems": {t.cluster: self.kinds.get(t.cluster) for t in route.targets},
            }
        progress = {
            c: {"ratio": f.ratio, "requests": f.requests, "commerce": f.commerce}
            for c, f in self.progress().items()
        }
        return {
            "window_seconds": self.window,
            "category_weights": self.category_weights,
            "progress": progress,
            "routes": routes,
        }

    # -- live weights ----------------------------------------------------------------------

    def apply(self, route_name: str, targets: tuple[Target, ...]) -> None:
        """Install live weights (already checked) for a split route."""
        self.splitters[route_name] = Splitter(route_name, targets)
        self.weights[route_name] = targets

    def set_weights(self, route_name: str, weights: Mapping[str, int], now: float) -> None:
        self.apply(route_name, check_weights(self.routes, self.guard, route_name, weights, now))


def check_weights(
    routes: Mapping[str, Route],
    guard: Guard,
    route_name: str,
    weights: Mapping[str, Any],
    now: float,
) -> tuple[Target, ...]:
    """The targets for new ``weights`` of a split route, or WeightError."""
    route = routes.get(route_name)
    if route is None:
        raise WeightError(f"no route named {route_name!r}", 404)
    names = [t.cluster for t in route.targets]
    if len(names) < 2:
        raise WeightError(f"route {route_name!r} has no split")
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise WeightError(f"route {route_name!r} does not split to {', '.join(unknown)}")
    for cluster, w in weights.items():
        if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= 10_000:
            raise WeightError(f"weight of {cluster!r} must be an integer 0..10000")
    targets = tuple(Target(c, int(weights.get(c, 0))) for c in names)
    if sum(t.weight for t in targets) == 0:
        raise WeightError("weights add up to 0")
    for t in targets:
        if t.weight > 0:
            refused = guard.check(route_name, t.cluster, now)
            if refused is not None:
                raise WeightError(
                    f"cluster {t.cluster!r} may not serve {route.category!r} now ({refused})",
                    422,
                )
    return targets


class PodProgress:
    """The pod's progress figure from the summed ``jalur_migration_requests_total``
    counters: samples kept over ``window`` seconds, the figure is the change between the
    oldest sample in the window and now (a counter reset -- a worker restarted -- restarts
    the window)."""

    def __init__(
        self,
        category_weights: Mapping[str, float],
        window: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.category_weights = dict(category_weights)
        self.window = window
        self.clock = clock
        self._samples: list[tuple[float, dict[tuple[str, str], float]]] = []

    def figures(self, counts: Mapping[tuple[str, str], float]) -> dict[str, Figure]:
        now = self.clock()
        samples = self._samples
        if samples and any(counts.get(k, 0.0) < v for k, v in samples[-1][1].items()):
            samples.clear()  # a counter went down: a process restarted
        if not samples:
            samples.append((now, {}))  # counting started with the first sample
        while len(samples) > 1 and samples[1][0] <= now - self.window:
            samples.pop(0)
        base = samples[0][1]
        samples.append((now, dict(counts)))
        by_category: dict[str, list[int]] = {}
        for (category, kind), value in counts.items():
            if category not in self.category_weights:
                continue
            n = int(value - base.get((category, kind), 0.0))
            pair = by_category.setdefault(category, [0, 0])
            pair[0] += n
            if kind == "commerce":
                pair[1] += n
        return weighted(by_category, self.category_weights)


def weighted(
    by_category: Mapping[str, list[int]], category_weights: Mapping[str, float]
) -> dict[str, Figure]:
    """Figures per category from [requests, commerce] counts, and ``all``: the weighted mean
    over the categories that had traffic."""
    figures = {
        c: Figure(commerce / total if total else None, total, commerce)
        for c, (total, commerce) in by_category.items()
    }
    for category in category_weights:
        figures.setdefault(category, Figure(None, 0, 0))
    measured = [
        (w, figures[c].ratio)
        for c, w in category_weights.items()
        if figures[c].ratio is not None and w > 0
    ]
    weight = sum(w for w, _ in measured)
    total = sum(w * r for w, r in measured if r is not None) / weight if weight else None
    figures["all"] = Figure(
        total,
        sum(figures[c].requests for c in category_weights),
        sum(figures[c].commerce for c in category_weights),
    )
    return figures
