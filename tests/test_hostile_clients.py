"""Hostile clients on real sockets: slowloris on headers and on the body, a slow reader of a
large response, thousands of idle connections, a connection flood over the cap.

The slowloris cases run the proxy in-process (``Harness.proxy``); the memory and descriptor
cases run ``jalur run`` as a subprocess and read its RSS and open descriptors from /proc.
Every attacker loop is bounded in count and time; a normal client is served throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import SERVING, SYSTEMS, Harness, RawUpstream, raw_request, raw_upstream
from .wire import wire_upstream

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter

HEADER_TIMEOUT = 0.5  # listen.header_read_timeout in the slowloris config
BODY_IDLE = 0.5  # listen.body_idle_timeout in the slowloris config
SLOW_CLIENTS = 50
IDLE_CONNECTIONS = 5000
# What 5,000 idle connections may add to the proxy process: aiohttp keeps a protocol object,
# a transport and parser state per connection (measured ~6 KiB each; see the test output).
IDLE_RSS_BUDGET = 64 * 1024 * 1024
# What a client that does not read a 200 MB response may cost the proxy (the bound).
SLOW_READER_RSS_BUDGET = 30 * 1024 * 1024
FD_SLACK = 64  # descriptors beyond one per connection (pools, logs, the event loop)


def listener(h: Harness, b_url: str, **listen: Any) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0, **listen},
        "clusters": {"pay": {"system": "tokopedia", "endpoints": [b_url]}},
        "routes": [{"name": "all", "match": {}, "category": "promotion", "to": "pay"}],
    }


async def served_quickly(port: int, path: str = "/ok", within: float = 1.0) -> float:
    """One normal request; it must be answered 200 within ``within`` s. Returns seconds."""
    start = time.monotonic()
    r = await raw_request(
        port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), within
    )
    assert r.status == 200, r.body
    return time.monotonic() - start


async def keep_serving(port: int, stop: asyncio.Event, latencies: list[float]) -> None:
    """A normal client making requests back to back until ``stop`` (at most 500)."""
    for i in range(500):
        if stop.is_set():
            return
        latencies.append(await served_quickly(port, f"/normal/{i}"))


async def read_outcome(reader: asyncio.StreamReader) -> bytes:
    """Everything the proxy sends until it closes (a reset counts as a close)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def test_slowloris_on_headers_is_cut_and_others_are_served(harness: Harness) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(listener(harness, b.url, header_read_timeout=HEADER_TIMEOUT))
    port = p.data_port

    async def slow_head(i: int) -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        head = f"GET /slow/{i} HTTP/1.1\r\nHost: x\r\nX-Slow: {'a' * 200}\r\n\r\n".encode()
        outcome = asyncio.ensure_future(read_outcome(reader))
        try:
            # One byte every 50 ms: the whole head would take 12 s; the deadline is 0.5 s.
            for byte in head:
                if outcome.done():
                    break
                with contextlib.suppress(ConnectionError):
                    writer.write(bytes([byte]))
                await asyncio.sleep(0.05)  # the attacker's pace, not a synchronisation
            async with asyncio.timeout(5):
                data = await outcome
        finally:
            writer.close()
        return time.monotonic() - start, data

    stop = asyncio.Event()
    latencies: list[float] = []
    normal = asyncio.create_task(keep_serving(port, stop, latencies))
    async with asyncio.timeout(15):
        results = await asyncio.gather(*(slow_head(i) for i in range(SLOW_CLIENTS)))
    stop.set()
    await normal
    for took, data in results:
        assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data[:80]
        assert HEADER_TIMEOUT * 0.8 <= took < HEADER_TIMEOUT + 3.0, took
    assert sum(d.startswith(b"HTTP/1.1 408 ") for _, d in results) == SLOW_CLIENTS
    assert len(latencies) >= 3
    assert max(latencies) < 1.0, latencies
    assert not any(r.path.startswith("/slow/") for r in b.received)  # nothing reached it


async def test_slowloris_on_the_body_is_cut_and_others_are_served(harness: Harness) -> None:
    b = await harness.backend("pay", "tokopedia")
    # The uploads go to an upstream that records every byte (the demo back end records a
    # request only once its whole body arrived, so it cannot show a cut upload).
    up = await wire_upstream()
    conf = listener(harness, b.url, body_idle_timeout=BODY_IDLE)
    conf["clusters"]["wire"] = {"system": "tokopedia", "endpoints": [up.url]}
    upload = {"name": "upload", "match": {"prefix": "/upload/"}, "category": "promotion"}
    conf["routes"].insert(0, {**upload, "to": "wire"})
    p = await harness.proxy(conf)
    port = p.data_port
    declared = 1024 * 1024

    async def slow_body(i: int) -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST /upload/{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n".encode()
            + b"x" * 16
        )
        await writer.drain()
        start = time.monotonic()
        outcome = asyncio.ensure_future(read_outcome(reader))
        try:
            # 16 bytes every 2 x body_idle_timeout: the body would take hours.
            for _ in range(20):
                with contextlib.suppress(asyncio.TimeoutError):
                    async with asyncio.timeout(BODY_IDLE * 2):
                        await asyncio.shield(outcome)
                if outcome.done():
                    break
                with contextlib.suppress(ConnectionError):
                    writer.write(b"x" * 16)
            async with asyncio.timeout(5):
                data = await outcome
        finally:
            writer.close()
        return time.monotonic() - start, data

    stop = asyncio.Event()
    latencies: list[float] = []
    normal = asyncio.create_task(keep_serving(port, stop, latencies))
    try:
        async with asyncio.timeout(15):
            results = await asyncio.gather(*(slow_body(i) for i in range(SLOW_CLIENTS)))
    finally:
        stop.set()
        await normal
    for took, data in results:
        assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data[:80]
        assert took < BODY_IDLE * 2 + 3.0, took
    answered_408 = sum(d.startswith(b"HTTP/1.1 408 ") for _, d in results)
    counted = p.services.metrics.registry.get_sample_value(
        "jalur_requests_rejected_total", {"reason": "body_timeout"}
    )
    assert answered_408 == SLOW_CLIENTS  # no response had started: each gets its 408
    assert counted == SLOW_CLIENTS
    assert len(latencies) >= 3
    assert max(latencies) < 1.0, latencies
    # Each upload was under way upstream (streamed, not buffered), none completed, and the
    # proxy closed every upstream connection it had opened for one.
    try:
        assert up.received.count(b"POST /upload/") == SLOW_CLIENTS
        assert up.messages == []
        await up.until(lambda u: u.closed == u.connections == SLOW_CLIENTS)
    finally:
        up.close()


async def test_an_upload_past_the_limit_after_a_whole_answer_keeps_the_answer(
    harness: Harness,
) -> None:
    """The upstream answered in full while the upload was still coming; then the upload
    went over the route's limit. The answer stands, and the connection closes only after the
    proxy read and discarded what the client was still sending (``REFUSED_LINGER``): closed
    at once with those bytes unread, the kernel would reset the connection and the client
    would lose the answer it had not read yet."""
    limit = 1000
    answered = asyncio.Event()
    first = b"a" * 600

    async def early_answer(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        got = await reader.readuntil(b"\r\n\r\n")
        while first not in got:  # the first piece of the upload has arrived
            got += await reader.readexactly(1)
        up.requests.append(got)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        answered.set()
        await reader.read()  # until the proxy drops the connection

    raw = await raw_upstream(early_answer)
    p = await harness.proxy(
        {
            "clusters": {"raw": {"system": "tokopedia", "endpoints": [raw.url]}},
            "routes": [
                {"name": "all", "match": {}, "category": "promotion", "to": "raw"}
                | {"max_body_bytes": limit, "buffer_body_bytes": 0}  # streamed
            ],
        }
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", p.data_port)
    try:
        head = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + b"%x\r\n%s\r\n" % (len(first), first))
        async with asyncio.timeout(5):
            await answered.wait()
        # Past the limit, then 1 MiB more that the client sends before it reads anything.
        rest = [b"b" * 600] + [b"c" * 65536] * 16
        writer.write(b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in rest) + b"0\r\n\r\n")
        async with asyncio.timeout(5):
            await writer.drain()
            data = await reader.read()  # the answer, then the proxy closes
    finally:
        writer.close()
        raw.server.close()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data[:200]
    assert data.endswith(b"\r\n\r\nok")
    counted = p.services.metrics.registry.get_sample_value(
        "jalur_requests_rejected_total", {"reason": "body_too_large"}
    )
    assert counted == 1
    assert len(raw.requests) == 1  # one upstream exchange, nothing past the limit sent on


# -- a `jalur run` subprocess -----------------------------------------------------------------


@dataclass
class Jalur:
    proc: asyncio.subprocess.Process
    data_port: int
    admin_port: int

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    async def metric(self, name: str, **labels: str) -> float:
        r = await raw_request(
            self.admin_port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", r.body.decode(), re.M)
        return float(m.group(1)) if m else 0.0


@contextlib.asynccontextmanager
async def jalur_run(tmp: Path, conf: dict[str, Any]) -> AsyncIterator[Jalur]:
    """``jalur run`` on ``conf`` (stderr to a file, so a chatty proxy never blocks on a pipe);
    stopped by PID with SIGTERM (SIGKILL after 20 s)."""
    full = {
        "admin": {"host": "127.0.0.1", "port": 0},
        "drain": {"delay": 0, "timeout": 2},
        "systems": SYSTEMS,
        "access_log": {"enabled": False},
        "reload": {"watch": False},
        "compliance": {"audit": {"path": str(tmp / "audit.log")}},
        **conf,
    }
    path = tmp / "jalur.yaml"
    path.write_text(yaml.safe_dump(full))
    err_path = tmp / "jalur.err"
    with err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "-c", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=err, cwd=str(tmp),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        async with asyncio.timeout(20):
            while not (m := SERVING.search(err_path.read_text())):
                assert proc.returncode is None, err_path.read_text()
                await asyncio.sleep(0.05)  # polling the log file with a deadline
        yield Jalur(proc, int(m.group(1)), int(m.group(2)))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def poll(check: Callable[[], Awaitable[bool] | bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within} s: {what}")
        await asyncio.sleep(0.05)


async def test_a_slow_reader_of_a_large_response_keeps_memory_bounded(
    harness: Harness, tmp_path: Path
) -> None:
    b = await harness.backend("pay", "tokopedia")
    async with jalur_run(tmp_path, listener(harness, b.url)) as j:
        await served_quickly(j.data_port)
        baseline = j.rss()
        sock = socket.create_connection(("127.0.0.1", j.data_port))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(
                sock, b"GET /_sim/bytes/200000000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            head = await asyncio.wait_for(loop.sock_recv(sock, 1024), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            # Not reading for 2 s: the proxy must stop reading upstream, not buffer 200 MB.
            peak = baseline
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                peak = max(peak, j.rss())
                await asyncio.sleep(0.1)  # sampling pace
            # Then a slow read: at most 64 KiB every 10 ms for 2 s, sampling RSS all along.
            got = len(head)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                got += len(await asyncio.wait_for(loop.sock_recv(sock, 65536), 5))
                peak = max(peak, j.rss())
                await asyncio.sleep(0.01)
            # Meanwhile other clients are served.
            await served_quickly(j.data_port)
        finally:
            sock.close()
    growth = peak - baseline
    print(
        f"slow reader: proxy RSS baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} "
        f"MiB (+{growth / 2**20:.1f} MiB) while {got / 2**20:.1f} MiB of 200 MB were read"
    )
    assert got < 100_000_000  # it really was a slow reader
    assert growth < SLOW_READER_RSS_BUDGET, f"proxy RSS grew {growth / 2**20:.1f} MiB"


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} file descriptors; the hard limit (ulimit -Hn) is {hard}")
    if soft != resource.RLIM_INFINITY and soft < needed:
        # The proxy subprocess inherits the raised soft limit.
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# Connects in flight at once: well below the data listener's accept queue (listen.backlog,
# default 511), so a batch is never dropped for a full queue.
BATCH = 100


async def open_idle(j: Jalur, n: int, accepted: bool = True) -> list[socket.socket]:
    """``n`` connected sockets that never send a byte, connected ``BATCH`` at a time; with
    ``accepted``, each batch is in the proxy's hands (its descriptor count) before the next.

    (A burst of idle connects beyond the listen backlog is not all accepted: with SYN
    cookies the kernel drops the handshake's last ACK when the accept queue is full and an
    idle client never sends the byte that would complete it.)"""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []

    async def one() -> None:
        s = socket.socket()
        s.setblocking(False)
        socks.append(s)
        await loop.sock_connect(s, ("127.0.0.1", j.data_port))

    # A descriptor or two of the baseline may be a connection just closing.
    base = j.fds() - 2
    for start in range(0, n, BATCH):
        await asyncio.gather(*(one() for _ in range(min(BATCH, n - start))))
        if accepted:
            want = base + len(socks)

            def all_in(want: int = want) -> bool:
                return j.fds() >= want

            await poll(all_in, 10, f"{want - base} connections accepted")
    return socks


async def test_5000_idle_connections_keep_memory_and_fds_bounded(
    harness: Harness, tmp_path: Path
) -> None:
    raise_fd_limit(2 * IDLE_CONNECTIONS + 1000)
    b = await harness.backend("pay", "tokopedia")
    # Idle clients are cut after header_read_timeout; keep them for the whole test.
    conf = listener(harness, b.url, header_read_timeout=60)
    socks: list[socket.socket] = []
    async with jalur_run(tmp_path, conf) as j:
        await served_quickly(j.data_port)
        base_rss, base_fds = j.rss(), j.fds()
        try:
            async with asyncio.timeout(30):
                socks = await open_idle(j, IDLE_CONNECTIONS)
            held_rss, held_fds = j.rss(), j.fds()
            took = await served_quickly(j.data_port)
        finally:
            for s in socks:
                s.close()
        await poll(lambda: j.fds() <= base_fds + FD_SLACK, 15, "descriptors released")
        after_fds = j.fds()
        await served_quickly(j.data_port)
    growth = held_rss - base_rss
    print(
        f"{IDLE_CONNECTIONS} idle connections: proxy RSS {base_rss / 2**20:.1f} -> "
        f"{held_rss / 2**20:.1f} MiB (+{growth / IDLE_CONNECTIONS / 1024:.1f} KiB each), fds "
        f"{base_fds} -> {held_fds} -> {after_fds} after close; new client served in "
        f"{took * 1000:.0f} ms"
    )
    assert held_fds <= base_fds + IDLE_CONNECTIONS + FD_SLACK
    assert growth < IDLE_RSS_BUDGET, f"proxy RSS grew {growth / 2**20:.1f} MiB"
    assert took < 1.0


async def test_connections_over_max_connections_are_closed_at_once_and_counted(
    harness: Harness, tmp_path: Path
) -> None:
    cap, over = 1000, 200
    raise_fd_limit(2 * (cap + over) + 1000)
    b = await harness.backend("pay", "tokopedia")
    conf = listener(harness, b.url, max_connections=cap, header_read_timeout=60)
    socks: list[socket.socket] = []
    loop = asyncio.get_running_loop()
    async with jalur_run(tmp_path, conf) as j:
        base_fds = j.fds()
        try:
            async with asyncio.timeout(20):
                socks = await open_idle(j, cap)
            async with asyncio.timeout(20):
                extra = await open_idle(j, over, accepted=False)
            socks += extra
            start = time.monotonic()
            for s in extra:  # each one is closed by the proxy without a byte
                async with asyncio.timeout(5):
                    with contextlib.suppress(ConnectionResetError):
                        assert await loop.sock_recv(s, 1024) == b""
            closed_in = time.monotonic() - start
            refused = await j.metric("jalur_requests_rejected_total", reason="max_connections")
            held_fds = j.fds()
            # The held ones are still open: a request on one of them is answered.
            first = socks[0]
            await loop.sock_sendall(first, b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(5):
                assert (await loop.sock_recv(first, 1024)).startswith(b"HTTP/1.1 200")
        finally:
            for s in socks:
                s.close()
    print(
        f"max_connections {cap}: {over} connections over the cap closed in "
        f"{closed_in * 1000:.0f} ms, counted {refused:.0f}; fds {base_fds} -> {held_fds}"
    )
    assert refused == over
    assert held_fds <= base_fds + cap + FD_SLACK
