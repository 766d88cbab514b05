"""The fleet's shared store: one connection recipe and one error boundary.

Idempotency records (``idempotency``) and live migration weights (``fleet``) live in the
top-level ``store`` (``config.Store``). Every Redis call goes through ``call``, which maps
redis-py's and the socket's exceptions to ``StoreError`` (the only store error the rest of
Jalur sees; its text never carries an address or a password)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["StoreError", "call", "redis_client"]


class StoreError(Exception):
    """The store could not be reached or answered nonsense."""


def redis_client(url: str, timeout: float) -> aioredis.Redis:
    """A client that fails fast (``timeout`` for connect and every call, no retries): a slow
    store is answered 503 at once, never waited on per request."""
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry_on_timeout=False,
        health_check_interval=0,
    )


async def call(pending: Awaitable[Any]) -> Any:
    """Await one Redis call; its failure as ``StoreError``."""
    from redis.exceptions import RedisError

    try:
        return await pending
    except (RedisError, OSError) as exc:
        raise StoreError(f"redis: {type(exc).__name__}") from exc
