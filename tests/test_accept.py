"""The data listener's accept loop (``proxy/accept.py``) on both loops, real sockets.

A burst of queued connections is taken in a few loop iterations (uvloop alone takes one per
iteration, which made a saturated proxy's newest connections wait hundreds of milliseconds);
running out of file descriptors pauses accepting instead of spinning, and accepting resumes.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

import pytest
from aiohttp import web

from proxy import accept

from .conftest import Runner, descriptors_left, until


class Recorder(asyncio.Protocol):
    """Counts connections made, per test."""

    def __init__(self, made: list[asyncio.BaseTransport]) -> None:
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)


def connect_queued(port: int, n: int) -> list[socket.socket]:
    """``n`` clients whose handshakes the kernel completed: they wait in the accept queue."""
    clients = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        clients.append(c)
    return clients


def close_all(
    acceptor: accept.Acceptor, made: list[asyncio.BaseTransport], clients: list[socket.socket]
) -> None:
    acceptor.close()
    for t in made:
        t.close()
    for c in clients:
        c.close()


async def iterations_until(predicate: Callable[[], bool], limit: int = 10_000) -> int:
    """Loop iterations (rounds of ready callbacks) until ``predicate`` holds."""
    for n in range(limit):
        if predicate():
            return n
        await asyncio.sleep(0)
    raise AssertionError(f"not true after {limit} loop iterations")


def test_a_burst_is_accepted_in_a_few_loop_iterations(run: Runner) -> None:
    burst = 150

    async def main() -> int:
        made: list[asyncio.BaseTransport] = []
        sock = accept.bind("127.0.0.1", 0, 511)
        clients = connect_queued(sock.getsockname()[1], burst)
        acceptor = accept.Acceptor(sock, lambda: Recorder(made))
        try:
            await acceptor.start_serving()
            n = await iterations_until(lambda: len(made) == burst)
            assert all(not t.is_closing() for t in made)
            return n
        finally:
            close_all(acceptor, made, clients)

    iterations = run(main())
    # ceil(150 / ACCEPT_BATCH) = 3 readiness events, plus the hand-over's own steps; one
    # accept per iteration would need 150.
    assert iterations <= 8, iterations


def test_accepted_connections_carry_data_and_no_delay(run: Runner) -> None:
    async def main() -> None:
        got: list[bytes] = []
        served: list[asyncio.Transport] = []

        class Echo(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.Transport, transport)
                served.append(self.transport)
                sock = transport.get_extra_info("socket")
                got.append(b"nodelay=%d" % sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

            def data_received(self, data: bytes) -> None:
                got.append(data)
                self.transport.write(data.upper())

        sock = accept.bind("127.0.0.1", 0, 16)
        acceptor = accept.Acceptor(sock, Echo)
        await acceptor.start_serving()
        try:
            reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"PING"
            assert got[0] != b"nodelay=0"
            assert got[1:] == [b"ping"]
            writer.close()
        finally:
            acceptor.close()
            for t in served:
                t.close()
        assert acceptor.sockets == ()
        assert sock.fileno() == -1  # the listening socket is closed with the acceptor

    run(main())


def test_out_of_descriptors_pauses_accepting_then_resumes(run: Runner) -> None:
    queued = 6

    async def main() -> None:
        made: list[asyncio.BaseTransport] = []
        exhausted: list[int] = []
        sock = accept.bind("127.0.0.1", 0, 64)
        clients = connect_queued(sock.getsockname()[1], queued)
        acceptor = accept.Acceptor(
            sock, lambda: Recorder(made), on_exhausted=lambda: exhausted.append(1)
        )
        with descriptors_left(2):
            await acceptor.start_serving()
            await until(lambda: bool(exhausted), within=5)
        try:
            assert len(exhausted) == 1
            assert not acceptor.is_serving()  # not polled while paused: no busy loop
            assert len(made) <= 2
            # After ACCEPT_RETRY_DELAY it accepts again and takes the rest of the queue.
            await until(lambda: len(made) == queued, within=accept.ACCEPT_RETRY_DELAY + 5)
            assert acceptor.is_serving()
            assert len(exhausted) == 1
        finally:
            close_all(acceptor, made, clients)

    run(main())


def test_a_drain_sees_connections_accepted_just_before_it(run: Runner) -> None:
    """A connection accepted in the iteration the drain starts is still being set up (its
    protocol comes an iteration or two later). The site's stop waits for it, so aiohttp's
    shutdown closes it like any idle connection: nothing is served after the drain."""

    async def main() -> tuple[int, bytes]:
        async def handler(request: web.BaseRequest) -> web.Response:
            return web.Response(text="served after the drain")

        server = web.Server(handler, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=1)
        await runner.setup()
        sock = accept.bind("127.0.0.1", 0, 16)
        site = accept.AcceptSite(runner, sock)
        await site.start()
        acceptor = site._server
        assert isinstance(acceptor, accept.Acceptor)
        client = socket.create_connection(sock.getsockname()[:2], timeout=5)
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await iterations_until(lambda: bool(acceptor._handing_over))
            await runner.cleanup()  # stop accepting, then close idle connections
            left = len(server.connections)
            try:
                await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                # EOF (or a reset) instead of an answer
                return left, await asyncio.wait_for(loop.sock_recv(client, 1000), 5)
            except (ConnectionResetError, BrokenPipeError):
                return left, b""
        finally:
            client.close()

    left, answer = run(main())
    assert left == 0
    assert answer == b"", answer


def test_bind_ipv6_only_and_names_the_address_in_use() -> None:
    v6 = accept.bind("::1", 0, 16)
    try:
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        port = v6.getsockname()[1]
        # The same port on IPv4 is a different socket: both can listen (NGINX's ipv6only=on).
        v4 = accept.bind("127.0.0.1", port, 16)
        v4.close()
        with pytest.raises(
            accept.ListenError, match=rf"^listen \[::1\]:{port}: address already in use$"
        ):
            accept.bind("::1", port, 16)
    finally:
        v6.close()
