"""Shared harness: simulated back ends and the proxy on loopback port 0, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import uvloop
import yaml
from aiohttp import web

from proxy import config as cfg
from proxy.demo.backend import RECEIVED, BackendSpec, Received, make_app
from proxy.server import ProxyServer

SYSTEMS: dict[str, Any] = {
    "tiktok": {"kind": "social", "owns": {"cookies": ["tt_session"], "headers": ["x-tt-user"]}},
    "tokopedia": {
        "kind": "commerce",
        "owns": {"cookies": ["_SID_Tokopedia_"], "headers": ["authorization"]},
    },
}


@dataclass
class Backend:
    cluster: str
    system: str
    port: int
    app: web.Application
    runner: web.AppRunner

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def received(self) -> list[Received]:
        return self.app[RECEIVED]


@dataclass
class Harness:
    tmp: Path
    backends: dict[str, Backend] = field(default_factory=dict)
    proxies: list[ProxyServer] = field(default_factory=list)
    runners: list[web.BaseRunner] = field(default_factory=list)

    async def backend(self, cluster: str, system: str, **kw: Any) -> Backend:
        app = make_app(BackendSpec(cluster=cluster, system=system, **kw))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = int(runner.addresses[0][1])
        b = Backend(cluster, system, port, app, runner)
        self.backends[cluster] = b
        self.runners.append(runner)
        return b

    async def proxy(self, data: dict[str, Any]) -> ProxyServer:
        conf = build_config(data, audit=self.tmp / "audit.log")
        server = ProxyServer(conf)
        await server.start()
        self.proxies.append(server)
        return server

    async def close(self) -> None:
        for p in self.proxies:
            if not p.stopped.is_set():
                await p.stop(drain_delay=0)
        for r in self.runners:
            await r.cleanup()


def build_config(
    data: dict[str, Any], audit: Path | None = None, env: dict[str, str] | None = None
) -> cfg.Config:
    base: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "drain": {"delay": 0, "timeout": 5},
        "systems": SYSTEMS,
        "compliance": {"audit": {"path": str(audit) if audit else "-"}},
    }
    base.update(data)
    return cfg.parse(yaml.safe_dump(base), env=env)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        await h.close()


def cluster(system: str, *urls: str, **extra: Any) -> dict[str, Any]:
    """A cluster's config: ``system``, its endpoints, any other cluster field."""
    return {"system": system, "endpoints": list(urls), **extra}


def one_route(clusters: dict[str, Any], to: str, category: str = "promotion") -> dict[str, Any]:
    """A config part with ``clusters`` and one catch-all route ``all`` to cluster ``to``."""
    return {
        "clusters": clusters,
        "routes": [{"name": "all", "match": {}, "category": category, "to": to}],
    }


T = TypeVar("T")


class Runner(Protocol):
    def __call__(self, coro: Coroutine[Any, Any, T]) -> T: ...


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a coroutine on a fresh loop of each kind the proxy can use (stdlib asyncio, and
    uvloop as ``jalur run`` does): for tests of code that talks to the loop directly."""

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        if request.param == "uvloop":
            result: T = uvloop.run(coro)
            return result
        return asyncio.run(coro)

    return runner


@contextlib.contextmanager
def descriptors_left(free: int) -> Iterator[None]:
    """Inside the block this process can open exactly ``free`` more file descriptors: the
    limit goes just above the highest one in use plus ``free``, every gap below it is filled
    with a placeholder, then ``free`` placeholders are given back. All restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + free, hard))
    fillers: list[int] = []
    try:
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        for _ in range(free):
            os.close(fillers.pop())
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in fillers:
            os.close(fd)


REDIS = shutil.which("redis-server")


class RedisServer:
    """A throw-away redis-server on a loopback port (no persistence unless asked), stopped
    by its PID."""

    def __init__(self, port: int, workdir: Path, *args: str) -> None:
        self.port = port
        self.workdir = workdir
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS is not None
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # until redis says it is ready (bounded by its output)
            if b"Ready to accept connections" in line:
                return
        raise RuntimeError("redis-server exited before it was ready")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS is None:
        pytest.skip("redis-server not installed (make test installs it)")
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    if request.param == "memory":
        yield {"kind": "memory"}
        return
    if REDIS is None:
        pytest.skip("redis-server not installed (make test installs it)")
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        yield {"kind": "redis", "url": server.url}
    finally:
        server.stop()


async def start_proxy(
    tmp_path: Path,
    conf: dict[str, Any],
    *args: str,
    path: Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[asyncio.subprocess.Process, str, str]:
    """``jalur run`` (with ``args``, and ``env`` added to the environment) on ``conf`` in a
    subprocess; (process, data URL, admin URL) once it serves."""
    data = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "drain": {"delay": 0, "timeout": 5},
        "systems": SYSTEMS,
        "compliance": {"audit": {"path": str(tmp_path / f"audit-{uuid.uuid4().hex}.log")}},
        **conf,
    }
    path = path or tmp_path / f"jalur-{uuid.uuid4().hex}.yaml"
    path.write_text(yaml.safe_dump(data))
    base = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", str(path), *args,
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        env={**base, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        while not (m := SERVING.search(line := (await proc.stderr.readline()).decode())):
            if not line:
                raise AssertionError("jalur exited before serving")
    # Keep reading its log: a full pipe would block the proxy's logging.
    task = asyncio.ensure_future(_drain(proc.stderr))
    _DRAINING.add(task)
    task.add_done_callback(_DRAINING.discard)
    return proc, f"http://127.0.0.1:{m.group(1)}", f"http://127.0.0.1:{m.group(2)}"


_DRAINING: set[asyncio.Future[None]] = set()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


def free_port() -> int:
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


async def raw_request(port: int, data: bytes, wait: float = 5.0) -> RawResponse:
    """Send raw bytes, read one response (Content-Length or close delimited)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = [
                (k.strip(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)
            ]
            length = next((int(v) for k, v in headers if k.lower() == "content-length"), None)
            body = await reader.readexactly(length) if length is not None else await reader.read()
        return RawResponse(status, headers, body)
    finally:
        writer.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawUpstream:
    """A hand-written HTTP/1.1 upstream for behaviours a real server would not show."""

    server: asyncio.Server
    port: int
    requests: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def raw_upstream(
    handler: Callable[[RawUpstream, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> RawUpstream:
    holder: list[RawUpstream] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(holder[0], reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    up = RawUpstream(server, int(server.sockets[0].getsockname()[1]))
    holder.append(up)
    return up


async def read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    headers = {
        k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)
    }
    return lines[0], headers


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    line, headers = await read_head(reader)
    n = int(headers.get("content-length", "0"))
    body = await reader.readexactly(n) if n else b""
    return line, headers, body


SERVING = re.compile(r"serving on [^:]+:(\d+) \(admin [^:]+:(\d+)\)")


def children(pid: int) -> list[int]:
    """Direct child PIDs of ``pid`` (from /proc, no external tools)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.extend(int(x) for x in text)
    return out


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``predicate`` until it holds (fails the test after ``within`` seconds)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


DEMO_CONFIG = Path(__file__).parent.parent / "config" / "demo.yaml"


@contextlib.asynccontextmanager
async def jalur_demo(tmp: Path, *args: str) -> AsyncIterator[tuple[str, str]]:
    """`jalur demo [args]` as a user runs it, on the demo config moved to free loopback
    ports: yields the proxy's and the admin listener's base URLs and the config, then
    stops it with SIGINT (which must exit 0)."""
    conf = yaml.safe_load(DEMO_CONFIG.read_text())
    conf["listen"]["port"] = conf["admin"]["port"] = 0
    ports: dict[str, int] = {}
    for spec in conf["clusters"].values():
        spec["endpoints"] = [
            f"http://127.0.0.1:{ports.setdefault(u, free_port())}" for u in spec["endpoints"]
        ]
    path = tmp / "demo.yaml"
    path.write_text(yaml.safe_dump(conf))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "demo",
        "-c",
        str(path),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=str(tmp),
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            first = (await proc.stdout.readline()).decode()
        m = re.search(r"proxy on (http://\S+), admin on (http://\S+)", first)
        assert m, first
        yield m.group(1), m.group(2)
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            code = await proc.wait()
    assert code == 0


# The built-in demo's ports, relative to its proxy port 8080.
DEMO_OFFSETS = (0, 9901 - 8080, *(p - 8080 for p in range(9001, 9007)))


def free_base() -> int:
    """A proxy port N such that N and every demo port moved with it are free now."""
    for _ in range(50):
        base = free_port()
        if base + max(DEMO_OFFSETS) > 65535:
            continue
        taken = False
        for offset in DEMO_OFFSETS:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + offset))
                except OSError:
                    taken = True
                    break
        if not taken:
            return base
    raise AssertionError("no free port range for the demo")


@contextlib.asynccontextmanager
async def demo_on_port_base(tmp: Path) -> AsyncIterator[tuple[int, int]]:
    """The built-in `jalur demo --port-base N` on a free range: yields (proxy port, admin
    port) once it serves; stopped with SIGINT, which must exit 0."""
    base = free_base()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "demo", "--port-base", str(base),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=str(tmp),
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            first = (await proc.stdout.readline()).decode()
        assert f"proxy on http://127.0.0.1:{base}," in first, first
        yield base, base + 9901 - 8080
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
