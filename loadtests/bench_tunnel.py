"""WebSocket through Jalur: today's message re-framing path against the byte tunnel.

The upstream (the demo back end's ``/_sim/ws`` echo) and the client (aiohttp's WebSocket
client keeping ``--window`` messages in flight) run in their own processes; the proxy
runs in this one, on uvloop, so its CPU time (``getrusage``) is the proxy's alone.

``reframe``
    a ``ProxyServer`` as ``jalur run`` serves it: aiohttp's listener and client, every
    message parsed and written again (``forward._pump_websockets``).
``tunnel``
    a minimal listener handing its connection to ``tunnel.open_upgrade`` + ``tunnel.splice``
    (no routing or policy: their cost is per upgrade, not per message).

The client sends ``--per-connection`` messages (500) per WebSocket connection, then opens
a new one, without ``permessage-deflate``: today's listener cuts a connection once its
client sent ``listen.max_head_bytes`` on the wire (see
``test_a_websocket_client_may_send_more_than_max_head_bytes``), so ``reframe`` runs with
that limit at its maximum (1 MiB) and 500 KiB per connection. Both modes pay the same
handshakes.

Each mode ``--rounds`` times, interleaved, medians printed as a Markdown table: proxy CPU
microseconds per message and MiB/s of echoed payload.

    python loadtests/bench_tunnel.py [--messages 20000] [--size 1024] [--rounds 3]
        [--window 16] [--per-connection 500] [--modes reframe,tunnel] [--idle 1000]

``--idle N`` also holds N upgraded connections open at once (a client process doing only
the handshakes) and prints the proxy's RSS growth per connection. ``--stream N`` instead
pushes N MiB through one tunnel (raw upgrade to a sink) and prints the rate, the proxy's
CPU per GiB and its largest RSS growth while streaming.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvloop
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import config as cfg  # noqa: E402
from proxy import tunnel  # noqa: E402
from proxy.server import ProxyServer  # noqa: E402
from proxy.upstream import Endpoint  # noqa: E402

CLIENT = """
import asyncio, sys, time, aiohttp
async def main(url, n, size, window, per_connection):
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    start = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        done = 0
        while done < n:
            batch = min(per_connection, n - done)
            async with s.ws_connect(url, max_msg_size=0, compress=0) as ws:
                sent = got = 0
                while got < batch:
                    while sent < batch and sent - got < window:
                        await ws.send_bytes(payload); sent += 1
                    msg = await ws.receive()
                    assert msg.data == payload, msg
                    got += 1
            done += batch
    print(time.perf_counter() - start)
asyncio.run(main(*sys.argv[1:2], *map(int, sys.argv[2:])))
"""

HOLD = """
import asyncio, base64, os, sys
async def main(port, n):
    conns = []
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        w.write(f"GET /_sim/ws HTTP/1.1\\r\\nHost: x\\r\\nConnection: Upgrade\\r\\n"
                f"Upgrade: websocket\\r\\nSec-WebSocket-Version: 13\\r\\n"
                f"Sec-WebSocket-Key: {key}\\r\\n\\r\\n".encode())
        head = await r.readuntil(b"\\r\\n\\r\\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        conns.append(w)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""

SINK = """
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(8)
while True:
    conn, _ = srv.accept()
    head = b""
    while b"\\r\\n\\r\\n" not in head and (data := conn.recv(65536)):
        head += data
    if b"\\r\\n\\r\\n" not in head:  # a port probe
        conn.close()
        continue
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: sink\\r\\n"
                 b"Connection: Upgrade\\r\\n\\r\\n")
    n = len(head.split(b"\\r\\n\\r\\n", 1)[1])
    while chunk := conn.recv(1 << 20):
        n += len(chunk)
    conn.sendall(str(n).encode()); conn.close()
"""

PUSH = """
import socket, sys, time
mib = int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: Upgrade\\r\\nUpgrade: sink\\r\\n\\r\\n")
head = b""
while b"\\r\\n\\r\\n" not in head:
    head += s.recv(4096)
assert head.startswith(b"HTTP/1.1 101 "), head
chunk = b"z" * (1 << 20)
start = time.perf_counter()
for _ in range(mib):
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
got = int(s.recv(64))
assert got == mib << 20, got
print(time.perf_counter() - start)
"""

UPSTREAM = """
import sys
from aiohttp import web
from proxy.demo.backend import BackendSpec, make_app
web.run_app(make_app(BackendSpec(cluster="live", system="tiktok")), host="127.0.0.1",
            port=int(sys.argv[1]), access_log=None, print=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Front(asyncio.Protocol):
    """The listener's hand-over, as in tests/test_tunnel.py."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end >= 0:
            self.transport.pause_reading()
            head, rest = self.buf[:end], self.buf[end + 4 :]
            asyncio.get_running_loop().create_task(self.serve(head, rest))

    async def serve(self, head: bytes, rest: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        headers = [(k.strip(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines[1:])]
        up = await tunnel.open_upgrade(
            self.endpoint,
            None,
            None,
            lines[0].split(" ")[1],
            headers,
            connect_timeout=2,
            head_timeout=5,
            max_head_bytes=65536,
        )
        fields = "".join(f"{k}: {v}\r\n" for k, v in up.headers if k.lower().startswith("sec-"))
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            + fields.encode()
            + b"\r\n"
        )
        await tunnel.splice(self.transport, rest, up, idle_timeout=60, max_bytes=None)


@contextlib.asynccontextmanager
async def proxy(mode: str, upstream: int) -> AsyncIterator[int]:
    if mode == "tunnel":
        endpoint = Endpoint.parse(f"http://127.0.0.1:{upstream}")
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Front(endpoint), "127.0.0.1", 0)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()
        return
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0, "max_head_bytes": 1024 * 1024},
        "admin": {"host": "127.0.0.1", "port": 0},
        "drain": {"delay": 0, "timeout": 1},
        "systems": {"tiktok": {"kind": "social"}, "tokopedia": {"kind": "commerce"}},
        "compliance": {"audit": {"path": "-"}},
        "access_log": {"enabled": False},
        "clusters": {"live": {"system": "tiktok", "endpoints": [f"http://127.0.0.1:{upstream}"]}},
        "routes": [{"name": "live", "match": {}, "category": "promotion", "to": "live"}],
    }
    server = ProxyServer(cfg.parse(yaml.safe_dump(data)))
    await server.start()
    try:
        yield server.data_port
    finally:
        await server.stop(drain_delay=0)


async def one(mode: str, upstream: int, args: argparse.Namespace) -> tuple[float, float]:
    async with proxy(mode, upstream) as port:
        url = f"http://127.0.0.1:{port}/_sim/ws"
        before = cpu()
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT,
            url,
            str(args.messages),
            str(args.size),
            str(args.window),
            str(args.per_connection),
            stdout=subprocess.PIPE,
        )
        out, _ = await client.communicate()
        used = cpu() - before
    seconds = float(out.decode().strip())
    per_message = used / args.messages * 1e6
    mib_s = args.messages * args.size / seconds / (1 << 20)
    return per_message, mib_s


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def idle(mode: str, upstream: int, n: int) -> float:
    """KiB of proxy RSS per idle upgraded connection, ``n`` of them open at once."""
    async with proxy(mode, upstream) as port:
        gc.collect()
        before = rss_kib()
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            HOLD,
            str(port),
            str(n),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert client.stdout is not None
        assert client.stdin is not None
        assert (await client.stdout.readline()).strip() == b"ready"
        gc.collect()
        used = rss_kib() - before
        client.stdin.close()
        await client.wait()
    return used / n


async def stream(mib: int) -> tuple[float, float, float]:
    """Push ``mib`` MiB through one tunnel to a sink: (MiB/s, proxy CPU s per GiB, largest
    proxy RSS growth in MiB seen while it streamed)."""
    port = free_port()
    sink = await asyncio.create_subprocess_exec(sys.executable, "-c", SINK, str(port))
    try:
        await wait_port(port)
        async with proxy("tunnel", port) as front:
            gc.collect()
            base = rss_kib()
            peak = base
            before = cpu()
            push = await asyncio.create_subprocess_exec(
                sys.executable, "-c", PUSH, str(front), str(mib), stdout=subprocess.PIPE
            )
            assert push.stdout is not None
            reading = asyncio.ensure_future(push.stdout.read())
            while not reading.done():
                peak = max(peak, rss_kib())
                await asyncio.wait([reading], timeout=0.05)
            used = cpu() - before
            await push.wait()
        seconds = float(reading.result().decode())
        return mib / seconds, used / mib * 1024, (peak - base) / 1024
    finally:
        sink.terminate()
        await sink.wait()


async def wait_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def main(args: argparse.Namespace) -> None:
    if args.stream:
        rate, cpu_gib, peak = await stream(args.stream)
        print(f"\n{args.stream} MiB through one tunnel, uvloop\n")
        print("| MiB/s | proxy CPU s/GiB | largest proxy RSS growth MiB |")
        print("|---:|---:|---:|")
        print(f"| {rate:.0f} | {cpu_gib:.2f} | {peak:.1f} |")
        return
    if args.measure_idle:  # a child of the run below, in a fresh process
        mode, upstream, n = args.measure_idle.split(":")
        print(await idle(mode, int(upstream), int(n)))
        return
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    up = await asyncio.create_subprocess_exec(sys.executable, "-c", UPSTREAM, str(port), env=env)
    try:
        await wait_port(port)
        results: dict[str, list[tuple[float, float]]] = {m: [] for m in args.modes.split(",")}
        for _ in range(args.rounds):
            for mode in results:
                results[mode].append(await one(mode, port, args))
        print(
            f"\n{args.messages} messages of {args.size} B, window {args.window}, "
            f"{args.per_connection} per connection, uvloop\n"
        )
        print("| mode | proxy CPU µs/message | echoed MiB/s |")
        print("|---|---:|---:|")
        for mode, rows in results.items():
            cpu_us = statistics.median(r[0] for r in rows)
            rate = statistics.median(r[1] for r in rows)
            print(f"| {mode} | {cpu_us:.1f} | {rate:.1f} |")
        if args.idle:
            print(f"\n{args.idle} idle upgraded connections open at once (fresh process each)\n")
            print("| mode | proxy RSS KiB per connection |")
            print("|---|---:|")
            for mode in results:
                child = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--measure-idle",
                    f"{mode}:{port}:{args.idle}",
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                )
                out, _ = await child.communicate()
                print(f"| {mode} | {float(out.decode().split()[-1]):.1f} |")
    finally:
        up.terminate()
        await up.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="reframe,tunnel")
    parser.add_argument("--per-connection", type=int, default=500)
    parser.add_argument("--idle", type=int, default=0, help="also: RSS of N idle tunnels")
    parser.add_argument("--measure-idle", default="", help=argparse.SUPPRESS)
    parser.add_argument("--stream", type=int, default=0, help="only: N MiB through one tunnel")
    uvloop.run(main(parser.parse_args()))
