"""The admin listener: health, readiness and the loaded config. Never serves proxied traffic.

``/healthz`` (alias ``/livez``) answers 200 while the process runs; ``/readyz`` answers 200
only once a config is loaded and the proxy is not draining; ``/config`` shows the loaded
config with secrets masked; ``/metrics`` is the Prometheus exposition (OpenMetrics when the
scraper asks for it), served when ``make_app`` is given a ``Metrics``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import orjson
from aiohttp import web

from . import respond
from .config import Config
from .fleet import RampError, StoreError
from .metrics import Metrics
from .migration import Migration, WeightError

# Config fields whose values are never shown, whatever their nesting.
SECRET_FIELDS: Final = frozenset({"token", "key", "secret", "password"})
MASK: Final = "***"
# Who asks for a weight change, as the operator names themself (the bearer token is shared,
# so the audit trail records this beside the peer address); cut to MAX_ACTOR characters so
# a record stays one short line.
ACTOR_HEADER: Final = "X-Jalur-Actor"
MAX_ACTOR: Final = 128
# The userinfo of a URL in any config string (redis://:password@host, http://user:pw@...).
_USERINFO: Final = re.compile(r"(?<=://)[^/@\s]*@")


@dataclass(slots=True)
class Status:
    """Mutable process status the admin endpoints read (set by ``server``)."""

    config: Config | None = None
    draining: bool = False
    # Which config serves: 1 for the one loaded at start, +1 per reload that took effect.
    generation: int = 0
    # Why the last reload was refused (None when the last reload succeeded or none failed):
    # /readyz shows it, so an operator sees an edit that did not take.
    reload_error: str | None = None
    # The live migration controller of the current config (None under a supervisor).
    migration: Callable[[], Migration] | None = None
    # Where audited admin actions go (the compliance audit log).
    audit: Callable[[dict[str, Any]], None] | None = None
    # Wall clock compliance deadlines are judged by.
    clock: Callable[[], float] = time.time
    # What the shared store promised at start (idempotency.RedisStore.describe).
    store: dict[str, Any] | None = None
    # GET /migration's body, and POST /migration/{route}'s action (the fleet's live
    # weights): set by the process that serves the admin listener.
    migration_view: Callable[[], Awaitable[dict[str, Any]]] | None = None
    ramp: Callable[[RampRequest], Awaitable[dict[str, Any]]] | None = None
    # Sets jalur_migration_progress_ratio from the pod's traffic (called before a scrape).
    refresh_progress: Callable[[], None] | None = None

    @property
    def ready(self) -> bool:
        return self.config is not None and not self.draining

    def serving(self, config: Config) -> None:
        """``config`` now serves (the first one, or a reload that took effect)."""
        self.config = config
        self.generation += 1
        self.reload_error = None

    def refused(self, reason: str) -> None:
        """A reload was refused; the current generation keeps serving."""
        self.reload_error = reason


@dataclass(frozen=True, slots=True)
class RampRequest:
    route: str
    weights: dict[str, Any]
    rollback: bool
    actor: str
    reason: str
    now: float
    peer: str | None = None


STATUS: Final = web.AppKey("status", Status)
METRICS: Final = web.AppKey("metrics", Metrics)


def masked(config: Config) -> dict[str, Any]:
    """The config as it may be shown (``/config``, ``--print-config``): secret fields and
    the credentials inside any URL replaced by ``***``."""

    def mask(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: (MASK if k in SECRET_FIELDS and v is not None else mask(v))
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [mask(v) for v in value]
        if isinstance(value, str) and "@" in value:
            return _USERINFO.sub(MASK + "@", value)
        return value

    result: dict[str, Any] = mask(msgspec.to_builtins(config))
    return result


def _json(data: Any, status: int = 200) -> web.Response:
    return respond.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    status = request.app[STATUS]
    body: dict[str, Any] = {"config_generation": status.generation}
    if status.reload_error is not None:
        body["last_reload"] = {"result": "refused", "error": status.reload_error}
    if status.ready:
        return _json({"status": "ready", **body, "store": status.store})
    reason = "draining" if status.draining else "config not loaded"
    return _json({"status": "not ready", "reason": reason, **body}, status=503)


async def config_view(request: web.Request) -> web.Response:
    """The masked config; with ``admin.token`` set, only for the bearer of the token (the
    config maps the whole fleet: endpoints, systems, routes)."""
    config = request.app[STATUS].config
    if config is None:
        return _json({"error": "config not loaded"}, status=503)
    if config.admin.token:
        refused = _authorized(request, config)
        if refused is not None:
            return refused
    return _json(masked(config))


async def metrics_view(request: web.Request) -> web.Response:
    refresh = request.app[STATUS].refresh_progress
    if refresh is not None:  # the progress gauge reads the pod's share at every scrape
        await asyncio.to_thread(refresh)
    # Rendering walks every series (and in multiprocess mode reads files): off the loop.
    body, content_type = await asyncio.to_thread(
        request.app[METRICS].render, request.headers.get("Accept")
    )
    return respond.Response(body=body, headers={"Content-Type": content_type})


log = logging.getLogger("jalur.admin")


def _authorized(request: web.Request, config: Config) -> web.Response | None:
    """None when the request carries the admin bearer token; else the refusal: 403 when no
    token is configured (mutations disabled), 401 with ``WWW-Authenticate: Bearer`` (RFC 6750)
    when the token is missing or wrong. The comparison takes constant time."""
    token = config.admin.token
    if not token:
        return _json({"error": "mutating admin calls are disabled: set admin.token"}, 403)
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    # Header values arrive surrogate-escaped: any byte string compares (never a 500).
    presented = value.encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented, token.encode()):
        refused = _json({"error": "missing or wrong bearer token"}, 401)
        challenge = 'Bearer realm="jalur-admin"'
        if value:
            challenge += ', error="invalid_token"'
        refused.headers["WWW-Authenticate"] = challenge
        return refused
    return None


async def migration_view(request: web.Request) -> web.Response:
    status = request.app[STATUS]
    if status.migration_view is None:
        return _json({"error": "config not loaded"}, 503)
    try:
        return _json(await status.migration_view())
    except StoreError as exc:
        return _json({"error": f"live weights unavailable: {exc}"}, 503)


async def migration_update(request: web.Request) -> web.Response:
    """Change a split route's live weights for the whole fleet. A smaller commerce share
    than the live one (shoppers moved back) needs ``"rollback": true``; every change is
    audited with who and why."""
    status = request.app[STATUS]
    if status.config is None or status.ramp is None:
        return _json({"error": "config not loaded"}, 503)
    refused = _authorized(request, status.config)
    if refused is not None:
        return refused
    route = request.match_info["route"]
    try:
        body = orjson.loads(await request.read())
        weights = body["weights"]
        rollback = body.get("rollback", False)
        why = body.get("why", "")
        actor = body.get("actor", "")
        if (
            not isinstance(weights, dict)
            or not isinstance(rollback, bool)
            or not isinstance(why, str)
            or not isinstance(actor, str)
        ):
            raise TypeError
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return _json(
            {
                "error": 'body must be JSON {"weights": {"cluster": weight, ...}, '
                '"rollback": false, "why": "...", "actor": "..."}'
            },
            400,
        )
    actor = (actor or request.headers.get(ACTOR_HEADER, ""))[:MAX_ACTOR] or "admin"
    who = f"{actor} via {request.remote or '-'}"
    ask = RampRequest(route, weights, rollback, actor, why[:500], status.clock(), request.remote)
    try:
        done = await status.ramp(ask)
    except (WeightError, RampError) as exc:
        return _json({"error": str(exc)}, exc.status)
    except StoreError as exc:
        return _json({"error": f"live weights unavailable: {exc}"}, 503)
    log.warning(
        "migration weights changed: route=%s weights=%s rollback=%s by %s",
        route,
        weights,
        rollback,
        who,
    )
    return _json(done)


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own refusals (404 unknown path, 405 wrong method) as JSON like every other
    admin error; a 405 keeps its ``Allow`` header."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        refused = _json({"error": exc.reason.lower()}, exc.status)
        if "Allow" in exc.headers:
            refused.headers["Allow"] = exc.headers["Allow"]
        return refused
    return response


def make_app(status: Status, metrics: Metrics | None = None) -> web.Application:
    app = web.Application(middlewares=[json_errors])
    app[STATUS] = status
    if metrics is not None:
        app[METRICS] = metrics
        app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/config", config_view)
    app.router.add_get("/migration", migration_view)
    app.router.add_post("/migration/{route}", migration_update)
    return app
