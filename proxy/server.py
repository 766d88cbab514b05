"""Assembly and lifecycle: the data listener, the admin listener, reload and drain.

The data listener is aiohttp's low-level ``web.Server`` (no router, no middlewares: one
handler) with a protocol subclass that enforces a header-read deadline, which aiohttp does
not have: a client that has not sent a complete request head within
``listen.header_read_timeout`` seconds is answered 408 and disconnected.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import Any, Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from . import admin
from . import config as cfg
from .accesslog import AccessLog
from .compliance import AuditLog
from .forward import Forwarder, Services, State, build_state
from .metrics import Metrics

log = logging.getLogger("jalur")


def _408() -> bytes:
    body = b'{"error":"request head not received in time","request_id":null}'
    return (
        b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


TIMEOUT_408: Final = _408()


class _Protocol(RequestHandler):
    """aiohttp's HTTP/1.1 protocol plus a deadline for receiving a complete request head."""

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self._disarm()  # a whole head arrived (or a handler owns the connection)
        elif self._header_deadline is None:
            self._arm()

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self._loop.call_later(self._header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expired(self) -> None:
        self._header_deadline = None
        if self._messages or self._request_in_progress or self.transport is None:
            return
        self.transport.write(TIMEOUT_408)
        self.force_close()


class _Server(web.Server):
    def __init__(self, handler: Any, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=self._loop, header_timeout=self._header_timeout, **self._kwargs)


class ProxyServer:
    """One proxy instance: data listener + admin listener around a swappable ``State``."""

    def __init__(
        self,
        config: cfg.Config,
        *,
        config_path: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.status = admin.Status()
        self.services = Services(
            metrics=metrics or Metrics.from_config(config),
            access=AccessLog.from_config(config.access_log),
            audit=AuditLog(config.compliance.audit),
        )
        self.forwarder: Forwarder | None = None
        self._data_runner: web.BaseRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self.data_port = 0
        self.admin_port = 0
        self.stopped = asyncio.Event()

    async def start(self, *, data_sock: socket.socket | None = None) -> None:
        config = self.config
        self.services.audit.start()
        state = build_state(config, self.services.metrics)
        self.services.metrics.config_reload(True)
        self.forwarder = Forwarder(state, self.services)
        listen = config.listen
        server = _Server(
            self.forwarder.handle,
            header_timeout=listen.header_read_timeout,
            keepalive_timeout=listen.keepalive_timeout,
            max_line_size=listen.max_line_size,
            max_field_size=listen.max_field_size,
            access_log=None,
            auto_decompress=False,
        )
        self._data_runner = web.ServerRunner(server, shutdown_timeout=config.drain.timeout)
        await self._data_runner.setup()
        site: web.BaseSite
        if data_sock is not None:
            site = web.SockSite(self._data_runner, data_sock)
        else:
            site = web.TCPSite(self._data_runner, listen.host, listen.port, reuse_address=True)
        await site.start()
        self.data_port = _bound_port(self._data_runner)

        self._admin_runner = web.AppRunner(
            admin.make_app(self.status, self.services.metrics), access_log=None
        )
        await self._admin_runner.setup()
        admin_site = web.TCPSite(self._admin_runner, config.admin.host, config.admin.port)
        await admin_site.start()
        self.admin_port = _bound_port(self._admin_runner)
        self.status.config = config
        log.info(
            "jalur serving on %s:%d (admin %s:%d), %d routes, %d clusters",
            listen.host,
            self.data_port,
            config.admin.host,
            self.admin_port,
            len(config.routes),
            len(config.clusters),
        )

    @property
    def state(self) -> State:
        assert self.forwarder is not None
        return self.forwarder.state

    async def stop(self, *, drain_delay: float | None = None) -> None:
        """Drain: not ready at once, keep serving ``drain.delay``, stop accepting, wait
        for in-flight requests up to ``drain.timeout``, close upstream pools."""
        self.status.draining = True
        delay = self.config.drain.delay if drain_delay is None else drain_delay
        if delay > 0:
            log.info("draining: not ready, still serving for %.1fs", delay)
            await asyncio.sleep(delay)
        log.info("draining: no longer accepting, waiting for in-flight requests")
        if self._data_runner is not None:
            await self._data_runner.cleanup()
        if self.forwarder is not None:
            await self.forwarder.state.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        await asyncio.to_thread(self.services.access.close)
        await asyncio.to_thread(self.services.audit.close)
        log.info("stopped")
        self.stopped.set()


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        return int(addr[1])
    raise RuntimeError("listener has no bound socket")


async def serve(config: cfg.Config, config_path: str | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain and return."""
    server = ProxyServer(config, config_path=config_path)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
