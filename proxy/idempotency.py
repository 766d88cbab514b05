"""Payment idempotency: a keyed payment is executed at most once, whatever happens to it.

The rule (docs/payments.md): **once any byte of a keyed request has been
written to an upstream, that key is consumed for its ``ttl``: the request is never forwarded
again, by Jalur's retries or by the client's.**

For non-idempotent methods (POST, PATCH) on routes with an idempotency policy (by default
every ``payment`` route), per (route, identity, key):

- no key where the policy requires one: 400 (``missing``); a key over 255 bytes or with
  bytes outside visible ASCII: 400 (``invalid``);
- the first request takes an in-flight lock (a record plus a short *lease* the holder renews
  while it runs) and is forwarded;
- a complete upstream answer of any status, 5xx included, is stored for ``ttl`` and replayed
  to repeats with ``Idempotent-Replayed: true`` (``stored`` / ``replayed``);
- an attempt that ended without a complete answer after bytes were sent (timeout, reset,
  an answer cut mid-body) is stored as *outcome unknown* (``unknown``): repeats get a replay
  of that (JSON ``reason: outcome_unknown``), never a second execution;
- a request refused before any byte reached an upstream (connect failed, circuit open, no
  healthy endpoint, Jalur's own 4xx) releases the key (``released``);
- a repeat while the first is in flight: 409 (``conflict``), or it waits for the answer;
- a lock whose holder died (its lease ran out, ``store.lease_ttl``) is outcome unknown;
- the same key with another request: 422 (``mismatch``);
- the store unreachable or answering garbage: 503, nothing forwarded (``store_error``);
- the memory store full (no record is ever evicted before its ttl): 503 (``full``).

The identity is a digest of every header and cookie the route's target systems own plus
``Authorization``: never a header the client picks on its own. Requests without identity
share a scope only with each other.

Stores (``store.kind``): ``memory`` (one process; refused with ``--workers N``) and ``redis``
(the fleet). Redis keeps a *fence* hash; a process that finds the fence gone or replaced
while it knew one concludes the store lost its data (a restart without persistence) and
marks the fence: for ``store.lost_data_quarantine`` seconds afterwards, keys not found are
recorded as outcome unknown instead of being forwarded, so a payment in flight across the
loss is not executed again. Locks held across the loss are re-created by their holders' next
lease renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import msgspec

from . import config as cfg
from .store import StoreError, call, redis_client

__all__ = [
    "NON_IDEMPOTENT",
    "Begin",
    "Gate",
    "Identity",
    "MemoryStore",
    "RedisStore",
    "Store",
    "StoreError",
    "Stored",
    "Ticket",
    "fingerprint",
    "gates",
    "identity_digest",
    "key_problem",
    "make_store",
    "policy_of",
    "route_identity",
    "scope_of",
]

# Renewals per lease (store.lease_ttl): a store hiccup shorter than four renewal periods
# does not lose a lease.
RENEWALS_PER_LEASE: Final = 5
# Seconds a settling request waits for its lease renewal to stop before it stores its outcome
# anyway (the renewal only extends a lease; it cannot overwrite a result).
RENEWER_STOP: Final = 0.5
REPLAYED_HEADER: Final = "Idempotent-Replayed"
# Longest Idempotency-Key accepted (the draft suggests UUIDs; this bounds store keys).
MAX_KEY: Final = 255


# Methods the gate applies to: the ones HTTP does not make idempotent.
NON_IDEMPOTENT: Final = frozenset({"POST", "PATCH"})
# The category whose routes get the default policy when they do not configure one.
IDEMPOTENT_BY_DEFAULT: Final = "payment"


class Stored(msgspec.Struct, frozen=True):
    fingerprint: str
    status: int = 0
    headers: list[tuple[str, str]] = []
    body: bytes = b""
    done: bool = False  # False: a lock held by an in-flight first attempt
    owner: str = ""  # the lock holder's token (to release only our own lock)
    replayable: bool = True  # False: done, but the response was too large to keep
    unknown: bool = False  # done, but whether the upstream executed it is unknown


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Stored).decode

Outcome = Literal["new", "in_flight", "done", "mismatch", "unknown", "full"]


@dataclass(frozen=True, slots=True)
class Begin:
    """``unknown``: no answer is stored and none will come (the holder died, or the key was
    first seen right after the store lost its data)."""

    outcome: Outcome
    stored: Stored | None = None


def fingerprint(method: str, path: str, body: bytes) -> str:
    return f"{method} {path} {hashlib.sha256(body).hexdigest()}"


def key_problem(key: str) -> str | None:
    """Why an Idempotency-Key is refused, or None."""
    if not key:
        return "Idempotency-Key is empty"
    if len(key) > MAX_KEY:
        return f"Idempotency-Key is longer than {MAX_KEY} bytes"
    if not all("\x21" <= ch <= "\x7e" for ch in key):
        return "Idempotency-Key may only hold visible ASCII characters"
    return None


def identity_digest(pairs: Iterable[tuple[str, str]]) -> str:
    """A digest of the (name, value) pairs that identify a shopper; "" when there are none."""
    items = sorted(pairs)
    if not items:
        return ""
    h = hashlib.sha256()
    for name, value in items:
        h.update(f"{len(name)}:{name}{len(value)}:{value}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def scope_of(route: str, identity: str, key: str) -> str:
    """The store key of (route, identity, key): fixed length, no client bytes in it."""
    raw = f"{len(route)}:{route}{len(identity)}:{identity}{key}"
    return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request is on one route, compiled at config load: read from ``headers`` and
    ``cookies`` (what the route's target systems own, plus ``Authorization``), never from a
    header the client picks on its own. Also the rate limiter's user key."""

    headers: tuple[str, ...]
    cookies: tuple[str, ...]

    def identity(self, get_all: Callable[[str, list[str]], list[str]]) -> str:
        """The digest of the request's owned headers and cookies: every value of each, from
        every ``Cookie`` line (a back end reads a session from a second line too)."""
        pairs = [("h:" + name, value) for name in self.headers for value in get_all(name, [])]
        if self.cookies:
            for line in get_all("Cookie", []):
                for raw in line.split(";"):
                    name, sep, value = raw.strip(" \t").partition("=")
                    if sep and name in self.cookies:
                        pairs.append(("c:" + name, value))
        return identity_digest(pairs)


def policy_of(route: cfg.Route) -> cfg.IdempotencyPolicy | None:
    """The route's enabled idempotency policy (a ``payment`` route gets the defaults when
    it names none), or None when its requests are not deduplicated."""
    policy = route.idempotency
    if policy is None and route.category == IDEMPOTENT_BY_DEFAULT:
        policy = cfg.IdempotencyPolicy()
    return policy if policy is not None and policy.enabled else None


def route_identity(config: cfg.Config, route: cfg.Route) -> Identity:
    """The ``Identity`` of ``route``: what its target systems own, plus Authorization."""
    targets = [route.to] if route.to is not None else [t.cluster for t in route.split or []]
    systems = {config.clusters[c].system for c in targets if c in config.clusters}
    headers = {"authorization"}
    cookies: set[str] = set()
    for name in systems:
        owns = config.systems[name].owns
        headers.update(h.lower() for h in owns.headers)
        cookies.update(owns.cookies)
    return Identity(tuple(sorted(headers)), tuple(sorted(cookies)))


@dataclass(frozen=True, slots=True)
class Gate(Identity):
    """One route's idempotency policy; a key belongs to the request's ``identity``."""

    route: str
    policy: cfg.IdempotencyPolicy


def gates(config: cfg.Config) -> dict[str, Gate]:
    """The gate of every route with an enabled idempotency policy (``policy_of``)."""
    out: dict[str, Gate] = {}
    for route in config.routes:
        policy = policy_of(route)
        if policy is None:
            continue
        who = route_identity(config, route)
        out[route.name] = Gate(who.headers, who.cookies, route.name, policy)
    return out


class Store(Protocol):
    lease: float  # seconds an in-flight lock outlives its holder's last renewal

    async def begin(self, scope: str, fp: str, token: str, ttl: float, quota: str) -> Begin: ...
    async def renew(self, scope: str, fp: str, token: str, ttl: float) -> None: ...
    async def get(self, scope: str) -> Stored | None: ...
    async def complete(self, scope: str, stored: Stored, ttl: float) -> None: ...
    async def release(self, scope: str, token: str) -> None: ...
    async def describe(self) -> dict[str, Any]: ...
    async def close(self) -> None: ...


def _judge(existing: Stored, fp: str, leased: bool) -> Begin:
    if existing.fingerprint != fp:
        return Begin("mismatch", existing)
    if existing.done:
        return Begin("done", existing)
    return Begin("in_flight", existing) if leased else Begin("unknown", existing)


@dataclass(slots=True)
class _Item:
    expires: float
    stored: Stored
    size: int
    quota: str
    lease: float = 0.0  # monotonic time the in-flight lock's lease ends


class MemoryStore:
    """One process's store. Never evicts a live record: when ``max_entries`` or
    ``max_bytes`` is reached, or one identity holds ``max_per_identity`` records, new keys
    are refused (``full``) until records expire."""

    def __init__(
        self,
        max_entries: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        max_per_identity: int = 1_000,
        lease: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease = lease
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_per_identity = max_per_identity
        self.clock = clock
        self.bytes = 0
        self._items: dict[str, _Item] = {}
        self._per_quota: dict[str, int] = {}
        self._expiries: list[tuple[float, str]] = []  # heap; stale entries skipped

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, scope: str) -> None:
        item = self._items.pop(scope)
        self.bytes -= item.size
        left = self._per_quota[item.quota] - 1
        if left:
            self._per_quota[item.quota] = left
        else:
            del self._per_quota[item.quota]

    def _expire(self) -> None:
        now = self.clock()
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, scope = heapq.heappop(heap)
            item = self._items.get(scope)
            if item is not None and item.expires <= now:
                self._drop(scope)

    def _live(self, scope: str) -> _Item | None:
        item = self._items.get(scope)
        if item is not None and item.expires <= self.clock():
            self._drop(scope)
            return None
        return item

    @staticmethod
    def _size(stored: Stored) -> int:
        return len(stored.body) + sum(len(k) + len(v) for k, v in stored.headers) + 128

    def _put(self, scope: str, stored: Stored, ttl: float, quota: str, lease: float) -> None:
        size = self._size(stored)
        old = self._items.get(scope)
        if old is not None:
            self.bytes -= old.size
            old.stored, old.size, old.lease = stored, size, lease
            old.expires = self.clock() + ttl
            self.bytes += size
            heapq.heappush(self._expiries, (old.expires, scope))
            return
        item = _Item(self.clock() + ttl, stored, size, quota, lease)
        self._items[scope] = item
        self.bytes += size
        self._per_quota[quota] = self._per_quota.get(quota, 0) + 1
        heapq.heappush(self._expiries, (item.expires, scope))

    async def begin(self, scope: str, fp: str, token: str, ttl: float, quota: str) -> Begin:
        self._expire()
        existing = self._live(scope)
        if existing is not None:
            return _judge(existing.stored, fp, existing.lease > self.clock())
        if (
            len(self._items) >= self.max_entries
            or self.bytes >= self.max_bytes
            or (quota and self._per_quota.get(quota, 0) >= self.max_per_identity)
        ):
            return Begin("full")
        lock = Stored(fingerprint=fp, owner=token)
        # The lock lives at least as long as its lease: renewals keep it while it runs.
        self._put(scope, lock, max(ttl, self.lease), quota, self.clock() + self.lease)
        return Begin("new")

    async def renew(self, scope: str, fp: str, token: str, ttl: float) -> None:
        item = self._live(scope)
        if item is not None and not item.stored.done and item.stored.owner == token:
            now = self.clock()
            item.lease = now + self.lease
            keep = max(ttl, self.lease)  # a payment may run longer than the key's ttl
            if item.expires < now + keep:
                item.expires = now + keep
                heapq.heappush(self._expiries, (item.expires, scope))

    async def get(self, scope: str) -> Stored | None:
        item = self._live(scope)
        return None if item is None else item.stored

    async def complete(self, scope: str, stored: Stored, ttl: float) -> None:
        item = self._live(scope)
        quota = item.quota if item is not None else ""
        self._put(scope, stored, ttl, quota, 0.0)

    async def release(self, scope: str, token: str) -> None:
        item = self._live(scope)
        if item is not None and not item.stored.done and item.stored.owner == token:
            self._drop(scope)

    async def describe(self) -> dict[str, Any]:
        return {
            "kind": "memory",
            "entries": len(self._items),
            "bytes": self.bytes,
            "shared": False,
            "persistent": False,
        }

    async def close(self) -> None:
        self._items.clear()
        self._per_quota.clear()
        self._expiries.clear()


# Every script that may find the store emptied starts with this. KEYS[3] is the fence hash,
# ARGV[1] the caller's fence epoch ("" = none seen yet), ARGV[2] a new epoch to use if the
# fence is gone. A caller that knew an epoch and finds it gone or replaced has seen the store
# lose its data: the fence's lost_at starts the quarantine. Leaves `epoch` and `now` (ms).
_FENCE: Final = """
local epoch = redis.call('HGET', KEYS[3], 'epoch')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not epoch then
  epoch = ARGV[2]
  redis.call('HSET', KEYS[3], 'epoch', epoch, 'lost_at', ARGV[1] ~= '' and now or 0)
elseif epoch ~= ARGV[1] and ARGV[1] ~= '' then
  if tonumber(redis.call('HGET', KEYS[3], 'lost_at') or '0') == 0 then
    redis.call('HSET', KEYS[3], 'lost_at', now)
  end
end
"""

# KEYS: record, lease, fence. ARGV: epoch, new epoch, lock value, token, ttl ms, lease ms,
# quarantine ms, the outcome-unknown value. Returns {verdict, epoch, ...}: {"exists", epoch,
# value, leased}, {"quarantined", epoch} or {"new", epoch}.
_BEGIN: Final = (
    _FENCE
    + """
local existing = redis.call('GET', KEYS[1])
if existing then
  return {'exists', epoch, existing, redis.call('EXISTS', KEYS[2])}
end
local lost_at = tonumber(redis.call('HGET', KEYS[3], 'lost_at') or '0')
if lost_at > 0 and now - lost_at < tonumber(ARGV[7]) then
  redis.call('SET', KEYS[1], ARGV[8], 'PX', ARGV[5])
  return {'quarantined', epoch}
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[5])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[6])
return {'new', epoch}
"""
)

# KEYS: record, lease, fence. ARGV: epoch, new epoch, token, lease ms, lock value, ttl ms.
# Renew our lease and our lock's ttl (a payment may run longer than the key's ttl); re-create
# the lock only if the store lost its data (the fence changed), never over a result nor
# after our own release. Returns the epoch.
_RENEW: Final = (
    _FENCE
    + """
local existing = redis.call('GET', KEYS[1])
if existing and existing ~= ARGV[5] then return epoch end
if not existing and epoch == ARGV[1] then return epoch end
redis.call('SET', KEYS[1], ARGV[5], 'PX', ARGV[6])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return epoch
"""
)

# KEYS: record, lease. ARGV: lock value. Delete both only if the record is still our lock.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: record, lease. ARGV: value, ttl ms.
_COMPLETE: Final = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""


def _unknown_record(fp: str) -> Stored:
    return Stored(fingerprint=fp, status=503, done=True, unknown=True)


class RedisStore:
    """Shared by every worker and replica. Each record has its lease beside it; a fence
    hash detects a store that lost its data (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "jalur:idem:",
        timeout: float = 1.0,
        quarantine: float = 60.0,
        lease: float = 15.0,
    ) -> None:
        self.lease = lease
        self.prefix = prefix
        self.quarantine_ms = int(quarantine * 1000)
        self.epoch = ""  # the fence epoch this process has seen
        self._fence = prefix + "fence"
        self._redis = redis_client(url, timeout)
        self._begin = self._redis.register_script(_BEGIN)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._complete = self._redis.register_script(_COMPLETE)

    def _keys(self, scope: str) -> list[str]:
        return [self.prefix + "r:" + scope, self.prefix + "l:" + scope]

    def _load(self, raw: object) -> Stored:
        if not isinstance(raw, bytes):
            raise StoreError("redis: unexpected value type")
        try:
            return _decode(raw)
        except msgspec.DecodeError as exc:
            raise StoreError("redis: undecodable entry") from exc

    async def begin(self, scope: str, fp: str, token: str, ttl: float, quota: str) -> Begin:
        lock = _encode(Stored(fingerprint=fp, owner=token))
        reply = await call(
            self._begin(
                keys=[*self._keys(scope), self._fence],
                args=[
                    self.epoch,
                    secrets.token_hex(8),
                    lock,
                    token,
                    int(max(ttl, self.lease) * 1000),  # a lock outlives its lease
                    int(self.lease * 1000),
                    self.quarantine_ms,
                    _encode(_unknown_record(fp)),
                ],
            )
        )
        if (
            not isinstance(reply, list)
            or len(reply) < 2
            or not all(isinstance(part, bytes) for part in reply[:2])
        ):
            raise StoreError("redis: unexpected reply")
        verdict = reply[0]
        self.epoch = reply[1].decode()
        if verdict == b"new":
            return Begin("new")
        if verdict == b"exists" and len(reply) == 4:
            return _judge(self._load(reply[2]), fp, reply[3] == 1)
        if verdict == b"quarantined":
            return Begin("unknown")
        raise StoreError("redis: unexpected reply")

    async def renew(self, scope: str, fp: str, token: str, ttl: float) -> None:
        lock = _encode(Stored(fingerprint=fp, owner=token))
        reply = await call(
            self._renew(
                keys=[*self._keys(scope), self._fence],
                args=[
                    self.epoch,
                    secrets.token_hex(8),
                    token,
                    int(self.lease * 1000),
                    lock,
                    int(max(ttl, self.lease) * 1000),
                ],
            )
        )
        if isinstance(reply, bytes):
            self.epoch = reply.decode()

    async def get(self, scope: str) -> Stored | None:
        raw = await call(self._redis.get(self._keys(scope)[0]))
        return None if raw is None else self._load(raw)

    async def complete(self, scope: str, stored: Stored, ttl: float) -> None:
        await call(self._complete(keys=self._keys(scope), args=[_encode(stored), int(ttl * 1000)]))

    async def release(self, scope: str, token: str) -> None:
        raw = await call(self._redis.get(self._keys(scope)[0]))
        if raw is None:
            return
        stored = self._load(raw)
        if stored.done or stored.owner != token:
            return
        await call(self._release(keys=self._keys(scope), args=[raw]))

    async def describe(self) -> dict[str, Any]:
        """What the server promises about our keys: ``evicts`` (its maxmemory-policy may
        remove them before their ttl) and ``persistent`` (appendonly or RDB snapshots).
        A server that refuses CONFIG (managed Redis) reports "unknown"."""
        out: dict[str, Any] = {"kind": "redis", "shared": True}
        try:
            out["run_id"] = (await call(self._redis.info("server"))).get("run_id", "")
        except StoreError as exc:
            return {**out, "reachable": False, "error": str(exc)}
        out["reachable"] = True
        try:
            policy = (await call(self._redis.config_get("maxmemory-policy"))).get(
                "maxmemory-policy", "unknown"
            )
            aof = (await call(self._redis.config_get("appendonly"))).get("appendonly")
            rdb = (await call(self._redis.config_get("save"))).get("save")
        except StoreError:
            return {**out, "maxmemory_policy": "unknown", "evicts": "unknown"}
        out["maxmemory_policy"] = policy
        out["evicts"] = policy != "noeviction"
        out["appendonly"] = aof == "yes"
        out["persistent"] = aof == "yes" or bool(rdb)
        return out

    async def close(self) -> None:
        await self._redis.aclose()


def make_store(spec: cfg.Store) -> Store:
    if spec.kind == "redis":
        return RedisStore(
            spec.url,
            quarantine=spec.lost_data_quarantine,
            timeout=spec.timeout,
            lease=spec.lease_ttl,
        )
    return MemoryStore(
        max_entries=spec.max_entries,
        max_bytes=spec.max_bytes,
        max_per_identity=spec.max_entries_per_identity,
        lease=spec.lease_ttl,
    )


async def report_store(store: Store, log: Any) -> dict[str, Any]:
    """Ask the store what it promises and say it in the log once at start: a redis that
    may evict Jalur's keys or forgets them on restart weakens "at most once"."""
    described = await store.describe()
    if described["kind"] == "memory":
        log.info("store: memory (this process only; not shared by workers or replicas)")
    elif not described.get("reachable", True):
        log.error("store: redis unreachable at start (%s); keyed payments get 503", described)
    else:
        if described.get("evicts") is not False:
            log.error(
                "store: redis maxmemory-policy is %s; set noeviction, or stored payment "
                "outcomes may be evicted before their ttl and executed again",
                described.get("maxmemory_policy"),
            )
        if described.get("persistent") is not True:
            log.warning(
                "store: redis does not persist (appendonly no, no snapshots): a restart "
                "forgets stored outcomes (repeats within store.lost_data_quarantine are "
                "answered outcome unknown)"
            )
    return described


async def wait_done(store: Store, scope: str, fp: str, limit: float) -> Stored | None:
    """Poll (bounded) until the in-flight first attempt of ``scope`` is done; None if it was
    released or ``limit`` passed."""
    deadline = time.monotonic() + limit
    delay = 0.01
    while time.monotonic() < deadline:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
        stored = await store.get(scope)
        if stored is None:
            return None
        if stored.done:
            return stored if stored.fingerprint == fp else None
    return None


@dataclass(slots=True)
class Ticket:
    """The lock a first attempt holds, what it learned, and the answer captured to store.

    ``sent``: a byte of the request may have reached an upstream (then the key is consumed);
    ``answered``: an upstream answer head was relayed; ``complete``: and its body in full."""

    scope: str
    token: str
    fingerprint: str
    ttl: float
    max_response_bytes: int
    sent: bool = False
    answered: bool = False
    complete: bool = False
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    too_large: bool = False
    settled: bool = False
    renewer: asyncio.Task[None] | None = None

    def start_renewing(self, store: Store) -> None:
        self.renewer = asyncio.get_running_loop().create_task(self._renew(store))

    async def _renew(self, store: Store) -> None:
        # ``settled`` ends the loop even where a cancellation was absorbed by the client
        # library mid-command (redis-py can): the answer must never wait on a renewal.
        while not self.settled:
            await asyncio.sleep(store.lease / RENEWALS_PER_LEASE)
            # A lapsed lease reads as outcome unknown: still never a second send.
            with contextlib.suppress(StoreError):
                await store.renew(self.scope, self.fingerprint, self.token, self.ttl)

    def capture(self, chunk: bytes) -> None:
        if not self.too_large:
            self.body += chunk
            if len(self.body) > self.max_response_bytes:
                self.too_large = True
                self.body.clear()

    def record(self, status: int) -> Stored | None:
        """What to keep for this key once the request is over (``status``: what the client
        was answered); None: release the key."""
        if not self.answered and not self.sent:
            return None
        if not self.complete:
            return Stored(
                fingerprint=self.fingerprint,
                status=status if status >= 500 else 502,
                done=True,
                owner=self.token,
                unknown=True,
            )
        return Stored(
            fingerprint=self.fingerprint,
            status=status,
            headers=self.headers,
            body=b"" if self.too_large else bytes(self.body),
            done=True,
            owner=self.token,
            replayable=not self.too_large,
        )

    async def settle(self, store: Store, status: int) -> str:
        """Store the outcome or release the key; returns the outcome counted."""
        self.settled = True
        if self.renewer is not None:
            self.renewer.cancel()
            # Bounded: a renewal stuck in the store's client is left to end on its own.
            await asyncio.wait({self.renewer}, timeout=RENEWER_STOP)
        stored = self.record(status)
        if stored is None:
            await store.release(self.scope, self.token)
            return "released"
        await store.complete(self.scope, stored, self.ttl)
        return "unknown" if stored.unknown else "stored"
