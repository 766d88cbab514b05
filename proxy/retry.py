"""Retry decisions: Jalur alone decides whether a failed attempt is sent again.

The rules, in order (``RetryPolicy.error_verdict`` / ``status_verdict``):

1. The failure must be one the cluster retries (``retry.retry_on``): ``connect-failure``
   (any failed or timed-out connect), ``refused`` (the connect was refused),
   ``reset-before-request`` (the connection failed before a byte of the request was
   written), ``reset`` (closed or reset after the request was written, before the response
   head), ``timeout`` (no response head within ``per_try_timeout``), or an upstream status
   listed there (e.g. 502, 503, 504).
2. If no byte of the request reached the upstream (the transport says
   ``request_bytes_sent == 0``; always so for connect failures) any method may be sent
   again, as long as its body can still be produced (not streamed yet, or buffered).
3. Otherwise only a request that may be repeated: an idempotent method (GET, HEAD,
   OPTIONS, PUT, DELETE) or one carrying ``Idempotency-Key`` (passed through unchanged,
   never invented), and only if its body was buffered (``retry.buffer_bytes``). A POST or
   PATCH without a key that may have reached the upstream is never sent twice.
4. Attempts left (``retry.attempts`` counts the first), and the cluster's retry budget:
   retries in flight at most ``budget_percent`` of the cluster's active requests, but at
   least ``min_retry_concurrency``.

A retry waits a full-jitter backoff, ``random() * min(max, base * 2**(n-1))``, and goes to
an endpoint of the same cluster that was not tried yet when there is one (never another
cluster: that would bypass the compliance decision made for the first try). A failed
*connect* is retried only on another endpoint: connecting again within milliseconds to the
endpoint that just refused is pointless (so a one-endpoint cluster does not retry it);
other failures may be retried on the same endpoint, over a new connection.
"""

from __future__ import annotations

import random
from typing import Final

from . import config as cfg
from . import errors

__all__ = [
    "IDEMPOTENCY_KEY",
    "IDEMPOTENT_METHODS",
    "RetryPolicy",
    "failure_condition",
]

IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
IDEMPOTENCY_KEY: Final = "Idempotency-Key"

CONNECT_FAILURE: Final = "connect-failure"
REFUSED: Final = "refused"
RESET_BEFORE_REQUEST: Final = "reset-before-request"
RESET: Final = "reset"
TIMEOUT: Final = "timeout"

# Why a failure that matched ``retry_on`` was still not retried (appended to the error).
BODY_STREAMED: Final = "the request body was already streamed"
BODY_TOO_LARGE: Final = "the request body is larger than retry.buffer_bytes"
BUDGET: Final = "the cluster's retry budget is used up"
NO_ENDPOINT: Final = "no healthy endpoint left to retry on"
NO_OTHER_ENDPOINT: Final = "no other healthy endpoint to connect to"


def _refused(exc: errors.ConnectFailed) -> bool:
    if isinstance(exc, errors.ConnectRefused):
        return True
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return True
        os_error = getattr(cause, "os_error", None)  # aiohttp's ClientConnectorError
        if isinstance(os_error, ConnectionRefusedError):
            return True
        cause = cause.__cause__
    return False


def failure_condition(exc: errors.ProxyError) -> str | None:
    """The ``retry_on`` condition a failed attempt is, or None (never retried)."""
    if isinstance(exc, errors.ConnectFailed):
        return REFUSED if _refused(exc) else CONNECT_FAILURE
    if isinstance(exc, errors.ConnectTimeout):
        return CONNECT_FAILURE
    if not isinstance(exc, errors.UpstreamError):
        return None
    if exc.request_bytes_sent == 0:
        return RESET_BEFORE_REQUEST
    if isinstance(exc, errors.ResponseTimeout):
        return TIMEOUT
    if isinstance(exc, errors.UpstreamReset):
        return RESET
    return None


def not_idempotent(method: str) -> str:
    return f"a {method} without {IDEMPOTENCY_KEY} may already have been processed"


class RetryPolicy:
    """A cluster's ``retry`` settings, pre-computed at config load."""

    __slots__ = (
        "attempts",
        "backoff_base",
        "backoff_max",
        "budget_ratio",
        "buffer_bytes",
        "conditions",
        "enabled",
        "min_concurrency",
        "per_try_timeout",
        "statuses",
    )

    def __init__(self, spec: cfg.Retry, response_headers_timeout: float) -> None:
        self.attempts = spec.attempts
        self.enabled = spec.attempts > 1
        self.statuses = frozenset(c for c in spec.retry_on if isinstance(c, int))
        conditions = {c for c in spec.retry_on if isinstance(c, str)}
        # The narrower condition is implied by the wider one.
        if CONNECT_FAILURE in conditions:
            conditions.add(REFUSED)  # a refused connect is a failed connect
        if RESET in conditions:
            conditions.add(RESET_BEFORE_REQUEST)  # a reset that came before the request
        self.conditions = frozenset(conditions)
        # A per-try timeout at or above the transport's own head timeout changes nothing.
        per_try = spec.per_try_timeout
        self.per_try_timeout = (
            per_try if per_try is not None and per_try < response_headers_timeout else None
        )
        self.buffer_bytes = spec.buffer_bytes
        self.backoff_base = spec.backoff.base
        self.backoff_max = spec.backoff.max
        self.budget_ratio = spec.budget_percent / 100
        self.min_concurrency = spec.min_retry_concurrency

    def error_verdict(
        self, exc: errors.ProxyError, method: str, repeatable: bool, replayable: bool
    ) -> str | None:
        """None: the failed attempt may be retried (attempts and budget permitting).
        Otherwise why not: ``""`` when the failure is not a retry condition at all.

        ``repeatable``: idempotent method or ``Idempotency-Key``; ``replayable``: the body
        (if any) can be produced again."""
        condition = failure_condition(exc)
        if condition is None or condition not in self.conditions:
            return ""
        if getattr(exc, "request_bytes_sent", None) == 0:
            return None if replayable else BODY_STREAMED
        if not repeatable:
            return not_idempotent(method)
        return None if replayable else BODY_TOO_LARGE

    def status_verdict(self, status: int, repeatable: bool, replayable: bool) -> bool:
        """Whether an upstream response with ``status`` is discarded and retried."""
        return status in self.statuses and repeatable and replayable

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the first retry)."""
        ceiling = min(self.backoff_max, self.backoff_base * (1 << min(retry - 1, 30)))
        return random.random() * ceiling
