"""Assembly and lifecycle: the data listener, the admin listener, reload and drain.

The data listener is aiohttp's low-level ``web.Server`` (no router, no middlewares: one
handler) with a protocol subclass that enforces a header-read deadline, which aiohttp does
not have: a client that has not sent a complete request head within
``listen.header_read_timeout`` seconds is answered 408 and disconnected. Its connections are
accepted by ``accept.Acceptor`` (a burst in one wake-up, not one per loop iteration as uvloop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from . import accept, heap, parentwatch, tls
from . import admin as admin_mod
from . import audit as audit_mod
from . import config as cfg
from . import fleet as fleet_mod
from . import idempotency as idem
from .accesslog import AccessLog
from .compliance import AuditLog
from .forward import (
    LINGER,
    Forwarder,
    Services,
    State,
    build_state,
    error_response,
    new_request_id,
)
from .idempotency import make_store
from .metrics import Metrics
from .shadow import Shadower

log = logging.getLogger("jalur")


# Seconds between refreshes of the migration-progress gauge (a scrape may also refresh it).
PROGRESS_INTERVAL: Final = 5.0
# Connections that must have closed since the peak before the freed heap is returned to the
# kernel (heap.release): a burst of heavy connections (heads up to max_head_bytes each) must
# not stay resident, and ordinary churn never pays for a trim.
RELEASE_AFTER_CLOSED: Final = 256
# Seconds without a further close before the release: the rest of a closing burst is
# included ...
RELEASE_DELAY: Final = 1.0
# ... but a release waits at most this long after it was first due (steady churn).
RELEASE_MAX_WAIT: Final = 15.0


def timeout_408(request_id: str) -> bytes:
    """The answer to a client that did not send a whole request head in time (written to the
    socket directly: there is no request object to answer)."""
    return head_refusal(
        b"408 Request Timeout", "request head not received in time", "header_timeout", request_id
    )


def head_refusal(status: bytes, error: str, reason: str, request_id: str) -> bytes:
    """A JSON refusal of a request whose head never became a request, as raw bytes."""
    body = orjson.dumps({"error": error, "request_id": request_id, "reason": reason})
    return b"".join(
        (
            b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n",
            b"Connection: close\r\nX-Request-Id: ",
            request_id.encode(),
            b"\r\nContent-Length: ",
            str(len(body)).encode(),
            b"\r\n\r\n",
            body,
        )
    )


class _Protocol(RequestHandler):
    """aiohttp's HTTP/1.1 protocol plus the listener limits aiohttp does not have: a
    deadline for a complete request head, a connection cap, requests per connection and a
    bound on pipelined requests parsed ahead."""

    def __init__(self, manager: _Server, *, limits: cfg.Listen, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._jalur = manager
        self.server_header = limits.server_header  # read by ``respond.ServerHeader``
        self.body_timeout = limits.body_timeout  # read by ``clientbody.ClientBody``
        # Bytes of the request head being received (reset when a head is complete), and
        # the body of the last request parsed (bytes before its end are body, not head).
        self._head_bytes = 0
        self._last_payload: StreamReader | None = None
        self._header_timeout = limits.header_read_timeout
        self._header_deadline: asyncio.TimerHandle | None = None
        # Requests taken on for handling on this connection (the one reaching
        # ``max_requests_per_connection`` is served and answered with Connection: close).
        self.served = 0
        # aiohttp pauses reading when this many parsed requests wait (pipelining depth).
        self._max_msg_queue_size = limits.max_pipelined
        self._msg_queue_resume_size = max(1, limits.max_pipelined // 2)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._jalur
        if server.open_connections >= self._limits.max_connections:
            server.on_error("max_connections")
            transport.close()  # refused before any byte is read
            self._refused = True
            return
        self._refused = False
        server.open_connections += 1
        if server.open_connections > server.peak_connections:
            server.peak_connections = server.open_connections
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if getattr(self, "_refused", True):
            return
        self._jalur.connection_gone()
        self._last_payload = None  # it refers back to this protocol: no cycle left behind
        self._disarm()
        super().connection_lost(exc)

    @property
    def closing(self) -> bool:
        """The answer being written is this connection's last: it must say
        ``Connection: close`` (read by ``respond.ServerHeader`` and ``finish_response``)."""
        return (
            self._close
            or self._force_close
            or self._jalur.draining
            or self.served >= self._limits.max_requests_per_connection
        )

    def _awaiting_head(self) -> bool:
        """The next bytes belong to a request head: the last request parsed on this
        connection (if any) has its whole body."""
        last = self._last_payload
        return last is None or last.is_eof()

    def _head_over_limit(self, data: bytes) -> bool:
        """Would ``data`` take the head being received over ``max_head_bytes``? (Checked
        before the parser sees the bytes, so they are never buffered.)"""
        limit = self._limits.max_head_bytes
        if self._head_bytes + len(data) <= limit:
            return False
        end = data.find(b"\r\n\r\n")
        return end < 0 or self._head_bytes + end + 4 > limit

    def data_received(self, data: bytes) -> None:
        awaiting = self._awaiting_head()
        if awaiting and self._head_over_limit(data):
            if self.transport is not None:
                message = f"request head over {self._limits.max_head_bytes} bytes"
                rid = new_request_id(None)
                self.transport.write(
                    head_refusal(
                        b"431 Request Header Fields Too Large", message, "head_too_large", rid
                    )
                )
            self._jalur.on_error("head_too_large")
            self.force_close()
            return
        count = self._request_count
        if (self._close or self._force_close) and self._request_in_progress:
            # Closing (drain, or aiohttp's shutdown) while a request is being served: its
            # body must still arrive, or the request it belongs to is lost. aiohttp would
            # ignore these bytes; requests parsed from them are not served (the answer in
            # progress says Connection: close, so the client knows).
            close, force = self._close, self._force_close
            self._close = self._force_close = False
            try:
                super().data_received(data)
            finally:
                self._close, self._force_close = close, force
        else:
            super().data_received(data)
        if self._request_count != count:
            self._head_bytes = 0  # a head completed (a partial next one is not counted)
            if self._messages:
                self._last_payload = self._messages[-1][1]
        elif awaiting:
            self._head_bytes += len(data)
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
        self.transport.write(timeout_408(new_request_id(None)))
        self._jalur.on_error("header_timeout")
        self.force_close()  # closes the transport (the 408 is flushed first)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        headers = request.headers
        if "Transfer-Encoding" in headers or "Upgrade" in headers:
            # No further request on this connection, for two aiohttp parser flaws: after a
            # chunked request its C parser carries the last trailer field over into the next
            # request's headers; and after a request asking for an Upgrade it stops parsing,
            # so when no 101 is sent (the upgrade is not performed) whatever the client
            # pipelined behind that request is dropped unread.
            resp.force_close()
        if self.closing and not resp.prepared:
            resp.force_close()  # the last answer says so (Connection: close)
        out = await super().finish_response(request, resp, start_time)
        linger = request.get(LINGER)
        if linger is not None:
            # The body was refused (413/408): read and discard what still comes for at
            # most this long instead of aiohttp's 10 s, then close.
            self._lingering_time = linger
        return out

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Requests aiohttp refuses itself (malformed request line or headers) and handler
        crashes: a JSON error like every other, counted, never a traceback per bad client."""
        if request.writer.output_size > 0:
            log.error("error after the response started: %r", exc, exc_info=exc)
            raise ConnectionError("response already started; closing the connection")
        request_id = new_request_id(None)
        if status >= 500:
            log.error("internal error request_id=%s", request_id, exc_info=exc)
            reason, text = "internal", "internal proxy error"
        else:
            reason = "malformed"
            detail = getattr(exc, "message", None) or message or "malformed request"
            text = f"malformed request: {str(detail).strip().splitlines()[0][:120]}"
            log.debug("malformed request from %s: %s", request.remote, exc)
        manager = self._manager
        if isinstance(manager, _Server):
            manager.on_error(reason)
        resp = error_response(status, text, request_id, reason=reason)
        resp.force_close()
        # aiohttp answers an unparsable request as HTTP/1.0, where close is only implied.
        resp.headers["Connection"] = "close"
        return resp


class _Server(web.Server):
    def __init__(
        self,
        handler: Any,
        *,
        limits: cfg.Listen,
        on_error: Callable[[str], None] = lambda reason: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.on_error = on_error
        self.open_connections = 0
        # Set when a drain starts: every answer from then on says Connection: close and
        # its connection closes after it (clients reconnect, to another replica).
        self.draining = False
        # Most connections open since the heap was last released (see connection_gone).
        self.peak_connections = 0
        self._release: asyncio.TimerHandle | None = None
        self._release_first = 0.0  # when the pending release was first armed

    def connection_gone(self) -> None:
        """One connection fewer. Once ``RELEASE_AFTER_CLOSED`` of the peak are gone, the
        heap they used is released, ``RELEASE_DELAY`` after the closes pause (each close
        of the burst moves it, for at most ``RELEASE_MAX_WAIT``): a burst of closes is one
        release, so a flood of heavy connections does not stay resident."""
        self.open_connections -= 1
        if self.peak_connections - self.open_connections < RELEASE_AFTER_CLOSED:
            return
        now = self._loop.time()
        if self._release is None:
            self._release_first = now
        elif now - self._release_first < RELEASE_MAX_WAIT:
            self._release.cancel()
        else:
            return
        self._release = self._loop.call_later(RELEASE_DELAY, self._release_heap)

    def _release_heap(self) -> None:
        self._release = None
        self.peak_connections = self.open_connections
        heap.release()

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if isinstance(protocol, _Protocol):
            protocol.served += 1
        return super()._make_request(message, payload, protocol, writer, task)

    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=self._loop, limits=self.limits, **self._kwargs)


class ProxyServer:
    """One proxy instance: data listener (+ admin listener) around a swappable ``State``.

    With ``admin=False`` it is a worker under ``supervisor``: the supervisor owns the admin
    listener, readiness and the aggregated metrics."""

    def __init__(
        self,
        config: cfg.Config,
        *,
        config_path: str | None = None,
        metrics: Metrics | None = None,
        admin: bool = True,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.with_admin = admin
        self.status = admin_mod.Status()
        self.services = Services(
            metrics=metrics or Metrics.from_config(config),
            access=AccessLog.from_config(config.access_log),
            audit=AuditLog(config.compliance.audit, config.audit.key),
            shadower=Shadower(config.migration.max_shadow_in_flight, self._count_shadow),
            idempotency=make_store(config.store),
        )
        self.forwarder: Forwarder | None = None
        self._data_runner: web.BaseRunner | None = None
        self._data_server: _Server | None = None
        self._admin_runner: web.AppRunner | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._progress: asyncio.Task[None] | None = None
        # Live split weights: the fleet's store. A worker shares its supervisor's directory.
        shared = None if admin else self.services.metrics.multiprocess_dir
        self.fleet = fleet_mod.Fleet(
            fleet_mod.make_weight_store(config.store, shared), self.services.audit.record
        )
        self._poll: asyncio.Task[None] | None = None
        self.data_port = 0
        self.admin_port = 0
        self.stopped = asyncio.Event()

    async def start(self, *, data_sock: socket.socket | None = None) -> None:
        config = self.config
        self.services.audit.start()
        state = build_state(config, self.services.metrics)
        await self._reconcile(state, write=self.with_admin, first=True)
        self._count_reload(True)
        self.services.audit.record(audit_mod.config_record(config, state.migration.weights))
        self.forwarder = Forwarder(state, self.services)
        listen = config.listen
        server = _Server(
            self.forwarder.handle,
            limits=listen,
            keepalive_timeout=listen.keepalive_timeout,
            max_line_size=listen.max_line_size,
            max_field_size=listen.max_field_size,
            max_headers=listen.max_headers,
            access_log=None,
            auto_decompress=False,
            on_error=self.services.metrics.rejected,
        )
        self._data_server = server
        self._data_runner = web.ServerRunner(server, shutdown_timeout=config.drain.timeout)
        await self._data_runner.setup()
        batch = accept.SHARED_ACCEPT_BATCH  # the supervisor's socket, shared by the workers
        if data_sock is None:
            data_sock = accept.bind(listen.host, listen.port, listen.backlog)
            batch = accept.ACCEPT_BATCH
        metrics = self.services.metrics
        site = accept.AcceptSite(
            self._data_runner,
            data_sock,
            batch=batch,
            on_exhausted=lambda: metrics.rejected("accept_failed"),
            # The handshake is part of the request head's time budget (slow handshakes).
            tls=listener_tls("listen.tls", listen.tls, metrics),
            handshake_timeout=listen.header_read_timeout,
            on_handshake_failed=lambda: metrics.rejected("tls_handshake"),
        )
        await site.start()
        self.data_port = _bound_port(self._data_runner)
        if self.with_admin:
            self._admin_runner, self.admin_port = await start_admin(
                config, self.status, self.services.metrics
            )
        self.status.serving(config)
        if self.with_admin:  # under a supervisor, the supervisor reports it once
            self.status.store = await idem.report_store(self.services.idempotency, log)
        self.status.migration = lambda: self.state.migration
        self.status.audit = self.services.audit.record
        self.status.migration_view = self._migration_view
        self.status.ramp = self._ramp
        self._poll = asyncio.create_task(
            fleet_mod.poll(self.fleet, lambda: self._reconcile(self.state, write=False))
        )
        if self.with_admin:  # a worker's figure is not the pod's: the supervisor sets it
            self.status.refresh_progress = self._set_progress
            self._progress = asyncio.create_task(self._publish_progress())
        if not self.with_admin:
            log.info("worker pid %d accepting, %d routes", os.getpid(), len(config.routes))
            return
        log.info(
            "jalur serving on %s:%d (admin %s:%d), %d routes, %d clusters",
            listen.host,
            self.data_port,
            config.admin.host,
            self.admin_port,
            len(config.routes),
            len(config.clusters),
        )

    def _count_shadow(self, route: str, outcome: str) -> None:
        if self.forwarder is not None:
            bound = self.forwarder.state.bound.routes.get(route)
            if bound is not None:
                bound.shadow(outcome)

    def _set_progress(self) -> None:
        figures = self.state.migration.progress()
        ratios = {c: f.ratio for c, f in figures.items() if f.ratio is not None}
        self.services.metrics.set_migration_progress(ratios)

    async def _publish_progress(self) -> None:
        """Keep ``jalur_migration_progress_ratio`` current between scrapes."""
        while True:
            self._set_progress()
            await asyncio.sleep(PROGRESS_INTERVAL)

    async def _reconcile(self, state: State, *, write: bool, first: bool = False) -> None:
        """Install the fleet's live weights on ``state`` (see ``fleet.Fleet.reconcile``).
        At start a store that does not answer leaves the file's weights (logged); the poll
        applies the live ones within a second of the store answering."""
        kinds = {name: c.kind for name, c in state.clusters.items()}
        try:
            await self.fleet.reconcile(
                state.router.by_name, kinds, state.migration.apply, write=write
            )
        except fleet_mod.StoreError as exc:
            if not first:
                raise
            log.error("migration weights: store unreachable at start, file weights: %s", exc)
        self.services.metrics.set_migration_config(state.config.migration.weights, self.fleet.held)

    async def _migration_view(self) -> dict[str, Any]:
        view = self.state.migration.view()
        for name, route_view in view["routes"].items():
            route_view["live"] = self.fleet.view(name)
            route_view["held_back"] = self.fleet.held.get(name, False)
        return view

    async def _ramp(self, ask: admin_mod.RampRequest) -> dict[str, Any]:
        state = self.state
        targets = await self.fleet.ramp(
            state.router.by_name,
            state.guard,
            {name: c.kind for name, c in state.clusters.items()},
            ask.route,
            ask.weights,
            ask.now,
            actor=ask.actor,
            reason=ask.reason,
            rollback=ask.rollback,
            peer=ask.peer,
        )
        state.migration.apply(ask.route, targets)
        self.services.metrics.set_migration_config(state.config.migration.weights, self.fleet.held)
        view: dict[str, Any] = (await self._migration_view())["routes"][ask.route]
        return view

    @property
    def state(self) -> State:
        assert self.forwarder is not None
        return self.forwarder.state

    def _count_reload(self, ok: bool) -> None:
        """A reload of the pod is counted once: by its supervisor, not by each worker."""
        if self.with_admin:
            self.services.metrics.config_reload(ok)

    async def reload(self, config: cfg.Config | None = None) -> bool:
        """Load ``config`` (default: re-read ``config_path``), validate it (compliance
        included), build the new state and swap it in. Requests in flight finish on the
        state they started with; its pools close when the last one ends. An invalid config
        is refused and the running one keeps serving."""
        assert self.forwarder is not None
        metrics = self.services.metrics
        if config is None:
            if self.config_path is None:
                log.error("reload: no config file to read")
                self._count_reload(False)
                return False
            try:
                config = await asyncio.to_thread(cfg.load, self.config_path, env=os.environ)
            except cfg.ConfigError as exc:
                log.error("reload refused, still serving the previous config: %s", exc)
                self._count_reload(False)
                self.status.refused(str(exc))
                return False
        for fixed in ("listen", "admin"):
            if getattr(config, fixed) != getattr(self.config, fixed):
                log.warning("reload: %s settings change only on restart", fixed)
        try:
            new = build_state(config, metrics)
            await self._reconcile(new, write=self.with_admin)
        except Exception:
            log.exception("reload refused: could not build the new config")
            self._count_reload(False)
            self.status.refused("could not build the new config (see the log)")
            return False
        old = self.forwarder.state
        self.forwarder.state = new
        self.config = config
        self.status.serving(config)
        self._count_reload(True)
        self.services.audit.record(audit_mod.config_record(config, new.migration.weights))
        task = asyncio.create_task(old.retire(config.drain.timeout))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        log.info("reloaded: %d routes, %d clusters", len(config.routes), len(config.clusters))
        return True

    async def stop(self, *, drain_delay: float | None = None) -> None:
        """Drain: not ready at once, keep serving ``drain.delay``, stop accepting, wait
        for in-flight requests up to ``drain.timeout``, close upstream pools."""
        self.status.draining = True
        if self._data_server is not None:
            self._data_server.draining = True
        for task in (self._progress, self._poll):
            if task is not None:
                task.cancel()
        delay = self.config.drain.delay if drain_delay is None else drain_delay
        if delay > 0:
            log.info("draining: not ready, still serving for %.1fs", delay)
            await asyncio.sleep(delay)
        log.info("draining: no longer accepting, waiting for in-flight requests")
        if self._data_runner is not None:
            await self._data_runner.cleanup()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.services.shadower.close()
        await self.services.idempotency.close()
        await self.fleet.store.close()
        if self.forwarder is not None:
            await self.forwarder.state.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        await asyncio.to_thread(self.services.access.close)
        await asyncio.to_thread(self.services.audit.close)
        log.info("stopped")
        self.stopped.set()


async def start_admin(
    config: cfg.Config, status: admin_mod.Status, metrics: Metrics
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(admin_mod.make_app(status, metrics), access_log=None)
    await runner.setup()
    try:
        sock = accept.bind(config.admin.host, config.admin.port, 128, what="admin")
    except accept.ListenError:
        await runner.cleanup()
        raise
    site = web.SockSite(
        runner, sock, ssl_context=listener_tls("admin.tls", config.admin.tls, metrics)
    )
    await site.start()
    return runner, _bound_port(runner)


def listener_tls(
    section: str, spec: cfg.ListenerTls | None, metrics: Metrics
) -> ssl.SSLContext | None:
    """The rotating server context of a listener's ``tls`` section (None: plain HTTP)."""
    if spec is None:
        return None
    return tls.listener_context(tls.for_listener(section, spec, metrics))


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        return int(addr[1])
    raise RuntimeError("listener has no bound socket")


def file_signature(path: str) -> tuple[str, int, int, int] | None:
    """What identifies the config's content on disk. A Kubernetes ConfigMap update swaps
    the ``..data`` symlink in the mounted directory, so the file is resolved through its
    symlinks each time: the target path and inode change even when the mtime would not."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return (real, st.st_ino, st.st_mtime_ns, st.st_size)


async def watch_config(
    path: str,
    interval: float,
    on_change: Callable[[], Any],
    initial: tuple[str, int, int, int] | None = None,
) -> None:
    """Call ``on_change`` (sync or async) when the config file's signature differs from
    ``initial`` (default: the signature when the watch starts) or from the last change."""
    last = initial if initial is not None else file_signature(path)
    while True:
        await asyncio.sleep(interval)
        now = file_signature(path)
        if now is not None and now != last:
            last = now
            log.info("config file changed on disk: reloading")
            result = on_change()
            if asyncio.iscoroutine(result):
                await result


async def serve(
    config: cfg.Config,
    config_path: str | None = None,
    *,
    data_sock: socket.socket | None = None,
    on_ready: Callable[[], None] | None = None,
    parent: int | None = None,
) -> None:
    """One process: run until SIGTERM/SIGINT, then drain and return. SIGHUP reloads.

    With ``data_sock`` (a socket inherited from the supervisor) it runs as a worker: no
    admin listener, and SIGTERM stops accepting at once (the supervisor already waited
    ``drain.delay`` with ``/readyz`` failing). With ``parent`` (the supervisor's pid) it
    stops the same way once it is no longer that process's child (``parentwatch``)."""
    worker = data_sock is not None
    loaded = file_signature(config_path) if config_path is not None else None
    server = ProxyServer(config, config_path=config_path, admin=not worker)
    await server.start(data_sock=data_sock)
    if on_ready is not None:
        on_ready()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        tls.refresh_all(force=True)  # certificate files: re-read now, even if unchanged
        task = asyncio.create_task(server.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    watcher = None
    if config_path is not None and config.reload.watch and not worker:
        # Workers do not watch: their supervisor does and signals them.
        watcher = asyncio.create_task(
            watch_config(config_path, config.reload.interval, server.reload, loaded)
        )
    # Certificate files are watched by every process, workers too (each owns its contexts).
    cert_watch = None
    if config.reload.watch:
        cert_watch = asyncio.create_task(tls.watch(config.reload.interval))
    orphan_watch = None
    if parent is not None:
        orphan_watch = asyncio.create_task(parentwatch.watch_parent(parent, stop.set))
    await stop.wait()
    if parent is not None:
        # Stopping already. A supervisor killed with SIGKILL dies thread by thread and its
        # workers get the parent-death SIGTERM once per thread; one arriving after the loop
        # closed (which restores the default action) would end the worker before it cleans up.
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if cert_watch is not None:
        cert_watch.cancel()
    if orphan_watch is not None:
        orphan_watch.cancel()
    if watcher is not None:
        watcher.cancel()
    await server.stop(drain_delay=0 if worker else None)
