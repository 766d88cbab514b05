"""One migration for the whole fleet: live split weights in the shared store.

Invariants:
- The live weights of every split route are one record per route in the fleet's ``store``
  (Redis for several replicas; with ``store.kind: memory`` one pod: a file in the workers'
  shared directory under ``--workers N``, else this process). A record is versioned and says
  who changed it, when and why. Every process polls the store every ``POLL_INTERVAL``
  seconds and applies what changed: a change made on any replica or worker is served by all
  of them within ``POLL_INTERVAL`` plus one store round trip.
- **Monotonic ramp.** The commerce share of a route (the summed weight of its clusters
  owned by a ``kind: commerce`` system) never goes down except by an explicit rollback: an
  admin call with ``rollback: true`` or a route with ``split_rollback: true`` in the file.
  A reload, a restart or a config edit whose weights give commerce a smaller share than the
  live one leaves the live weights in place (``held_back`` in ``GET /migration`` and the
  gauge ``jalur_migration_weights_held``). A file edit that gives commerce a larger share
  ramps forward and becomes the live record; a file that did not change since the live
  record was written changes nothing (so a restart never undoes an operator's rollback).
  Only the process that owns the admin listener (a single process, or the supervisor, before
  it signals its workers) writes; workers follow the store.
- Users move only between the bands that change: the splitter lays buckets out in the
  route's config order (``split.Splitter``), so lowering commerce from 90 to 80 moves exactly
  the users whose buckets lie in the 10 % given back.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import msgspec

from . import config as cfg
from .compliance import Guard
from .migration import check_weights
from .router import Route, Target
from .store import StoreError, call, redis_client

log = logging.getLogger("jalur.fleet")

# Seconds between two reads of the live weights: a change made anywhere reaches every
# process within this (the bound is 2 s, with a store round trip to spare).
POLL_INTERVAL: Final = 1.0
# Shares closer than this are equal (weights are integers over at most 10,000 buckets).
EPSILON: Final = 1e-9
# The record file of a pod's workers under --workers N with the memory store.
STATE_FILE: Final = "jalur-migration.json"


class LiveWeights(msgspec.Struct, frozen=True):
    route: str
    weights: dict[str, int]
    version: int
    commerce_share: float
    actor: str
    reason: str
    at: float  # Unix seconds
    rollback: bool = False
    # The config file's weights when this record was written: the file ramps forward (or
    # rolls back where it says so) only when it changes, so a restart after an operator's
    # rollback does not undo it.
    file_weights: dict[str, int] = {}


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(LiveWeights).decode


class WeightStore(Protocol):
    async def load(self) -> dict[str, LiveWeights]: ...
    async def save(self, record: LiveWeights) -> bool:
        """Write ``record`` if the stored one still has version ``record.version - 1``."""
        ...

    async def close(self) -> None: ...


class MemoryWeights:
    """One process."""

    def __init__(self) -> None:
        self.records: dict[str, LiveWeights] = {}

    async def load(self) -> dict[str, LiveWeights]:
        return dict(self.records)

    async def save(self, record: LiveWeights) -> bool:
        old = self.records.get(record.route)
        if (old.version if old is not None else 0) != record.version - 1:
            return False
        self.records[record.route] = record
        return True

    async def close(self) -> None:
        return None


class FileWeights:
    """One pod's workers (``--workers N`` with the memory store): a JSON file in the
    directory the supervisor shares with its workers, written under an exclusive lock and
    replaced atomically."""

    def __init__(self, directory: str) -> None:
        self.path = Path(directory) / STATE_FILE
        self.lock = Path(directory) / (STATE_FILE + ".lock")

    def _read(self) -> dict[str, LiveWeights]:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"migration state file: {exc}") from exc
        return {name: msgspec.convert(rec, LiveWeights) for name, rec in raw.items()}

    async def load(self) -> dict[str, LiveWeights]:
        return await asyncio.to_thread(self._read)

    def _save(self, record: LiveWeights) -> bool:
        with self.lock.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = self._read()
            old = records.get(record.route)
            if (old.version if old is not None else 0) != record.version - 1:
                return False
            records[record.route] = record
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(msgspec.json.encode(records))
            tmp.replace(self.path)
            return True

    async def save(self, record: LiveWeights) -> bool:
        return await asyncio.to_thread(self._save, record)

    async def close(self) -> None:
        return None


# KEYS: the hash. ARGV: route, expected version, record JSON. Compare-and-set on version.
_CAS: Final = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local version = 0
if old then version = cjson.decode(old)['version'] end
if version ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


class RedisWeights:
    """The fleet: one hash, a field per route."""

    def __init__(self, url: str, timeout: float, key: str = "jalur:migration") -> None:
        self.key = key
        self._redis = redis_client(url, timeout)
        self._cas = self._redis.register_script(_CAS)

    async def load(self) -> dict[str, LiveWeights]:
        raw = await call(self._redis.hgetall(self.key))
        try:
            return {k.decode(): _decode(v) for k, v in raw.items()}
        except (msgspec.DecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise StoreError("redis: undecodable migration record") from exc

    async def save(self, record: LiveWeights) -> bool:
        done = await call(
            self._cas(keys=[self.key], args=[record.route, record.version - 1, _encode(record)])
        )
        return bool(done)

    async def close(self) -> None:
        await self._redis.aclose()


def make_weight_store(spec: cfg.Store, shared_dir: str | None) -> WeightStore:
    """``shared_dir``: the directory a supervisor shares with its workers, if any."""
    if spec.kind == "redis":
        return RedisWeights(spec.url, spec.timeout)
    if shared_dir:
        return FileWeights(shared_dir)
    return MemoryWeights()


def commerce_share(weights: Mapping[str, int], kinds: Mapping[str, str]) -> float:
    total = sum(weights.values())
    commerce = sum(w for c, w in weights.items() if kinds.get(c) == "commerce")
    return commerce / total if total else 0.0


class RampError(ValueError):
    """A weight change that is refused; ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


Apply = Callable[[str, tuple[Target, ...]], None]


class _Unjudged:
    """``Fleet._write`` was given no record to compare against: it reads the current one."""


UNJUDGED: Final = _Unjudged()


class Fleet:
    """Reads, reconciles and writes the live weights of one process's split routes."""

    def __init__(self, store: WeightStore, audit: Callable[[dict[str, Any]], None]) -> None:
        self.store = store
        self.audit = audit
        self.records: dict[str, LiveWeights] = {}
        self.held: dict[str, bool] = {}  # route -> the file's weights are below the live ones

    async def reconcile(
        self,
        routes: Mapping[str, Route],
        kinds: Mapping[str, str],
        apply: Apply,
        *,
        write: bool,
    ) -> None:
        """Bring ``routes`` (one config's) to the live weights: read the store, let the
        file ramp forward (or roll back where it says so), keep the live weights otherwise,
        and ``apply`` the outcome. Only a process that ``write``\\ s records the file's
        weights (the supervisor or a single process; workers follow)."""
        records = await self.store.load()
        for name, route in routes.items():
            if len(route.targets) < 2:
                continue
            file_weights = {t.cluster: t.weight for t in route.targets}
            file_share = commerce_share(file_weights, kinds)
            live = records.get(name)
            if live is None and name in self.records:
                # The store lost the record (a restart without persistence): the weights
                # this process last applied stay, and it puts them back (compare-and-set:
                # one process of the fleet wins, the others read its record next time).
                live = self.records[name]
                if live.version > 0:
                    restored = await self._write(
                        name,
                        live.weights,
                        kinds,
                        live.actor,
                        "restored after the store lost it",
                        live.rollback,
                        live.file_weights,
                    )
                    live = restored or live
            chosen: dict[str, int] = file_weights
            if live is not None and set(live.weights) == set(file_weights):
                chosen = live.weights
                changed = file_weights != live.file_weights
                rollback = route.spec.split_rollback and file_weights != live.weights
                forward = file_share > live.commerce_share + EPSILON
                if write and changed and (rollback or forward):
                    why = "rollback in the config file" if rollback else "config file ramp"
                    written = await self._write(
                        name,
                        file_weights,
                        kinds,
                        "config",
                        why,
                        rollback,
                        file_weights,
                        judged=records.get(name),
                    )
                    live = written or live
                    chosen = live.weights
            elif write:
                why = "first load" if live is None else "the split names other clusters"
                live = await self._write(
                    name, file_weights, kinds, "config", why, False, file_weights
                )
            if live is not None:
                self.records[name] = live
            self.held[name] = file_share < commerce_share(chosen, kinds) - EPSILON
            apply(name, tuple(Target(c, chosen[c]) for c in file_weights))

    async def _write(
        self,
        route: str,
        weights: Mapping[str, int],
        kinds: Mapping[str, str],
        actor: str,
        reason: str,
        rollback: bool,
        file_weights: Mapping[str, int] | None = None,
        peer: str | None = None,
        judged: LiveWeights | _Unjudged | None = UNJUDGED,
    ) -> LiveWeights | None:
        """Write a new version; None when another process wrote first (the next poll reads
        the winner). ``file_weights``: the config file's, if this write comes from it.
        ``judged``: the record the caller decided on (None: none existed): the write is then
        a compare-and-set against exactly that version, so a change made in between is
        never overwritten by a decision that did not see it."""
        old = (await self.store.load()).get(route) if isinstance(judged, _Unjudged) else judged
        if file_weights is None:
            file_weights = old.file_weights if old is not None else {}
        record = LiveWeights(
            route=route,
            weights=dict(weights),
            version=(old.version if old is not None else 0) + 1,
            commerce_share=commerce_share(weights, kinds),
            actor=actor,
            reason=reason,
            at=time.time(),
            rollback=rollback,
            file_weights=dict(file_weights),
        )
        if not await self.store.save(record):
            return None
        if old is None:
            return record  # the first record of a route is its baseline, not a change
        decision = "migration-rollback" if rollback else "weights-changed"
        self.audit(
            {
                "decision": decision,
                "route": route,
                "weights": dict(weights),
                "commerce_share": record.commerce_share,
                "previous": old.weights if old is not None else None,
                "version": record.version,
                "actor": actor,
                "why": reason,
                "peer": peer,
            }
        )
        return record

    async def ramp(
        self,
        routes: Mapping[str, Route],
        guard: Guard,
        kinds: Mapping[str, str],
        route_name: str,
        weights: Mapping[str, Any],
        now: float,
        *,
        actor: str,
        reason: str,
        rollback: bool,
        peer: str | None = None,
    ) -> tuple[Target, ...]:
        """An operator's change, checked (``migration.check_weights``: WeightError) and
        written; the targets to apply. A smaller commerce share than the live one is refused
        unless ``rollback``. Raises RampError or StoreError."""
        targets = check_weights(routes, guard, route_name, weights, now)
        route = routes[route_name]
        weights = {t.cluster: t.weight for t in targets}
        for _ in range(3):  # another writer may win the compare-and-set: read and judge again
            live = (await self.store.load()).get(route.name)
            share = commerce_share(weights, kinds)
            if live is not None and share < live.commerce_share - EPSILON and not rollback:
                raise RampError(
                    f"these weights give commerce {share:.2%} of route {route.name!r}, below "
                    f"the live {live.commerce_share:.2%}: shoppers would move back; send "
                    '"rollback": true to do that on purpose'
                )
            written = await self._write(
                route.name, weights, kinds, actor, reason, rollback, peer=peer, judged=live
            )
            if written is not None:
                self.records[route.name] = written
                self.held[route.name] = False  # the operator's weights are the live ones
                return targets
        raise RampError("the live weights kept changing; try again", 503)

    def view(self, route: str) -> dict[str, Any] | None:
        record = self.records.get(route)
        if record is None:
            return None
        out = msgspec.to_builtins(record)
        out["held_back"] = self.held.get(route, False)
        return dict(out)


async def poll(fleet: Fleet, refresh: Callable[[], Any]) -> None:
    """Run ``refresh`` (a reconcile of the current state) every POLL_INTERVAL seconds;
    a store error keeps the weights last applied (logged once per outage)."""
    failing = False
    while True:
        await asyncio.sleep(POLL_INTERVAL)
        try:
            await refresh()
        except StoreError as exc:
            if not failing:
                log.error("migration weights: store unreachable, keeping the last ones: %s", exc)
            failing = True
        else:
            if failing:
                log.info("migration weights: store reachable again")
            failing = False


__all__ = [
    "POLL_INTERVAL",
    "Fleet",
    "LiveWeights",
    "RampError",
    "StoreError",
    "commerce_share",
    "make_weight_store",
    "poll",
]
