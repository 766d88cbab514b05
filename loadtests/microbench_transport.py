"""CPU per proxied request: ``AiohttpTransport`` against ``H1Transport``.

Two measurements, both on loopback only, everything started here stopped by PID:

1. **Transport alone.** An upstream answering a fixed 100-byte body with keep-alive (NGINX
   serving a static file when installed, else a minimal uvloop responder in this file,
   ``--upstream``) runs in a child process pinned to CPU 0; this process, pinned to CPU 1, runs
   ``--requests`` requests (``send`` + ``read_chunk`` to the end + ``release``) with
   ``--concurrency`` coroutines, through each transport in turn, ``--rounds`` times with the
   transports interleaved. Reported: medians of CPU time per request (``time.process_time``
   of this process over the measured requests) and requests per second, and their ratio.
2. **The whole proxy** (unless ``--no-wrk`` or ``wrk`` is missing). ``jalur run`` in a child
   process pinned to CPU 1, its clusters' transport chosen by this file: ``proxy-child`` mode
   replaces the transport class ``state.build_state`` constructs (``H1Transport``, the
   default) with a factory making the one asked for, which reports each transport it makes
   on stderr; the parent checks that report before measuring, so the two contenders are
   really different. ``wrk`` and the upstream on CPU 0. Reported: medians of req/s, p50/p99
   and the proxy's CPU time per request (``/proc/PID/stat`` utime + stime over the wrk run).

    .venv/bin/python loadtests/microbench_transport.py [--requests 20000] [--concurrency 50]
        [--rounds 5] [--wrk-rounds 3] [--wrk-seconds 10] [--wrk-conns 50] [--no-wrk]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import NGINX_UPSTREAM, cpu_seconds, free_port  # same upstream and accounting

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LOAD_CPU, CLIENT_CPU = 0, 1
BODY = b'{"id":"prod-000123","name":"Batik shirt","price_idr":185000,"stock":42,"ok":true}'
BODY = BODY + b" " * (99 - len(BODY)) + b"\n"  # exactly 100 bytes
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"Server: responder\r\nDate: Mon, 23 Nov 2026 00:00:00 GMT\r\n\r\n%s" % (len(BODY), BODY)
)
SERVING = re.compile(r"serving on [^:]+:(\d+) \(admin")
TRANSPORTS = ("aiohttp", "h1")
CLASSES = {"aiohttp": "AiohttpTransport", "h1": "H1Transport"}
TRANSPORT_MARK = "microbench: cluster transport "  # the proxy child's report of what it made


def log(msg: str) -> None:
    print(f"microbench: {msg}", file=sys.stderr, flush=True)


# -- the responder (child process) ---------------------------------------------------------


class _Responder(asyncio.Protocol):
    """Answers every request head (bodies are not expected) with RESPONSE, keep-alive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = buf.count(b"\r\n\r\n")
        if n:
            assert self.transport is not None
            self.transport.write(RESPONSE * n)
            buf = buf[buf.rindex(b"\r\n\r\n") + 4 :]
        self.buf = buf


def responder(port: int) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Responder, "127.0.0.1", port, backlog=4096)
        print(server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    uvloop.run(main())


def proxy_child(transport: str, config: str) -> int:
    """``jalur run -c config`` with the chosen upstream transport for every cluster (the
    WebSocket session, aiohttp's in both, is not used here)."""
    from aiohttp_transport import AiohttpTransport

    import proxy.state
    from proxy import config as cfg
    from proxy.h1transport import H1Transport

    def make(spec: cfg.Cluster, listen: cfg.Listen, **kw: Any) -> Any:
        made: Any = (
            AiohttpTransport(spec, listen)
            if transport == "aiohttp"
            else H1Transport(spec, listen, **kw)
        )
        print(f"{TRANSPORT_MARK}{type(made).__name__}", file=sys.stderr, flush=True)
        return made

    proxy.state.H1Transport = make  # type: ignore[misc, assignment]
    from proxy.cli import main

    return main(["--log-level", "INFO", "run", "-c", config])


# -- processes -------------------------------------------------------------------------------


class Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if shutil.which("taskset") else cmd


def start_responder(procs: Processes) -> tuple[int, str]:
    proc = procs.start(
        pinned(LOAD_CPU, [sys.executable, __file__, "responder"]), stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("microbench: responder did not start")
    return int(line), "a minimal uvloop responder (this file)"


def start_nginx(procs: Processes, nginx: str, work: Path) -> tuple[int, str]:
    """NGINX serving BODY as a static file: the upstream of loadtests/bench.py, same config."""
    work.chmod(0o755)  # NGINX workers may run as another user
    www = work / "www" / "api" / "feed"
    www.mkdir(parents=True)
    (www / "small").write_bytes(BODY)
    (work / "tmp").mkdir()
    (work / "tmp").chmod(0o777)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(NGINX_UPSTREAM.format(dir=work, port=port, www=work / "www"))
    cmd = [nginx, "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")]
    procs.start(pinned(LOAD_CPU, cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
            return port, f"NGINX ({version.strip().split('/')[-1]}) serving a static file"
        time.sleep(0.05)
    raise SystemExit("microbench: nginx did not start")


# -- 1. the transports alone -----------------------------------------------------------------


def make_transport(name: str, url: str, concurrency: int) -> Any:
    from aiohttp_transport import AiohttpTransport

    from proxy import config as cfg
    from proxy.h1transport import H1Transport

    spec = cfg.Cluster(system="s", endpoints=[url], max_connections=max(concurrency, 1))
    kind: Callable[..., Any] = H1Transport if name == "h1" else AiohttpTransport
    return kind(spec, cfg.Listen())


async def drive(transport: Any, url: str, requests: int, concurrency: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for ``requests`` requests through ``transport``."""
    from multidict import CIMultiDict

    from proxy.upstream import Endpoint

    endpoint = Endpoint.parse(url)
    headers: CIMultiDict[str] = CIMultiDict(
        [
            ("Host", "shop.example"),
            ("User-Agent", "wrk"),
            ("Accept", "*/*"),
            ("X-Forwarded-For", "127.0.0.1"),
            ("X-Forwarded-Proto", "http"),
            ("X-Forwarded-Host", "shop.example"),
            ("Via", "1.1 jalur"),
            ("X-Request-Id", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
        ]
    )
    per_worker = requests // concurrency

    async def worker() -> None:
        send = transport.send
        for _ in range(per_worker):
            resp = await send(endpoint, "GET", "/api/feed/small", headers, None)
            size = 0
            while chunk := await resp.read_chunk():
                size += len(chunk)
            resp.release()
            if resp.status != 200 or size != len(BODY):
                raise SystemExit(f"microbench: upstream answered {resp.status}, {size} bytes")

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - cpu0, time.perf_counter() - wall0


def transport_rounds(url: str, requests: int, concurrency: int, rounds: int) -> dict[str, Any]:
    import uvloop

    results: dict[str, list[tuple[float, float]]] = {n: [] for n in TRANSPORTS}

    async def main() -> None:
        for r in range(rounds):
            order = TRANSPORTS if r % 2 == 0 else tuple(reversed(TRANSPORTS))
            for name in order:
                transport = make_transport(name, url, concurrency)
                try:
                    await drive(transport, url, min(2000, requests), concurrency)  # warm up
                    cpu, wall = await drive(transport, url, requests, concurrency)
                finally:
                    await transport.close()
                done = (requests // concurrency) * concurrency
                results[name].append((cpu / done, done / wall))
                log(
                    f"round {r + 1} {name:8s} {cpu / done * 1e6:7.1f} µs CPU/req "
                    f"{done / wall:9,.0f} req/s"
                )

    uvloop.run(main())
    summary: dict[str, Any] = {}
    for name, samples in results.items():
        summary[name] = {
            "cpu_us": statistics.median(s[0] for s in samples) * 1e6,
            "rps": statistics.median(s[1] for s in samples),
        }
    return summary


# -- 2. the whole proxy under wrk ------------------------------------------------------------


def proxy_config(port: int, upstream: str, work: Path) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": 0},
        "drain": {"delay": 0, "timeout": 5},
        "systems": {
            "tiktok": {"kind": "social", "owns": {"cookies": ["tt_session"]}},
            "tokopedia": {"kind": "commerce", "owns": {"cookies": ["_SID_Tokopedia_"]}},
        },
        "clusters": {
            "feed": {"system": "tiktok", "endpoints": [upstream]},
            "tokopedia-pay": {"system": "tokopedia", "endpoints": [upstream]},
        },
        "routes": [
            {
                "name": "feed",
                "match": {"prefix": "/api/feed", "methods": ["GET", "HEAD"]},
                "category": "promotion",
                "to": "feed",
            },
            {
                "name": "payment",
                "match": {"prefix": "/api/payment"},
                "category": "payment",
                "to": "tokopedia-pay",
            },
        ],
        "compliance": {"audit": {"path": str(work / "audit.log")}},
        "access_log": {"sample": 0.01, "path": str(work / "access.log")},
    }


def start_proxy(
    procs: Processes, transport: str, config: Path, work: Path
) -> tuple[subprocess.Popen[bytes], int]:
    err = work / f"proxy-{transport}.log"
    cmd = [sys.executable, __file__, "proxy-child", "--transport", transport, "-c", str(config)]
    proc = procs.start(
        pinned(CLIENT_CPU, cmd), stdout=subprocess.DEVNULL, stderr=err.open("wb"), cwd=work
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = err.read_text(errors="replace")
        m = SERVING.search(text)
        if m:
            made = set(re.findall(re.escape(TRANSPORT_MARK) + r"(\w+)", text))
            if made != {CLASSES[transport]}:
                raise SystemExit(f"microbench: proxy for {transport} made transports {made}")
            return proc, int(m.group(1))
        if proc.poll() is not None:
            raise SystemExit(f"microbench: proxy exited: {err.read_text()[-2000:]}")
        time.sleep(0.1)
    raise SystemExit("microbench: proxy did not start in 30 s")


def wrk(url: str, seconds: float, conns: int) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--latency", url]
    out = subprocess.run(
        pinned(LOAD_CPU, cmd), capture_output=True, text=True, timeout=seconds + 60, check=True
    ).stdout
    total = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if total is None or rps is None:
        raise SystemExit(f"microbench: cannot read wrk output:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lat = {
        q: _ms(m.group(1))
        for q in ("50%", "99%")
        if (m := re.search(rf"^\s+{q}\s+(\S+)", out, re.M))
    }
    return {
        "requests": float(total.group(1)),
        "rps": float(rps.group(1)),
        "p50_ms": lat.get("50%", float("nan")),
        "p99_ms": lat.get("99%", float("nan")),
        "errors": float(errors.group(1)) if errors else 0.0,
    }


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        return float("nan")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return float(m.group(1)) * scale


def wrk_rounds(
    procs: Processes, upstream: str, rounds: int, seconds: float, conns: int
) -> dict[str, Any]:
    import yaml

    results: dict[str, list[dict[str, float]]] = {n: [] for n in TRANSPORTS}
    with tempfile.TemporaryDirectory(prefix="jalur-microbench-") as tmp:
        work = Path(tmp)
        for r in range(rounds):
            order = TRANSPORTS if r % 2 == 0 else tuple(reversed(TRANSPORTS))
            for name in order:
                port = free_port()
                config = work / f"jalur-{name}.yaml"
                config.write_text(yaml.safe_dump(proxy_config(port, upstream, work)))
                proc, port = start_proxy(procs, name, config, work)
                try:
                    url = f"http://127.0.0.1:{port}/api/feed/small"
                    wrk(url, 2, conns)  # warm up
                    cpu0 = cpu_seconds(proc.pid)
                    sample = wrk(url, seconds, conns)
                    cpu = cpu_seconds(proc.pid) - cpu0
                finally:
                    procs.stop(proc)
                sample["cpu_us"] = cpu / sample["requests"] * 1e6
                results[name].append(sample)
                log(
                    f"wrk round {r + 1} {name:8s} {sample['rps']:9,.0f} req/s "
                    f"{sample['cpu_us']:6.1f} µs CPU/req p50 {sample['p50_ms']:.2f} ms "
                    f"p99 {sample['p99_ms']:.2f} ms errors {sample['errors']:.0f}"
                )
    return {
        name: {k: statistics.median(s[k] for s in samples) for k in samples[0]}
        for name, samples in results.items()
    }


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    sub = parser.add_subparsers(dest="mode")
    r = sub.add_parser("responder")
    r.add_argument("--port", type=int, default=0)
    c = sub.add_parser("proxy-child")
    c.add_argument("--transport", choices=TRANSPORTS, required=True)
    c.add_argument("-c", "--config", required=True)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--wrk-rounds", type=int, default=3)
    parser.add_argument("--wrk-seconds", type=float, default=10.0)
    parser.add_argument("--wrk-conns", type=int, default=50)
    parser.add_argument("--no-wrk", action="store_true")
    parser.add_argument(
        "--upstream",
        choices=("auto", "nginx", "responder"),
        default="auto",
        help="what answers the 100-byte responses (auto: NGINX when installed)",
    )
    args = parser.parse_args(argv)
    if args.mode == "responder":
        responder(args.port)
        return 0
    if args.mode == "proxy-child":
        return proxy_child(args.transport, args.config)
    if args.requests < args.concurrency or args.concurrency < 1 or args.rounds < 1:
        parser.error("need --requests >= --concurrency >= 1 and --rounds >= 1")

    procs = Processes()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.TemporaryDirectory(prefix="jalur-microbench-")
    try:
        nginx = None if args.upstream == "responder" else shutil.which("nginx")
        if nginx is None and args.upstream == "nginx":
            parser.error("nginx not found")
        port, what = (
            start_nginx(procs, nginx, Path(tmp.name))
            if nginx is not None
            else start_responder(procs)
        )
        upstream = f"http://127.0.0.1:{port}"
        log(f"upstream {what} on {upstream} (CPU {LOAD_CPU}); client on CPU {CLIENT_CPU}")
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {CLIENT_CPU})
        alone = transport_rounds(upstream, args.requests, args.concurrency, args.rounds)
        a, h = alone["aiohttp"], alone["h1"]
        print(
            f"\nTransport alone: {args.requests:,} requests x {args.rounds} rounds, "
            f"concurrency {args.concurrency}, 100-byte responses from {what} (medians)"
        )
        print("| transport | CPU µs/request | req/s |\n|---|---:|---:|")
        for name in TRANSPORTS:
            print(f"| {name} | {alone[name]['cpu_us']:.1f} | {alone[name]['rps']:,.0f} |")
        print(f"CPU ratio aiohttp / h1: {a['cpu_us'] / h['cpu_us']:.2f}x")
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        if args.no_wrk or shutil.which("wrk") is None:
            if not args.no_wrk:
                log("wrk not found: skipping the whole-proxy measurement")
            return 0
        whole = wrk_rounds(procs, upstream, args.wrk_rounds, args.wrk_seconds, args.wrk_conns)
        print(
            f"\nWhole proxy (jalur run, 1 process on CPU {CLIENT_CPU}; wrk -t1 "
            f"-c{args.wrk_conns} -d{args.wrk_seconds:g}s and the upstream on CPU "
            f"{LOAD_CPU}; medians of {args.wrk_rounds} rounds)"
        )
        print(
            "| transport | req/s | proxy CPU µs/request | p50 ms | p99 ms | non-2xx |\n"
            "|---|---:|---:|---:|---:|---:|"
        )
        for name in TRANSPORTS:
            s = whole[name]
            print(
                f"| {name} | {s['rps']:,.0f} | {s['cpu_us']:.1f} | {s['p50_ms']:.2f} | "
                f"{s['p99_ms']:.2f} | {s['errors']:.0f} |"
            )
        wa, wh = whole["aiohttp"], whole["h1"]
        print(
            f"req/s ratio h1 / aiohttp: {wh['rps'] / wa['rps']:.2f}x; "
            f"CPU/request ratio aiohttp / h1: {wa['cpu_us'] / wh['cpu_us']:.2f}x"
        )
        return 0
    finally:
        procs.stop_all()
        tmp.cleanup()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
