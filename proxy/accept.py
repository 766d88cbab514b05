"""The data listener's accept loop: a burst of new connections is taken in one wake-up.

libuv, and so uvloop, accepts one connection per event-loop iteration (libuv PR #3696,
since 1.45) and relies on the listening socket staying readable for the next. An idle loop
iterates fast, so nobody notices; a saturated one iterates every few milliseconds, and a burst
of new connections then waits in the kernel's accept queue, each one an iteration behind the
previous. Measured on Jalur at 100 % CPU with wrk opening 200 connections: the accept queue
held 78 and drained by 4 or 5 per 20 ms, and the last first requests were answered after
680 ms while every accepted connection was served within 50 ms (the whole of the 200-connection
p99 tail of the benchmark).

``Acceptor`` reads the listening socket itself: on each readiness event it accepts until the
queue is empty or ``ACCEPT_BATCH`` connections were taken (NGINX's ``multi_accept on``, with a
bound), and hands each socket to the loop's ``connect_accepted_socket``. Out of file
descriptors or memory it stops accepting for ``ACCEPT_RETRY_DELAY`` (the kernel keeps queueing
up to the backlog) instead of spinning on a socket that stays readable. ``AcceptSite`` puts it
behind aiohttp's runner, so draining closes it like any site.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from yarl import URL

log = logging.getLogger("jalur")

# Connections accepted per readiness event. Bounds the time one wake-up spends on new
# connections (each costs a transport, a protocol and a task) while requests already in
# flight wait; 64 drains a 200-connection burst in 4 iterations instead of 200.
ACCEPT_BATCH: Final = 64
# The same for a socket several worker processes share (``--workers N``): whichever worker
# wakes first takes a whole batch, and keep-alive connections stay where they landed. With
# 64, two workers split a 200-connection start 64/136 at worst (measured); 8 keeps each
# wake-up's share small and still drains the burst in ~13 iterations per worker.
SHARED_ACCEPT_BATCH: Final = 8
# Seconds without accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM: the listening socket stays
# readable, so accepting at once again would spin the loop; the kernel queues meanwhile.
ACCEPT_RETRY_DELAY: Final = 1.0
_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Errors accept(2) reports about one pending connection (Linux passes network errors of the
# new socket on; a firewall may refuse it): skip that one and go on with the queue.
_SKIP: Final = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "EPERM",
    )
    if hasattr(errno, name)
)

# What a client's failed TLS handshake raises from ``connect_accepted_socket`` (an alert, a
# reset, a handshake timeout) on either loop.
_HANDSHAKE_FAILURES: Final = (ssl.SSLError, ConnectionError, TimeoutError)


class ListenError(OSError):
    """A listener could not be opened; its text is the one line an operator sees
    (``listen 127.0.0.1:8080: address already in use``)."""

    def __str__(self) -> str:
        return str(self.strerror)


def bind(host: str, port: int, backlog: int, what: str = "listen") -> socket.socket:
    """A listening TCP socket on the IP address ``host``, non-blocking. An IPv6 socket takes
    IPv6 only (as NGINX's ``ipv6only=on``), so ``0.0.0.0`` and ``::`` can be bound side by side.
    ``what`` names the listener in the ``ListenError`` raised when the bind fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            why = (exc.strerror or str(exc)).lower()
            raise ListenError(exc.errno, f"{what} {where}: {why}") from exc
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Acceptor(asyncio.AbstractServer):
    """Accepts connections on ``sock`` in batches; each gets a protocol from ``factory``."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        *,
        batch: int = ACCEPT_BATCH,
        on_exhausted: Callable[[], None] = lambda: None,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
        on_handshake_failed: Callable[[], None] = lambda: None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._tls = tls  # HTTPS: every accepted connection is wrapped (listen.tls)
        self._handshake_timeout = handshake_timeout
        self._on_handshake_failed = on_handshake_failed
        self._batch = batch
        self._sock = sock
        self._fd = sock.fileno()
        self._factory = factory
        self._on_exhausted = on_exhausted
        self._serving = False
        self._retry: asyncio.TimerHandle | None = None
        self._handing_over: set[asyncio.Task[Any]] = set()
        self._closed = asyncio.Event()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening socket (as ``asyncio.Server.sockets``; aiohttp reads the port)."""
        return () if self._closed.is_set() else (self._sock,)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._closed.is_set():
            raise RuntimeError("acceptor is closed")
        if not self._serving:
            self._sock.setblocking(False)
            self._loop.add_reader(self._fd, self._accept)
            self._serving = True

    async def serve_forever(self) -> None:
        await self.start_serving()
        await self._closed.wait()

    def close(self) -> None:
        """Stop accepting and close the listening socket; accepted connections live on."""
        if self._closed.is_set():
            return
        self._pause()
        self._sock.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        """Until closed and every connection accepted before has its protocol."""
        await self._closed.wait()
        if self._handing_over:
            await asyncio.gather(*self._handing_over, return_exceptions=True)

    def _pause(self) -> None:
        if self._serving:
            self._loop.remove_reader(self._fd)
            self._serving = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _resume(self) -> None:
        self._retry = None
        if not self._closed.is_set():
            self._loop.add_reader(self._fd, self._accept)
            self._serving = True

    def _accept(self) -> None:
        sock = self._sock
        for _ in range(self._batch):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # queue empty
            except OSError as exc:
                if exc.errno in _SKIP:
                    log.debug("accept skipped a connection: %s", exc)
                    continue  # e.g. the client gave up while queued
                if exc.errno not in _EXHAUSTED:
                    raise
                self._pause()  # first: whatever the callback does, the loop does not spin
                self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                log.error(
                    "cannot accept connections (%s): pausing accept for %.1fs",
                    exc.strerror,
                    ACCEPT_RETRY_DELAY,
                )
                self._on_exhausted()
                return
            try:
                conn.setblocking(False)
                # Answers go out as written (uvloop sets this too; the stdlib loop does not).
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                conn.close()  # reset while queued
                continue
            self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        task = self._loop.create_task(self._set_up(conn))
        self._handing_over.add(task)
        task.add_done_callback(self._handing_over.discard)

    async def _set_up(self, conn: socket.socket) -> None:
        # On both loops the protocol's connection_made runs a loop iteration or two after the
        # accept, so closing the listener does not end these: ``wait_closed`` waits for them
        # (a drain must see every connection it is to close). The transport owns the socket
        # from then on (it detaches it on close, so the close below is a no-op once it did).
        try:
            if self._tls is None:
                await self._loop.connect_accepted_socket(self._factory, conn)
            else:
                await self._loop.connect_accepted_socket(
                    self._factory,
                    conn,
                    ssl=self._tls,
                    ssl_handshake_timeout=self._handshake_timeout,
                )
        except Exception as exc:
            conn.close()
            if self._tls is not None and isinstance(exc, _HANDSHAKE_FAILURES):
                # A client that cannot or will not complete the TLS handshake (plain HTTP to
                # the HTTPS port, no or an untrusted client certificate, too slow): counted,
                # not logged per connection (scanners would flood the log).
                self._on_handshake_failed()
                log.debug("TLS handshake with a client failed: %r", exc)
            else:
                log.warning("accepted connection could not be set up: %r", exc)


class AcceptSite(web.BaseSite):
    """aiohttp site serving a runner's server through an ``Acceptor`` on a bound socket."""

    __slots__ = (
        "_batch",
        "_handshake_timeout",
        "_on_exhausted",
        "_on_handshake_failed",
        "_sock",
        "_tls",
    )

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        batch: int = ACCEPT_BATCH,
        on_exhausted: Callable[[], None] = lambda: None,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
        on_handshake_failed: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(runner)
        self._on_handshake_failed = on_handshake_failed
        self._sock = sock
        self._batch = batch
        self._on_exhausted = on_exhausted
        self._tls = tls
        self._handshake_timeout = handshake_timeout

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        scheme = "https" if self._tls is not None else "http"
        return str(URL.build(scheme=scheme, host=host, port=port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        acceptor = Acceptor(
            self._sock,
            server,
            batch=self._batch,
            on_exhausted=self._on_exhausted,
            tls=self._tls,
            handshake_timeout=self._handshake_timeout,
            on_handshake_failed=self._on_handshake_failed,
        )
        await acceptor.start_serving()
        self._server = acceptor

    async def stop(self) -> None:
        """Stop accepting, and return only once every connection accepted before is known to
        aiohttp's server (the runner's drain then closes or waits for it like the others)."""
        acceptor = self._server
        if acceptor is not None:
            acceptor.close()
            await acceptor.wait_closed()
        await super().stop()
