"""Load shapes for ``locustfile.py`` (select one with ``JALUR_LOADTEST_SHAPE=step|migration``).

Both read Locust's common options (``-u`` users, ``-r`` spawn rate, ``-t`` run time), so every
run stays bounded by ``--run-time`` whatever the shape.

* ``StepLoadShape``: add ``JALUR_LOADTEST_STEP_USERS`` users (default: a fifth of ``-u``)
  every ``JALUR_LOADTEST_STEP_SECONDS`` (default: a sixth of the run time) until ``-u`` is
  reached, then hold.
* ``MigrationRampShape``: a steady ``-u`` shoppers while a split route is moved to its
  commerce cluster through the admin API, only ever forward: from the live share at the start
  to halfway to 100 % (a third of the run time) and to 100 % (two thirds); no shopper is moved
  back. The proxy's own view of
  the migration (``GET /migration``: live weights, the share of the route served by commerce,
  the progress figures) is sampled at the end of each step and every 5 s. Each weight change
  is recorded in Locust's stats as request type ``ADMIN`` (``migration checkout 10%`` ...), so
  a refused change fails the run like any failed request. With sticky splits, and the legacy
  cluster allowed inside its transition window (see ``locustfile.py``), the whole ramp must
  run with zero failures.
* ``MigrationRollbackDrillShape`` (``JALUR_LOADTEST_SHAPE=rollback``): the on-call drill: ramp to
  95 %, an explicit, audited rollback to 80 % (``"rollback": true``) at a third of the run
  time, then forward to 100 % at two thirds; a step back without the flag would be refused.

Admin API used (``JALUR_LOADTEST_ADMIN_URL``, default ``http://127.0.0.1:9901``; bearer token from
``JALUR_LOADTEST_ADMIN_TOKEN``, default ``jalur-demo-token``, the demo config's):

* ``GET /config``: which route to migrate: ``JALUR_LOADTEST_MIGRATION_ROUTE``, or else the
  first route whose split names a cluster in ``compliance.legacy_clusters`` (or of a social
  system): the
  demo's ``checkout`` (``shop-legacy`` 13, ``tokopedia-pay`` 87). Its legacy/social clusters
  are migrated *from*, the others *to*. Without a readable config: route ``payment``,
  ``JALUR_LOADTEST_MIGRATION_FROM`` / ``JALUR_LOADTEST_MIGRATION_TO`` (default ``shop-legacy`` /
  ``tokopedia-pay``).
* ``POST /migration/{route}`` ``{"weights": {"shop-legacy": 90, "tokopedia-pay": 10}}`` -> 200.
* ``GET /migration`` -> ``{"progress": {"payment": {"ratio": 0.9, ...}, ..., "all": {...}},
  "routes": {"checkout": {"weights": ..., "observed": ..., "systems": ...}}}``.

``JALUR_LOADTEST_MIGRATION_LOG``: a file to write the samples to (JSON), for ``run.py``'s summary.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any

from locust import LoadTestShape

log = logging.getLogger("jalur.shapes")

ADMIN_URL = os.environ.get("JALUR_LOADTEST_ADMIN_URL", "http://127.0.0.1:9901").rstrip("/")
ADMIN_TOKEN = os.environ.get("JALUR_LOADTEST_ADMIN_TOKEN", "jalur-demo-token")


def _common(shape: LoadTestShape) -> tuple[int, float, float]:
    """``(users, spawn_rate, run_time_seconds)`` from Locust's command line (with defaults)."""
    opts = shape.runner.environment.parsed_options if shape.runner else None
    users = int(getattr(opts, "num_users", None) or 50)
    rate = float(getattr(opts, "spawn_rate", None) or 10)
    run_time = float(getattr(opts, "run_time", None) or 60)
    return users, rate, run_time


class StepLoadShape(LoadTestShape):
    """Ramp users up in equal steps, then hold until the run time is over."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        users, rate, run_time = _common(self)
        now = self.get_run_time()
        if now >= run_time:
            return None
        step_users = int(os.environ.get("JALUR_LOADTEST_STEP_USERS", 0)) or max(1, users // 5)
        step_seconds = float(os.environ.get("JALUR_LOADTEST_STEP_SECONDS", 0)) or max(
            1.0, run_time / 6
        )
        return min(users, (int(now // step_seconds) + 1) * step_users), rate


def _admin(method: str, path: str, body: Any = None) -> tuple[int, Any, float]:
    """One admin call: ``(status, decoded JSON or text, milliseconds)``; status 0 if unreachable."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(ADMIN_URL + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except OSError as exc:
        return 0, str(exc), (time.perf_counter() - start) * 1000
    ms = (time.perf_counter() - start) * 1000
    try:
        return status, json.loads(raw), ms
    except ValueError:
        return status, raw.decode("utf-8", "replace"), ms


class MigrationRampShape(LoadTestShape):
    """Steady shoppers while a split route moves 10 % -> 50 % -> 100 % to commerce."""

    use_common_options = True
    sample_every = 5.0

    @staticmethod
    def plan(start: int) -> tuple[tuple[float, int, bool], ...]:
        """(share of the run time, commerce percent, rollback) steps from the live
        ``start`` percent: only forward."""
        return ((1 / 3, max(start, (start + 100) // 2), False), (2 / 3, 100, False))

    def __init__(self) -> None:
        super().__init__()
        self.route = os.environ.get("JALUR_LOADTEST_MIGRATION_ROUTE", "")
        self.category = self.route
        self.sources = [os.environ.get("JALUR_LOADTEST_MIGRATION_FROM", "shop-legacy")]
        self.targets = [os.environ.get("JALUR_LOADTEST_MIGRATION_TO", "tokopedia-pay")]
        self.reset_time()

    def reset_time(self) -> None:
        super().reset_time()
        self._prepared = False
        self._done = 0
        self._last_sample = 0.0
        self.samples: list[dict[str, Any]] = []
        self.steps: tuple[tuple[float, int, bool], ...] = ()

    def _record(self, name: str, status: int, payload: Any, ms: float, ok: bool) -> None:
        """Put an admin call into Locust's stats (request type ``ADMIN``)."""
        if self.runner is None:
            return
        exc = None if ok else RuntimeError(f"HTTP {status} {str(payload)[:200]}")
        self.runner.environment.events.request.fire(
            request_type="ADMIN",
            name=name,
            response_time=ms,
            response_length=len(json.dumps(payload)) if payload is not None else 0,
            exception=exc,
            context={},
        )

    def _prepare(self) -> None:
        """Find the route and its clusters in ``GET /config`` (else keep the env defaults)."""
        self._prepared = True
        status, conf, _ms = _admin("GET", "/config")
        if status != 200 or not isinstance(conf, dict):
            self.route = self.route or "payment"
            log.warning(
                "migration: GET /config -> %s; %s: %s -> %s",
                status,
                self.route,
                self.sources,
                self.targets,
            )
            return
        legacy = set((conf.get("compliance") or {}).get("legacy_clusters") or [])
        systems = conf.get("systems") or {}
        clusters = conf.get("clusters") or {}

        def is_source(name: str) -> bool:
            system = (clusters.get(name) or {}).get("system")
            return name in legacy or (systems.get(system) or {}).get("kind") == "social"

        routes = [r for r in conf.get("routes") or [] if r.get("split")]
        if not self.route:  # the first split route that still names a legacy cluster
            self.route = next(
                (r["name"] for r in routes if any(is_source(t["cluster"]) for t in r["split"])),
                "payment",
            )
        route = next((r for r in routes if r.get("name") == self.route), None)
        if route is None:
            log.warning("migration: route %r has no split in the proxy's config", self.route)
            return
        self.category = route.get("category", self.route)
        names = [t["cluster"] for t in route["split"]]
        self.sources = [n for n in names if is_source(n)] or self.sources
        self.targets = [n for n in names if not is_source(n)] or self.targets
        log.info("migration: route %s: %s -> %s", self.route, self.sources, self.targets)

    def _live_percent(self) -> int:
        """The commerce share of the route's live weights, in whole percent (0 if unknown)."""
        status, payload, _ms = _admin("GET", "/migration")
        view = ((payload or {}).get("routes") or {}).get(self.route) if status == 200 else None
        if not isinstance(view, dict):
            return 0
        weights, kinds = view.get("weights") or {}, view.get("systems") or {}
        total = sum(weights.values())
        commerce = sum(w for c, w in weights.items() if kinds.get(c) == "commerce")
        return -(-100 * commerce // total) if total else 0  # rounded up: never a step back

    def _set_weights(self, percent: int, rollback: bool = False) -> None:
        weights: dict[str, int] = {}
        for name in self.sources:
            weights[name] = (100 - percent) // len(self.sources)
        for name in self.targets:
            weights[name] = percent // len(self.targets)
        body = {"weights": weights, "rollback": rollback, "actor": "locust", "why": "load test"}
        status, payload, ms = _admin("POST", f"/migration/{self.route}", body)
        what = "rollback" if rollback else "migration"
        self._record(f"{what} {self.route} {percent}%", status, payload, ms, status == 200)
        log.info("migration: %s weights %s -> HTTP %s", self.route, weights, status)

    def _sample(self) -> None:
        """Read ``GET /migration``: the route's live weights, the share of it served by commerce
        and the progress figures, all measured by the proxy over its sliding window."""
        status, payload, _ms = _admin("GET", "/migration")
        self._last_sample = self.get_run_time()
        if status != 200 or not isinstance(payload, dict):
            log.warning("migration: GET /migration -> %s %s", status, str(payload)[:200])
            return
        progress = payload.get("progress") or {}

        def ratio(figure: Any) -> Any:
            return figure.get("ratio") if isinstance(figure, dict) else figure

        view = (payload.get("routes") or {}).get(self.route) or {}
        kinds = view.get("systems") or {}
        observed = view.get("observed") or {}
        served = sum(share for c, share in observed.items() if kinds.get(c) == "commerce")
        weights = view.get("weights") or {}
        total_w = sum(weights.values())
        sample = {
            "t": round(self._last_sample, 1),
            "weight_percent": round(
                100 * sum(w for c, w in weights.items() if kinds.get(c) == "commerce") / total_w
            )
            if total_w
            else None,
            "route_commerce_share": round(served, 3) if observed else None,
            "category_ratio": ratio(progress.get(self.category)),
            "all_ratio": ratio(progress.get("all", payload.get("all"))),
        }
        self.samples.append(sample)
        log.info("migration: %s", sample)
        path = os.environ.get("JALUR_LOADTEST_MIGRATION_LOG")
        if path:
            with open(path, "w") as out:
                json.dump(
                    {"route": self.route, "category": self.category, "samples": self.samples},
                    out,
                    indent=1,
                )

    def tick(self) -> tuple[int, float] | None:
        users, rate, run_time = _common(self)
        now = self.get_run_time()
        if not self._prepared:
            # The first tick starts the users; Locust clears its stats then, so the first
            # weight change (recorded in those stats) waits for the next tick.
            self._prepare()
            return users, rate
        if now >= run_time:
            self._sample()
            return None
        if not self.steps:
            start = self._live_percent()
            self.steps = self.plan(start)
        while self._done < len(self.steps) and now >= self.steps[self._done][0] * run_time:
            if self._done:
                self._sample()  # closes the previous step
            self._done += 1
            _, percent, rollback = self.steps[self._done - 1]
            self._set_weights(percent, rollback)
        if now - self._last_sample >= self.sample_every:
            self._sample()
        return users, rate


class MigrationRollbackDrillShape(MigrationRampShape):
    """Ramp to 95 %, roll back to 80 % on purpose (audited), then forward to 100 %."""

    @staticmethod
    def plan(start: int) -> tuple[tuple[float, int, bool], ...]:
        return ((0.0, max(start, 95), False), (1 / 3, 80, True), (2 / 3, 100, False))
