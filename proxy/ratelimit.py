"""Rate limits: token buckets per route and per user key, in the process or fleet-wide.

A route's ``rate_limit`` sets a ``route`` bucket (one for the route), a ``user`` bucket
(one per user key) or both; a request takes one token from each bucket that is set, or
none at all when any is empty, and is then answered 429 before the idempotency gate reads
its body and before any upstream connection is taken.

- The user key is the route's identity as the idempotency scope defines it
  (``idempotency.route_identity``: the headers and cookies the route's target systems own,
  plus Authorization; a digest, no client bytes kept), else the client address (the peer,
  or with ``boundary.forwarding.xff_num_trusted_hops`` N the address the N trusted proxies
  in front saw).
- ``scope: local`` buckets live in the process (N workers allow N times the rate);
  ``scope: fleet`` buckets live in the shared store (Redis): one atomic Lua script takes
  the tokens of both buckets, timed by the Redis server's clock, so every worker and
  replica draws from the same buckets. A store that does not answer in ``store.timeout``
  lets the request through (fail open: a limiter outage must not refuse shoppers) and is
  counted (``jalur_rate_limited_total{reason="store_error"}``, the request not refused).
- The 429 carries ``Retry-After`` (whole seconds until a token is back) and the IETF
  ``RateLimit-Policy`` / ``RateLimit`` fields (draft-ietf-httpapi-ratelimit-headers):
  the policy is the refusing bucket, ``q`` its burst and ``w`` the seconds it takes to
  refill from empty; ``r`` the tokens left, ``t`` the seconds until one is back.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from . import config as cfg
from .idempotency import Identity, route_identity

log = logging.getLogger("jalur")

__all__ = [
    "MAX_LOCAL_KEYS",
    "STORE_ERROR",
    "Limiter",
    "Refusal",
    "build",
    "client_address",
    "close",
]

# User buckets one route keeps in one process; past it the least recently used is dropped
# (it starts full again), so a client minting user keys cannot grow memory without bound.
MAX_LOCAL_KEYS: Final = 100_000
# Fleet buckets live this long past the time they take to refill (then they are full
# anyway and Redis may forget them).
_FLEET_SLACK_MS: Final = 1000
_KEY_PREFIX: Final = "jalur:rl:"

# KEYS: the buckets (1 or 2). ARGV: rate, burst for each, in KEYS order.
# Returns {allowed (1/0), refusing bucket index (0 when allowed), tokens left, wait seconds}.
_TAKE: Final = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local tokens = {}
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local v = redis.call('HMGET', KEYS[i], 't', 'v')
  local have = burst
  if v[1] then
    have = math.min(burst, tonumber(v[2]) + math.max(0, t - tonumber(v[1])) * rate)
  end
  if have < 1 then
    return {0, i, tostring(have), tostring((1 - have) / rate)}
  end
  tokens[i] = have
end
local left = -1
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local v = tokens[i] - 1
  redis.call('HSET', KEYS[i], 't', tostring(t), 'v', tostring(v))
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst / rate * 1000) + 1000)
  if left < 0 or v < left then left = v end
end
return {1, 0, tostring(left), '0'}
"""


class Refusal(NamedTuple):
    """Why a request was refused: which bucket (``route``/``user``) and its state."""

    reason: str  # "route" or "user"
    burst: int
    rate: float
    left: float  # tokens left (below 1)
    wait: float  # seconds until a token is back

    def headers(self) -> dict[str, str]:
        wait = max(1, math.ceil(self.wait))
        window = max(1, math.ceil(self.burst / self.rate))
        return {
            "Retry-After": str(wait),
            "RateLimit-Policy": f'"{self.reason}";q={self.burst};w={window}',
            "RateLimit": f'"{self.reason}";r={max(0, math.floor(self.left))};t={wait}',
        }


# Not a refusal: the shared store did not answer, the request goes through (fail open).
STORE_ERROR: Final = Refusal("store_error", 1, 1.0, 1.0, 0.0)


class _Bucket:
    __slots__ = ("last", "tokens")

    def __init__(self, tokens: float, last: float) -> None:
        self.tokens = tokens
        self.last = last


class _LocalBuckets:
    """Token buckets of one bucket spec in this process, by key (LRU-bounded)."""

    __slots__ = ("buckets", "burst", "rate")

    def __init__(self, spec: cfg.RateBucket) -> None:
        self.rate = spec.rate
        self.burst = float(spec.burst)
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def peek(self, key: str, now: float) -> _Bucket:
        """The bucket of ``key`` refilled up to ``now`` (created full)."""
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = _Bucket(self.burst, now)
            if len(self.buckets) > MAX_LOCAL_KEYS:
                self.buckets.popitem(last=False)
            return bucket
        self.buckets.move_to_end(key)
        elapsed = now - bucket.last
        if elapsed > 0:
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
            bucket.last = now
        return bucket


class Limiter:
    """One route's rate limit, built at config load. ``check`` is awaited per request."""

    __slots__ = (
        "_identity",
        "_local",
        "_redis",
        "_script",
        "_specs",
        "_trusted",
        "clock",
        "fleet",
        "keys",
        "store_down",
    )

    def __init__(
        self,
        route: str,
        spec: cfg.RateLimit,
        identity: Identity,
        trusted_hops: int,
        redis: Any = None,
    ) -> None:
        self._identity = identity
        self._trusted = trusted_hops
        self._specs: tuple[tuple[str, cfg.RateBucket], ...] = tuple(
            (reason, bucket)
            for reason, bucket in (("route", spec.route), ("user", spec.user))
            if bucket is not None
        )
        self.keys = {
            reason: f"{_KEY_PREFIX}{len(route)}:{route}:{reason}" for reason, _ in self._specs
        }
        self.fleet = redis is not None
        self._redis = redis
        self._script = redis.register_script(_TAKE) if redis is not None else None
        self._local = {reason: _LocalBuckets(bucket) for reason, bucket in self._specs}
        self.clock: Callable[[], float] = time.monotonic
        self.store_down = False  # the last fleet call failed (logged once per outage)

    def user_key(self, get_all: Callable[[str, list[str]], list[str]], peer: str | None) -> str:
        who = self._identity.identity(get_all)
        if who:
            return "id:" + who
        return "ip:" + client_address(get_all, peer, self._trusted)

    async def check(
        self,
        get_all: Callable[[str, list[str]], list[str]],
        cookies: Callable[[str], str | None],
        peer: str | None,
    ) -> Refusal | None:
        """Take a token from each bucket (None), or say which one is empty."""
        user = self.user_key(get_all, peer) if "user" in self.keys else ""
        if self._script is not None:
            return await self._check_fleet(user)
        now = self.clock()
        taken = []
        for reason, spec in self._specs:
            bucket = self._local[reason].peek(user if reason == "user" else "", now)
            if bucket.tokens < 1:
                return Refusal(
                    reason, spec.burst, spec.rate, bucket.tokens, (1 - bucket.tokens) / spec.rate
                )
            taken.append(bucket)
        for bucket in taken:
            bucket.tokens -= 1
        return None

    async def _check_fleet(self, user: str) -> Refusal | None:
        keys: list[str] = []
        args: list[float] = []
        for reason, spec in self._specs:
            key = self.keys[reason]
            keys.append(f"{key}:{user}" if reason == "user" else key)
            args += (spec.rate, spec.burst)
        assert self._script is not None
        from redis.exceptions import RedisError

        try:
            allowed, index, left, wait = await self._script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            if not self.store_down:
                self.store_down = True
                log.error("rate-limit store unavailable (%s): requests let through", exc)
            return STORE_ERROR
        if self.store_down:
            self.store_down = False
            log.warning("rate-limit store answers again: fleet limits enforced")
        if allowed:
            return None
        reason, spec = self._specs[int(index) - 1]
        return Refusal(reason, spec.burst, spec.rate, float(left), float(wait))


async def close(limiters: dict[str, Limiter]) -> None:
    """Close the store connections of ``limiters`` (one client shared by fleet ones)."""
    clients = {id(lim._redis): lim._redis for lim in limiters.values() if lim._redis is not None}
    for client in clients.values():
        await client.aclose()


def client_address(
    get_all: Callable[[str, list[str]], list[str]], peer: str | None, trusted_hops: int
) -> str:
    """The client's address: the peer's, or with ``trusted_hops`` N the N-th entry from the
    right of X-Forwarded-For (the address the trusted proxy in front saw)."""
    if trusted_hops:
        hops = [h.strip() for line in get_all("X-Forwarded-For", []) for h in line.split(",")]
        if len(hops) >= trusted_hops:
            return hops[-trusted_hops]
    return peer or ""


def build(config: cfg.Config) -> dict[str, Limiter]:
    """The limiter of every route with a ``rate_limit``; fleet ones share one Redis client."""
    out: dict[str, Limiter] = {}
    redis: Any = None
    for route in config.routes:
        spec = route.rate_limit
        if spec is None:
            continue
        client = None
        if spec.scope == "fleet":
            if redis is None:
                import redis.asyncio as aioredis

                store = config.store
                redis = aioredis.Redis.from_url(
                    store.url,
                    socket_timeout=store.timeout,
                    socket_connect_timeout=store.timeout,
                    retry_on_timeout=False,
                    health_check_interval=0,
                )
            client = redis
        out[route.name] = Limiter(
            route.name,
            spec,
            route_identity(config, route),
            config.boundary.forwarding.xff_num_trusted_hops,
            client,
        )
    return out
