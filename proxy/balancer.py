"""Load-balancing strategies: which endpoint of a cluster takes the next attempt.

A strategy is a small class behind a name (``BALANCERS``, keyed by ``config.LbPolicy``,
the way uvicorn maps ``--loop`` names to setups). It is built once per cluster at config
load with every endpoint of the cluster, and then only answers ``pick(candidates, key)``:

- ``candidates`` is the non-empty tuple of endpoints that may take the attempt now (the
  healthy ones, minus those a retry already tried). It is owned by ``health`` and only
  rebuilt when an endpoint changes state, so a pick allocates nothing.
- ``key`` is the request's hash key (``cluster.hash_on``), or None.

``round_robin``  cycles through the candidates.
``random``       uniform choice.
``least_request`` power of two choices: two distinct random candidates, the one with fewer
                 attempts in flight wins (with two endpoints: always the less busy one).
``hash``         consistent hashing on a ring with ``VNODES`` points per endpoint (BLAKE2b,
                 the same in every worker process): a key maps to the first point clockwise
                 whose endpoint is a candidate, so removing an endpoint moves only its keys
                 and adding one to N moves about 1/(N+1) of them. A request without the key
                 gets a random candidate.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Protocol

from . import config as cfg

if TYPE_CHECKING:
    from .health import EndpointState

__all__ = [
    "BALANCERS",
    "VNODES",
    "Balancer",
    "HashRing",
    "LeastRequest",
    "Random",
    "RoundRobin",
    "make_balancer",
    "ring_hash",
]

# Points per endpoint on the hash ring: enough that the share of keys per endpoint stays
# within a few percent of 1/N for the cluster sizes a proxy sees.
VNODES: Final = 160


class Balancer(Protocol):
    def __init__(self, hosts: Sequence[EndpointState]) -> None: ...

    def pick(self, candidates: Sequence[EndpointState], key: str | None) -> EndpointState:
        """One of ``candidates`` (never empty)."""
        ...


class RoundRobin:
    __slots__ = ("_next",)

    def __init__(self, hosts: Sequence[EndpointState]) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[EndpointState], key: str | None) -> EndpointState:
        i = self._next
        self._next = i + 1
        return candidates[i % len(candidates)]


class Random:
    __slots__ = ()

    def __init__(self, hosts: Sequence[EndpointState]) -> None:
        pass

    def pick(self, candidates: Sequence[EndpointState], key: str | None) -> EndpointState:
        return candidates[int(random.random() * len(candidates))]


class LeastRequest:
    __slots__ = ()

    def __init__(self, hosts: Sequence[EndpointState]) -> None:
        pass

    def pick(self, candidates: Sequence[EndpointState], key: str | None) -> EndpointState:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        i = int(random.random() * n)
        j = int(random.random() * (n - 1))
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        return b if b.active < a.active else a


def ring_hash(data: str) -> int:
    """The 64-bit ring position of ``data`` (stable across processes and restarts)."""
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class HashRing:
    __slots__ = ("_hosts", "_points", "_size")

    def __init__(self, hosts: Sequence[EndpointState]) -> None:
        ring = sorted(
            (ring_hash(f"{h.endpoint.url}#{v}"), i)
            for i, h in enumerate(hosts)
            for v in range(VNODES)
        )
        self._points = [p for p, _ in ring]
        self._hosts = tuple(hosts[i] for _, i in ring)
        self._size = len(ring)

    def pick(self, candidates: Sequence[EndpointState], key: str | None) -> EndpointState:
        if key is None:
            return candidates[int(random.random() * len(candidates))]
        i = bisect.bisect_left(self._points, ring_hash(key))
        hosts, size = self._hosts, self._size
        for step in range(size):
            host = hosts[(i + step) % size]
            if host in candidates:
                return host
        return candidates[0]  # unreachable: every candidate is on the ring


BALANCERS: Final[dict[cfg.LbPolicy, type[Balancer]]] = {
    "round_robin": RoundRobin,
    "least_request": LeastRequest,
    "random": Random,
    "hash": HashRing,
}


def make_balancer(policy: cfg.LbPolicy, hosts: Sequence[EndpointState]) -> Balancer:
    return BALANCERS[policy](hosts)
