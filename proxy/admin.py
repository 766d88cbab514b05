"""The admin listener: health, readiness and the loaded config. Never serves proxied traffic.

``/healthz`` (alias ``/livez``) answers 200 while the process runs; ``/readyz`` answers 200
only once a config is loaded and the proxy is not draining; ``/config`` shows the loaded
config with secrets masked; ``/metrics`` is the Prometheus exposition (OpenMetrics when the
scraper asks for it), served when ``make_app`` is given a ``Metrics``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import orjson
from aiohttp import web

from .config import Config
from .metrics import Metrics

# Config fields whose values are never shown, whatever their nesting.
SECRET_FIELDS: Final = frozenset({"token", "key", "secret", "password"})
MASK: Final = "***"


@dataclass(slots=True)
class Status:
    """Mutable process status the admin endpoints read (set by ``server``)."""

    config: Config | None = None
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.config is not None and not self.draining


STATUS: Final = web.AppKey("status", Status)
METRICS: Final = web.AppKey("metrics", Metrics)


def masked(config: Config) -> dict[str, Any]:
    def mask(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: (MASK if k in SECRET_FIELDS and v is not None else mask(v))
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [mask(v) for v in value]
        return value

    result: dict[str, Any] = mask(msgspec.to_builtins(config))
    return result


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    status = request.app[STATUS]
    if status.ready:
        return _json({"status": "ready"})
    reason = "draining" if status.draining else "config not loaded"
    return _json({"status": "not ready", "reason": reason}, status=503)


async def config_view(request: web.Request) -> web.Response:
    config = request.app[STATUS].config
    if config is None:
        return _json({"error": "config not loaded"}, status=503)
    return _json(masked(config))


async def metrics_view(request: web.Request) -> web.Response:
    # Rendering walks every series (and in multiprocess mode reads files): off the loop.
    body, content_type = await asyncio.to_thread(
        request.app[METRICS].render, request.headers.get("Accept")
    )
    return web.Response(body=body, headers={"Content-Type": content_type})


def make_app(status: Status, metrics: Metrics | None = None) -> web.Application:
    app = web.Application()
    app[STATUS] = status
    if metrics is not None:
        app[METRICS] = metrics
        app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/config", config_view)
    return app
