"""Payment idempotency gate: a repeated payment with the same ``Idempotency-Key`` is
answered from the first one's stored response and never reaches the back end twice.

Semantics (IETF draft "The Idempotency-Key HTTP Header Field", Stripe's practice), for
non-idempotent methods (POST, PATCH) on routes with an idempotency policy (by default every
``payment`` route):

- no key where the policy requires one: 400 (``missing``);
- the first request with a key takes an in-flight lock on (route, user, key), is forwarded,
  and its final status, headers and body are stored for ``ttl`` (``stored``) -- unless the
  answer is a 5xx or a transport error, after which the lock is released so the client may
  retry;
- a repeat with the same fingerprint (method, path, SHA-256 of the body) gets the stored
  response with ``Idempotent-Replayed: true`` (``replayed``), without reaching the back end;
- a repeat while the first is in flight: 409 (``conflict``), or with ``wait_in_flight`` the
  repeat waits (bounded) for the first to finish and is replayed;
- the same key with another fingerprint: 422 (``mismatch``);
- the store unreachable: 503 when the policy requires keys (fail closed), else the request
  is forwarded without protection; counted as ``store_error`` either way.

Stores: ``MemoryStore`` (one instance; LRU bounded by entries and bytes) and ``RedisStore``
(several replicas; ``SET NX`` with expiry for the lock, a compare-and-delete script to
release it, the stored response written over the lock).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import msgspec

__all__ = [
    "Begin",
    "MemoryStore",
    "RedisStore",
    "StoreError",
    "Stored",
    "fingerprint",
    "make_store",
]

# How long an in-flight lock lives if the proxy holding it dies before completing: after
# this a retry is treated as a first attempt again.
LOCK_TTL: Final = 60.0
REPLAYED_HEADER: Final = "Idempotent-Replayed"


class StoreError(Exception):
    """The store could not be reached or answered nonsense."""


class Stored(msgspec.Struct, frozen=True):
    fingerprint: str
    status: int = 0
    headers: list[tuple[str, str]] = []
    body: bytes = b""
    done: bool = False  # False: a lock held by an in-flight first attempt
    owner: str = ""  # the lock holder's token (to release only our own lock)
    replayable: bool = True  # False: done, but the response was too large to keep


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Stored).decode


@dataclass(frozen=True, slots=True)
class Begin:
    outcome: Literal["new", "in_flight", "done", "mismatch"]
    stored: Stored | None = None
    token: str = ""


def fingerprint(method: str, path: str, body: bytes) -> str:
    return f"{method} {path} {hashlib.sha256(body).hexdigest()}"


class Store(Protocol):
    async def begin(self, key: str, fp: str, token: str) -> Begin: ...
    async def get(self, key: str) -> Stored | None: ...
    async def complete(self, key: str, stored: Stored, ttl: float) -> None: ...
    async def release(self, key: str, token: str) -> None: ...
    async def close(self) -> None: ...


def _judge(existing: Stored, fp: str) -> Begin:
    if existing.fingerprint != fp:
        return Begin("mismatch", existing)
    return Begin("done" if existing.done else "in_flight", existing)


class MemoryStore:
    """One process's store: LRU bounded by entry count and stored bytes."""

    def __init__(
        self,
        max_entries: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self._items: OrderedDict[str, tuple[float, Stored, int]] = OrderedDict()

    def _live(self, key: str) -> Stored | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, stored, size = item
        if expires <= self.clock():
            del self._items[key]
            self.bytes -= size
            return None
        self._items.move_to_end(key)
        return stored

    def _put(self, key: str, stored: Stored, ttl: float) -> None:
        size = len(stored.body) + sum(len(k) + len(v) for k, v in stored.headers) + 64
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
        self._items[key] = (self.clock() + ttl, stored, size)
        self.bytes += size
        while self._items and (len(self._items) > self.max_entries or self.bytes > self.max_bytes):
            _, (_, _, evicted) = self._items.popitem(last=False)
            self.bytes -= evicted

    async def begin(self, key: str, fp: str, token: str) -> Begin:
        existing = self._live(key)
        if existing is not None:
            return _judge(existing, fp)
        self._put(key, Stored(fingerprint=fp, owner=token), LOCK_TTL)
        return Begin("new", token=token)

    async def get(self, key: str) -> Stored | None:
        return self._live(key)

    async def complete(self, key: str, stored: Stored, ttl: float) -> None:
        self._put(key, stored, ttl)

    async def release(self, key: str, token: str) -> None:
        existing = self._live(key)
        if existing is not None and not existing.done and existing.owner == token:
            _, _, size = self._items.pop(key)
            self.bytes -= size

    async def close(self) -> None:
        self._items.clear()


# Delete the key only if it still holds our lock (not another attempt's, not a result).
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """Shared by every replica: the lock is an atomic ``SET NX PX``."""

    def __init__(self, url: str, prefix: str = "jalur:idem:", timeout: float = 1.0) -> None:
        import redis.asyncio as aioredis

        self.prefix = prefix
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._release = self._redis.register_script(_RELEASE)

    async def _call(self, coro: object) -> object:
        from redis.exceptions import RedisError

        try:
            return await coro  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc

    async def begin(self, key: str, fp: str, token: str) -> Begin:
        lock = _encode(Stored(fingerprint=fp, owner=token))
        k = self.prefix + key
        ok = await self._call(self._redis.set(k, lock, nx=True, px=int(LOCK_TTL * 1000)))
        if ok:
            return Begin("new", token=token)
        raw = await self._call(self._redis.get(k))
        if raw is None:  # expired between SET and GET: take it now
            return await self.begin(key, fp, token)
        return _judge(self._load(raw), fp)

    def _load(self, raw: object) -> Stored:
        if not isinstance(raw, bytes):
            raise StoreError("redis: unexpected value type")
        try:
            return _decode(raw)
        except msgspec.DecodeError as exc:
            raise StoreError(f"redis: undecodable entry: {exc}") from exc

    async def get(self, key: str) -> Stored | None:
        raw = await self._call(self._redis.get(self.prefix + key))
        return None if raw is None else self._load(raw)

    async def complete(self, key: str, stored: Stored, ttl: float) -> None:
        await self._call(self._redis.set(self.prefix + key, _encode(stored), px=int(ttl * 1000)))

    async def release(self, key: str, token: str) -> None:
        # The lock value is deterministic given (fingerprint, token); compare on the token by
        # re-reading, then delete atomically only if unchanged.
        raw = await self._call(self._redis.get(self.prefix + key))
        if raw is None:
            return
        stored = self._load(raw)
        if stored.done or stored.owner != token:
            return
        assert isinstance(raw, bytes)
        await self._call(self._release(keys=[self.prefix + key], args=[raw]))

    async def close(self) -> None:
        await self._redis.aclose()


def make_store(kind: str, redis_url: str, max_entries: int, max_bytes: int) -> Store:
    if kind == "redis":
        return RedisStore(redis_url)
    return MemoryStore(max_entries=max_entries, max_bytes=max_bytes)


async def wait_done(store: Store, key: str, fp: str, limit: float) -> Stored | None:
    """Poll (bounded) until the in-flight first attempt of ``key`` is done; None if it was
    released (5xx/transport error) or ``limit`` passed."""
    deadline = time.monotonic() + limit
    delay = 0.01
    while time.monotonic() < deadline:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
        stored = await store.get(key)
        if stored is None:
            return None
        if stored.done:
            return stored if stored.fingerprint == fp else None
    return None
