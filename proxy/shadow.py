"""Shadow traffic: a copy of a request sent to another cluster, compared, never returned.

Invariants:
- The client's response and latency never depend on the shadow: the copy is sent after the
  real response is complete, from a background task, and its errors are only counted.
- Only safe methods (GET, HEAD, OPTIONS) are copied unless the shadow cluster is marked
  ``sandbox: true`` (a cluster with no real side effects): a payment is never executed by
  a shadow.
- At most ``migration.max_shadow_in_flight`` copies are in flight per process; beyond
  that a copy is dropped and counted (``outcome="dropped"``), so a slow shadow cluster
  cannot grow memory or tasks without bound.
- A copy passes the same compliance guard and boundary rules as a real request to the
  shadow cluster's system (``outcome="blocked"`` when the guard refuses it).
- Outcomes: ``match`` (same status and, with ``compare_body``, the same body SHA-256),
  ``mismatch``, ``error`` (the shadow could not be reached or answered), ``dropped``,
  ``blocked``: ``jalur_shadow_total{route,outcome}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

from multidict import CIMultiDict

from . import errors
from .boundary import Boundary
from .config import Shadow
from .upstream import ClusterRuntime

log = logging.getLogger("jalur.shadow")

SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
SHADOW_HEADER: Final = "x-jalur-shadow"


@dataclass(frozen=True, slots=True)
class Plan:
    """A route's shadow, resolved at config load."""

    spec: Shadow
    cluster: ClusterRuntime
    threshold: float  # a request is copied when random() < threshold

    def wants(self, method: str, content_length: int | None, has_body: bool) -> bool:
        if random.random() >= self.threshold:
            return False
        if method not in SAFE_METHODS and not self.cluster.spec.sandbox:
            return False
        if not has_body:
            return True
        return content_length is not None and content_length <= self.spec.max_body_bytes

    def copy(
        self, boundary: Boundary, route: str, method: str, target: str, headers: CIMultiDict[str]
    ) -> Copy:
        """The copy of a request whose forwarded headers are ``headers`` (before the
        boundary's scrub for the real target): scrubbed for the shadow's own system."""
        copied = headers.copy()
        boundary.scrub(copied, self.cluster.system)
        copied[SHADOW_HEADER] = "true"
        digest = hashlib.sha256() if self.spec.compare_body else None
        return Copy(self, route, method, target, copied, bytearray(), digest)


@dataclass(slots=True)
class Copy:
    """What the shadow needs from one request, collected while the real one runs."""

    plan: Plan
    route: str
    method: str
    target: str
    headers: CIMultiDict[str]
    body: bytearray
    digest: hashlib._Hash | None  # the real response body's SHA-256, when compared
    status: int = 0


class Shadower:
    """Runs shadow copies in the background with a bound on how many are in flight."""

    def __init__(self, limit: int, count: Callable[[str, str], None]) -> None:
        self.limit = limit
        self.count = count  # (route, outcome)
        self.in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, copy: Copy, guard_refusal: str | None) -> None:
        if guard_refusal is not None:
            self.count(copy.route, "blocked")
            return
        if self.in_flight >= self.limit:
            self.count(copy.route, "dropped")
            return
        self.in_flight += 1
        self._idle.clear()
        task = asyncio.create_task(self._run(copy))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, copy: Copy) -> None:
        try:
            outcome = await self._exchange(copy)
        except Exception:  # a shadow must never take anything else down
            log.exception("shadow copy of route %s failed", copy.route)
            outcome = "error"
        self.count(copy.route, outcome)
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no copy is in flight (every submitted copy has been counted)."""
        await self._idle.wait()

    async def _exchange(self, copy: Copy) -> str:
        cluster = copy.plan.cluster
        body = bytes(copy.body)

        async def stream() -> AsyncIterator[bytes]:
            yield body

        try:
            resp = await cluster.transport.send(
                cluster.pick(),
                copy.method,
                copy.target,
                copy.headers,
                stream() if body else None,
            )
        except errors.ProxyError:
            return "error"
        digest = hashlib.sha256() if copy.digest is not None else None
        try:
            while chunk := await resp.read_chunk():
                if digest is not None:
                    digest.update(chunk)
        except errors.ProxyError:
            resp.close()
            return "error"
        resp.release()
        if resp.status != copy.status:
            return "mismatch"
        if digest is not None and copy.digest is not None:
            return "match" if digest.digest() == copy.digest.digest() else "mismatch"
        return "match"

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
