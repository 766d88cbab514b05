"""Weighted, sticky choice of a cluster among a route's targets.

Invariant: with a sticky key, the choice is a pure function of (route salt, user key,
weights): a stable hash (BLAKE2b, not Python's randomised ``hash``) maps the key to a bucket
in [0, BUCKETS), and the buckets are laid out in the targets' config order. Every replica
and every restart agrees, with no shared state; raising the weight of the last target moves
only the users whose buckets change hands and moves none back (a monotonic ramp).
Without a key, each request draws its own bucket.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from hashlib import blake2b
from typing import Final

from .router import Target

# Resolution of a split: weights are laid out over this many buckets (0.01 % each).
BUCKETS: Final = 10_000


class Splitter:
    __slots__ = ("_bounds", "_clusters", "_rand", "_salt", "single")

    def __init__(self, salt: str, targets: Sequence[Target]) -> None:
        total = sum(t.weight for t in targets)
        if total <= 0:
            raise ValueError("weights add up to 0")
        self._salt = salt.encode() + b"\x00"
        self._clusters = tuple(t.cluster for t in targets)
        bounds, acc = [], 0
        for t in targets:
            acc += t.weight
            bounds.append(acc * BUCKETS // total)
        self._bounds = tuple(bounds)
        live = [t.cluster for t in targets if t.weight > 0]
        self.single: str | None = live[0] if len(live) == 1 else None
        self._rand = random.Random()

    def bucket(self, key: str) -> int:
        digest = blake2b(self._salt + key.encode("utf-8", "surrogateescape"), digest_size=8)
        return int.from_bytes(digest.digest(), "big") % BUCKETS

    def choose(self, key: str | None) -> str:
        if self.single is not None:
            return self.single
        b = self.bucket(key) if key else self._rand.randrange(BUCKETS)
        return self._clusters[bisect_right(self._bounds, b)]
