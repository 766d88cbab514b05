"""``jalur run --workers N``: one bound socket, N worker processes, one admin listener.

The supervisor binds the data socket once and starts each worker as a fresh
``python -m proxy worker`` process that inherits the socket (so every worker accepts on the
same port, with no SO_REUSEPORT imbalance between stale and new processes). The supervisor
itself serves the admin listener: ``/readyz`` reflects the workers, ``/metrics`` aggregates
every worker through prometheus-client's multiprocess mode (the directory is set by the CLI
before prometheus-client is imported, and wiped at start).

Lifecycle:
- a worker that dies unexpectedly is restarted, with a back-off that grows on repeated
  crashes (``RESTART_BACKOFF``), and its live gauges are dropped (``mark_process_dead``);
- SIGHUP: the config file is validated here first; only a valid one is passed on (SIGHUP to
  every worker, each reloads itself); an invalid one is refused and counted;
- SIGTERM/SIGINT: ``/readyz`` fails at once, workers keep serving for ``drain.delay``, then
  each gets SIGTERM (stop accepting, finish in-flight up to ``drain.timeout``); a worker
  still alive after that is killed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from . import accept, tls
from . import admin as admin_mod
from . import config as cfg
from . import fleet as fleet_mod
from . import idempotency as idem
from .compliance import AuditLog, Guard
from .metrics import Metrics, mark_process_dead
from .migration import PodProgress
from .router import Router
from .server import PROGRESS_INTERVAL, start_admin, watch_config

log = logging.getLogger("jalur.supervisor")

# Seconds to wait before restarting a crashed worker, per consecutive crash (capped):
# protects the box from a crash loop burning CPU while still healing a one-off crash fast.
RESTART_BACKOFF: Final = (0.1, 0.5, 1.0, 2.0, 5.0)
# A worker that has served this long is considered healthy again (back-off resets).
STABLE_AFTER: Final = 30.0
# Seconds a worker may take to start serving before the supervisor gives up on it.
START_TIMEOUT: Final = 30.0
READY_LINE: Final = b"ready\n"


@dataclass
class Worker:
    slot: int
    proc: asyncio.subprocess.Process | None = None
    crashes: int = 0
    started: float = 0.0
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    def __init__(self, config: cfg.Config, config_path: str, workers: int) -> None:
        self.config = config
        self.config_path = config_path
        self.status = admin_mod.Status()
        self.metrics = Metrics.from_config(config)
        # Weight changes made here (admin calls, file ramps) are audited by this process.
        self.audit = AuditLog(config.compliance.audit, config.audit.key)
        self.fleet = fleet_mod.Fleet(
            fleet_mod.make_weight_store(config.store, self.metrics.multiprocess_dir),
            self.audit.record,
        )
        self.progress = PodProgress(config.migration.weights, config.migration.window)
        self.status.migration_view = self._migration_view
        self.status.ramp = self._ramp
        self.status.refresh_progress = self._set_progress
        self.status.audit = self.audit.record
        self.workers = [Worker(slot) for slot in range(workers)]
        self.stopping = False
        self.sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def bind(self) -> socket.socket:
        listen = self.config.listen
        sock = accept.bind(listen.host, listen.port, listen.backlog)
        sock.set_inheritable(True)
        self.sock = sock
        return sock

    def _kinds(self, config: cfg.Config) -> dict[str, str]:
        return {name: config.systems[c.system].kind for name, c in config.clusters.items()}

    async def _reconcile(self, config: cfg.Config, *, first: bool = False) -> None:
        """Record the file's ramps (or asked-for rollbacks) in the store before the workers
        load the file; the workers then apply the live weights themselves."""
        try:
            await self.fleet.reconcile(
                Router(config.routes).by_name,
                self._kinds(config),
                lambda _route, _targets: None,
                write=True,
            )
        except fleet_mod.StoreError as exc:
            if not first:
                raise
            log.error("migration weights: store unreachable at start: %s", exc)
        self.metrics.set_migration_config(config.migration.weights, self.fleet.held)

    def _set_progress(self) -> None:
        figures = self.progress.figures(self.metrics.migration_counts())
        ratios = {c: f.ratio for c, f in figures.items() if f.ratio is not None}
        self.metrics.set_migration_progress(ratios)

    async def _publish_progress(self) -> None:
        while True:
            await asyncio.to_thread(self._set_progress)
            await asyncio.sleep(PROGRESS_INTERVAL)

    async def _migration_view(self) -> dict[str, Any]:
        """The pod's view: live weights from the store, progress from every worker's
        counters (summed). Per-route observed shares are per process: not shown here."""
        config = self.config
        router = Router(config.routes)
        kinds = self._kinds(config)
        records = await self.fleet.store.load()
        figures = await asyncio.to_thread(self.progress.figures, self.metrics.migration_counts())
        routes = {}
        for name, route in router.by_name.items():
            if len(route.targets) < 2:
                continue
            live = records.get(name)
            configured = {t.cluster: t.weight for t in route.targets}
            routes[name] = {
                "category": route.category,
                "configured": configured,
                "weights": dict(live.weights) if live is not None else configured,
                "live": self.fleet.view(name) if name in self.fleet.records else None,
                "held_back": self.fleet.held.get(name, False),
                "systems": {t.cluster: kinds.get(t.cluster) for t in route.targets},
            }
        return {
            "window_seconds": config.migration.window,
            "category_weights": dict(config.migration.weights),
            "progress": {
                c: {"ratio": f.ratio, "requests": f.requests, "commerce": f.commerce}
                for c, f in figures.items()
            },
            "routes": routes,
        }

    async def _ramp(self, ask: admin_mod.RampRequest) -> dict[str, Any]:
        config = self.config
        router = Router(config.routes)
        await self.fleet.ramp(
            router.by_name,
            Guard(config, router),
            self._kinds(config),
            ask.route,
            ask.weights,
            ask.now,
            actor=ask.actor,
            reason=ask.reason,
            rollback=ask.rollback,
            peer=ask.peer,
        )
        self.metrics.set_migration_config(config.migration.weights, self.fleet.held)
        view: dict[str, Any] = (await self._migration_view())["routes"][ask.route]
        return view

    async def run(self) -> None:
        self.audit.start()
        await self._reconcile(self.config, first=True)
        self._spawn_task(self._publish_progress())
        # Follow the store like a worker does: the view stays current, and records the store
        # lost are put back (fleet.Fleet.reconcile).
        self._spawn_task(
            fleet_mod.poll(
                self.fleet,
                lambda: self.fleet.reconcile(
                    Router(self.config.routes).by_name,
                    self._kinds(self.config),
                    lambda _route, _targets: None,
                    write=False,
                ),
            )
        )
        sock = self.bind()
        admin_runner, admin_port = await start_admin(self.config, self.status, self.metrics)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        if self.config.reload.watch:
            self._spawn_task(tls.watch(self.config.reload.interval))  # the admin's files
            self._spawn_task(
                watch_config(self.config_path, self.config.reload.interval, self.reload)
            )
        for w in self.workers:
            self._spawn_task(self._keep_running(w))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await asyncio.gather(*(w.ready.wait() for w in self.workers))
        except TimeoutError:
            log.error("workers did not start in %.0fs", START_TIMEOUT)
            stop.set()
        else:
            store = idem.make_store(self.config.store)
            try:
                self.status.store = await idem.report_store(store, log)
            finally:
                await store.close()
            self.status.serving(self.config)
            self.metrics.config_reload(True)
            host, port = sock.getsockname()[:2]
            log.info(
                "jalur serving on %s:%d (admin %s:%d), %d workers",
                host,
                port,
                self.config.admin.host,
                admin_port,
                len(self.workers),
            )
        await stop.wait()
        await self.drain()
        await admin_runner.cleanup()
        sock.close()
        await self.fleet.store.close()
        await asyncio.to_thread(self.audit.close)

    def _on_hup(self) -> None:
        tls.refresh_all(force=True)  # the admin listener's certificate files
        self._spawn_task(self.reload())

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, w: Worker) -> None:
        assert self.sock is not None
        fd = self.sock.fileno()
        ready_r, ready_w = os.pipe()
        w.ready.clear()
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "--log-level",
            logging.getLevelName(logging.getLogger().level),
            "worker",
            "-c",
            self.config_path,
            "--fd",
            str(fd),
            "--ready-fd",
            str(ready_w),
            "--slot",
            str(w.slot),
            "--supervisor",
            str(os.getpid()),
            pass_fds=(fd, ready_w),
        )
        os.close(ready_w)
        w.started = asyncio.get_running_loop().time()
        self._spawn_task(self._await_ready(w, ready_r))

    async def _await_ready(self, w: Worker, fd: int) -> None:
        line = await asyncio.to_thread(_read_line, fd)
        if line == READY_LINE:
            w.ready.set()

    async def _keep_running(self, w: Worker) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            await self._start(w)
            assert w.proc is not None
            code = await w.proc.wait()
            mark_process_dead(w.proc.pid, self.metrics.multiprocess_dir)
            if self.stopping:
                return
            if loop.time() - w.started > STABLE_AFTER:
                w.crashes = 0
            delay = RESTART_BACKOFF[min(w.crashes, len(RESTART_BACKOFF) - 1)]
            w.crashes += 1
            log.error(
                "worker %d (pid %d) exited with %s; restarting in %.1fs",
                w.slot,
                w.proc.pid,
                code,
                delay,
            )
            await asyncio.sleep(delay)

    async def reload(self) -> None:
        try:
            config = await asyncio.to_thread(cfg.load, self.config_path, env=os.environ)
        except cfg.ConfigError as exc:
            log.error("reload refused, workers keep the previous config: %s", exc)
            self.metrics.config_reload(False)
            self.status.refused(str(exc))
            return
        try:
            await self._reconcile(config)
        except fleet_mod.StoreError as exc:
            log.error("reload refused, the live weights cannot be read: %s", exc)
            self.metrics.config_reload(False)
            return
        self.config = config
        self.status.serving(config)
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(signal.SIGHUP)
        self.metrics.config_reload(True)
        log.info("reload: valid config sent to %d workers", len(self.workers))

    async def drain(self) -> None:
        self.status.draining = True
        delay = self.config.drain.delay
        if delay > 0:
            log.info("draining: not ready, workers still serving for %.1fs", delay)
            await asyncio.sleep(delay)
        self.stopping = True
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        grace = self.config.drain.timeout + 5.0
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            for p in procs:
                if p.returncode is None:
                    log.error("worker pid %d did not stop in %.0fs: killing it", p.pid, grace)
                    p.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        log.info("all workers stopped")


def _read_line(fd: int) -> bytes:
    with os.fdopen(fd, "rb", buffering=0) as f:
        return f.readline()


async def supervise(config: cfg.Config, config_path: str, workers: int) -> None:
    await Supervisor(config, config_path, workers).run()
