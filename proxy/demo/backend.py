"""Simulated back ends: small aiohttp apps that echo what crossed the proxy.

One app stands in for one cluster of a back-end system ("feed" of "tiktok", "payments" of
"commerce", ...). Every method on every path is answered with a JSON description of the request
as it arrived, so tests can assert exactly what the proxy forwarded. A few special paths (any path
*ending* in ``/_sim/...`` so that a proxy route prefix in front of them still matches) give tests
large downloads, chosen status codes, delays, a WebSocket echo and cookies.

Faults for soak runs: ``failure_rate`` answers a share of requests 503; ``reset_rate`` resets
the connection (TCP RST, no response) on a share of requests after reading them and *before*
executing them (no keyed execution is recorded for a reset request), so a proxy that sends the
request again cannot cause a double execution that the back end would not have caused itself.
Injected resets are counted in ``/_sim/faults``. With ``journal`` (``--journal FILE``) every
keyed execution and every injected reset is also appended to a JSON-lines file, which outlives a
restart of the process (the soak run reads it to attribute failures and find duplicates).

Run one standalone::

    python -m proxy.demo.backend --cluster feed --system tiktok --port 9001
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import re
import socket
import ssl
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any, Final

import orjson
from aiohttp import WSMsgType, web

__all__ = [
    "CHUNK_SIZE",
    "EXECUTIONS",
    "FAULTS",
    "MAX_BYTES",
    "MAX_DELAY_MS",
    "MAX_RECEIVED",
    "RECEIVED",
    "SPEC",
    "BackendSpec",
    "Executions",
    "Faults",
    "Received",
    "main",
    "make_app",
    "start_backend",
]

CHUNK_SIZE: Final = 64 * 1024
"""Read and write unit for bodies: uploads are hashed and downloads generated in chunks this big."""

MAX_BYTES: Final = 1024**3
"""Largest body ``/_sim/bytes/{n}`` will generate (1 GiB)."""

MAX_DELAY_MS: Final = 600_000
"""Longest wait ``/_sim/delay/{ms}`` accepts (10 minutes), so a typo cannot park a handler."""

MAX_RECEIVED: Final = 10_000
"""How many requests ``app[RECEIVED]`` keeps (the most recent ones).

Protects a long-running back end (demo, load tests) from growing without bound: every request
appends a record, so an unbounded list would be a memory leak proportional to traffic.
"""

_PATTERN: Final = bytes(range(256)) * (CHUNK_SIZE // 256)
"""One chunk of the ``/_sim/bytes`` body: byte ``i`` of the body is ``i % 256``."""

_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""RFC 9110 token: a valid cookie name."""

_COOKIE_VALUE_RE: Final = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
"""RFC 6265 cookie-octet*: a valid unquoted cookie value."""

_HEADER_UNSAFE_RE: Final = re.compile(r"[\x00-\x1f\x7f]")

CONTROL: Final = ("executions", "faults")
"""``/_sim/...`` paths that report counters: never failed or reset by the fault injection."""

_BARE: Final = frozenset({*CONTROL, "ws", "reset-executed", "cut-executed"})
"""``/_sim/...`` paths without arguments."""

_LINGER_RST: Final = struct.pack("ii", 1, 0)
"""``SO_LINGER`` on with a zero timeout: ``close()`` sends a TCP RST instead of a FIN."""


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """What one simulated back end is and how it misbehaves."""

    cluster: str
    """Cluster name, e.g. ``"feed"``; echoed and sent as ``x-backend-cluster``."""
    system: str
    """System name, e.g. ``"tiktok"``; echoed and sent as ``x-backend-system``."""
    latency: float = 0.0
    """Seconds added before answering each request."""
    failure_rate: float = 0.0
    """Share (0..1) of requests answered ``503 {"error": "simulated failure"}``."""
    reset_rate: float = 0.0
    """Share (0..1) of requests whose connection is reset (RST, no response) after the request
    was read and before it is executed; control paths (``/_sim/executions``, ``/_sim/faults``)
    are never reset."""
    late_rate: float = 0.0
    """Share (0..1) of keyed POST/PATCH requests answered ``late_delay`` seconds *after* they
    were executed: past the proxy's timeout, the fault after which only an idempotency
    record stops a second execution (journalled as ``late``)."""
    late_delay: float = 0.0
    """Seconds a late answer waits after the execution."""
    seed: int | None = None
    """Seed of the ``random.Random`` deciding failures and resets; ``None``: non-deterministic."""

    def __post_init__(self) -> None:
        for name in ("cluster", "system"):
            value: str = getattr(self, name)
            if not value or _HEADER_UNSAFE_RE.search(value):
                raise ValueError(f"{name} must be non-empty and free of control characters")
        for name in ("latency", "late_delay"):
            seconds: float = getattr(self, name)
            if not seconds >= 0.0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0, got {seconds!r}")
        for name in ("failure_rate", "reset_rate", "late_rate"):
            rate: float = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {rate!r}")


@dataclass(frozen=True, slots=True)
class Received:
    """One request as it reached the back end (see ``app[RECEIVED]``)."""

    method: str
    path: str
    """Raw path as received, percent escapes kept, without the query string."""
    query: str
    """Raw query string as received (no leading ``?``)."""
    headers: tuple[tuple[str, str], ...]
    """Header (name, value) pairs in received order, duplicates kept, names as sent."""
    body_bytes: int


RECEIVED: Final = web.AppKey("received", list[Received])
"""The last ``MAX_RECEIVED`` requests the app received, oldest first."""

SPEC: Final = web.AppKey("spec", BackendSpec)
"""The spec the app was made from."""


def _wire_text(text: str) -> str:
    """Text the HTTP parser decoded with surrogateescape, made JSON-safe.

    Valid UTF-8 comes back unchanged; undecodable bytes become ``\\xNN`` escapes instead of lone
    surrogates (which orjson refuses).
    """
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _sim_route(path: str) -> tuple[str, list[str]] | None:
    """The special route a raw path ends with, as ``(name, arguments)``, or ``None``.

    Matches on whole segments at the end of the path so that ``/api/feed/_sim/bytes/10`` (a proxy
    route prefix in front) works exactly like ``/_sim/bytes/10``.
    """
    segments = path.split("/")
    if len(segments) >= 2 and segments[-2] == "_sim" and segments[-1] in _BARE:
        return segments[-1], []
    if (
        len(segments) >= 3
        and segments[-3] == "_sim"
        and segments[-2]
        in (
            "bytes",
            "status",
            "delay",
        )
    ):
        return segments[-2], [segments[-1]]
    if len(segments) >= 4 and segments[-4] == "_sim" and segments[-3] == "set-cookie":
        return "set-cookie", [segments[-2], segments[-1]]
    return None


def _parse_int(text: str, low: int, high: int) -> int | None:
    """``text`` as a plain decimal integer within ``low..high``, else ``None``."""
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        return None
    value = int(text)
    return value if low <= value <= high else None


def _json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def _bad_request(message: str) -> web.Response:
    return _json_response({"error": message}, status=400)


@dataclass
class Executions:
    """POST/PATCH requests carrying an ``Idempotency-Key`` that this back end executed."""

    by_key: dict[str, int]  # key -> executions (the newest MAX_RECEIVED keys)
    keyed: int = 0  # executions with a key, in total
    duplicates: int = 0  # executions whose key had been executed before (a double charge)


EXECUTIONS: Final = web.AppKey("executions", Executions)
KEY_COUNT: Final = web.RequestKey("sim_key_count", int)


@dataclass
class Faults:
    """Faults this back end injected (``/_sim/faults``)."""

    resets: int = 0  # connections reset instead of answering (``reset_rate``)
    failures: int = 0  # requests answered 503 (``failure_rate``)


FAULTS: Final = web.AppKey("faults", Faults)


def _reset(request: web.Request) -> None:
    """Drop the client's connection with a TCP RST, without a byte of response."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


def make_app(spec: BackendSpec, journal: IO[bytes] | None = None) -> web.Application:
    """An aiohttp app simulating the back-end cluster described by ``spec``.

    ``journal``: a binary file that gets one JSON line per keyed execution and per injected
    reset (flushed at once), e.g. ``{"event": "reset", "request_id": ..., ...}``.
    """
    rng = random.Random(spec.seed)
    # A stream of its own, so turning resets on does not change which requests fail.
    reset_rng = random.Random(None if spec.seed is None else f"reset-{spec.seed}")
    late_rng = random.Random(None if spec.seed is None else f"late-{spec.seed}")
    app = web.Application()
    app[SPEC] = spec
    app[RECEIVED] = []
    app[EXECUTIONS] = Executions(by_key={})
    app[FAULTS] = Faults()

    def record(event: str, request: web.Request, **extra: Any) -> None:
        if journal is None:
            return
        line = {
            "t": round(time.time(), 3),
            "event": event,
            "cluster": spec.cluster,
            "method": request.method,
            "path": request.path,
            "request_id": request.headers.get("X-Request-Id"),
            **extra,
        }
        journal.write(orjson.dumps(line) + b"\n")
        journal.flush()

    async def add_backend_headers(request: web.Request, response: web.StreamResponse) -> None:
        # A signal rather than per-response code: covers echoes, errors, streamed downloads and
        # the WebSocket handshake alike.
        response.headers["x-backend-cluster"] = spec.cluster
        response.headers["x-backend-system"] = spec.system
        count = request.get(KEY_COUNT)
        if count is not None:
            response.headers["x-sim-executions"] = str(count)

    app.on_response_prepare.append(add_backend_headers)

    async def handler(request: web.Request) -> web.StreamResponse:
        path, _, query = request.raw_path.partition("?")
        path = _wire_text(path)
        query = _wire_text(query)
        headers = tuple(
            (
                name.decode("utf-8", "backslashreplace"),
                value.decode("utf-8", "backslashreplace"),
            )
            for name, value in request.raw_headers
        )

        # Stream the body: hash and count chunk by chunk, never hold it whole.
        digest = hashlib.sha256()
        body_bytes = 0
        async for chunk in request.content.iter_chunked(CHUNK_SIZE):
            digest.update(chunk)
            body_bytes += len(chunk)

        route = _sim_route(path)
        control = route is not None and route[0] in CONTROL
        if spec.reset_rate > 0.0 and not control and reset_rng.random() < spec.reset_rate:
            # Read, not executed, never answered: the client sees a reset after its request.
            request.app[FAULTS].resets += 1
            record("reset", request, key=request.headers.get("Idempotency-Key"))
            _reset(request)
            return web.Response()  # never written: aiohttp drops it on the closed transport

        key = request.headers.get("Idempotency-Key")
        if key is not None and request.method in ("POST", "PATCH"):
            # How often this back end executed a request with this key: a payment charged
            # twice shows as 2 (the load test fails on it).
            executions = request.app[EXECUTIONS]
            seen = executions.by_key
            count = seen.get(key, 0) + 1
            seen[key] = count
            executions.keyed += 1
            executions.duplicates += count > 1
            if len(seen) > MAX_RECEIVED:
                del seen[next(iter(seen))]
            request[KEY_COUNT] = count
            record("executed", request, key=key, count=count)
            if spec.late_rate > 0.0 and late_rng.random() < spec.late_rate:
                record("late", request, key=key)
                await asyncio.sleep(spec.late_delay)

        received = request.app[RECEIVED]
        received.append(Received(request.method, path, query, headers, body_bytes))
        if len(received) > MAX_RECEIVED:
            del received[: len(received) - MAX_RECEIVED]

        echo = {
            "cluster": spec.cluster,
            "system": spec.system,
            "method": request.method,
            "path": path,
            "query": query,
            "headers": headers,
            "body_bytes": body_bytes,
            "body_sha256": digest.hexdigest(),
        }

        if spec.latency > 0.0:
            await asyncio.sleep(spec.latency)
        if spec.failure_rate > 0.0 and not control and rng.random() < spec.failure_rate:
            request.app[FAULTS].failures += 1
            return _json_response({"error": "simulated failure"}, status=503)

        if route is None:
            return _json_response(echo)
        name, args = route

        if name == "bytes":
            size = _parse_int(args[0], 0, MAX_BYTES)
            if size is None:
                return _bad_request(f"byte count must be an integer within 0..{MAX_BYTES}")
            return await _stream_bytes(request, size)

        if name == "status":
            code = _parse_int(args[0], 200, 599)
            if code is None:
                return _bad_request("status code must be an integer within 200..599")
            if code in (204, 304):
                return web.Response(status=code)
            return _json_response(echo, status=code)

        if name == "delay":
            delay_ms = _parse_int(args[0], 0, MAX_DELAY_MS)
            if delay_ms is None:
                return _bad_request(f"delay must be an integer within 0..{MAX_DELAY_MS} ms")
            await asyncio.sleep(delay_ms / 1000)
            return _json_response(echo)

        if name == "set-cookie":
            cookie_name, cookie_value = args
            if not _TOKEN_RE.fullmatch(cookie_name) or not _COOKIE_VALUE_RE.fullmatch(cookie_value):
                return _bad_request("cookie name must be a token and value cookie-octets")
            response = _json_response(echo)
            response.headers.add("Set-Cookie", f"{cookie_name}={cookie_value}; Path=/")
            return response

        if name == "executions":
            executions = request.app[EXECUTIONS]
            return _json_response({"keyed": executions.keyed, "duplicates": executions.duplicates})

        if name == "faults":
            faults = request.app[FAULTS]
            return _json_response({"resets": faults.resets, "failures": faults.failures})

        if name == "reset-executed":
            # Executed (counted above), then reset without an answer: the fault after which
            # only an idempotency record stops a second execution.
            request.app[FAULTS].resets += 1
            record("reset", request)
            _reset(request)
            return web.Response()

        if name == "cut-executed":
            # Executed, the head and half the body sent, then reset mid-body.
            cut = web.StreamResponse(headers={"Content-Length": "1000"})
            await cut.prepare(request)
            await cut.write(b"x" * 500)
            request.app[FAULTS].resets += 1
            _reset(request)
            return cut

        # name == "ws"
        return await _websocket_echo(request)

    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def _stream_bytes(request: web.Request, size: int) -> web.StreamResponse:
    """Answer with ``size`` generated bytes, written chunk by chunk with Content-Length set."""
    response = web.StreamResponse()
    response.content_type = "application/octet-stream"
    response.content_length = size
    await response.prepare(request)
    if request.method != "HEAD":
        view = memoryview(_PATTERN)
        remaining = size
        while remaining > 0:
            step = min(remaining, CHUNK_SIZE)
            await response.write(view[:step])
            remaining -= step
    await response.write_eof()
    return response


async def _websocket_echo(request: web.Request) -> web.StreamResponse:
    """Echo text and binary frames back until the client closes."""
    ws = web.WebSocketResponse()
    if not ws.can_prepare(request).ok:
        return _bad_request("expected a WebSocket upgrade request")
    await ws.prepare(request)
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await ws.send_bytes(message.data)
        elif message.type is WSMsgType.ERROR:
            break
    await ws.close()
    return ws


async def start_backend(
    spec: BackendSpec,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, int]:
    """Start a back end for ``spec`` on ``host:port``; return its runner and actual bound port.

    Pass ``port=0`` to let the OS pick a free port. Stop it with ``await runner.cleanup()``; the app
    (and ``app[RECEIVED]``) is ``runner.app``.
    """
    runner = web.AppRunner(make_app(spec), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        # runner.addresses reads getsockname() of the site's listening sockets.
        addresses = runner.addresses
        if not addresses:
            raise RuntimeError(f"back end on {host}:{port} has no listening socket")
        bound_port = int(addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound_port


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.demo.backend",
        description="Run one simulated Jalur back end that echoes what it receives.",
    )
    parser.add_argument("--cluster", required=True, help="cluster name, e.g. feed")
    parser.add_argument("--system", required=True, help="system name, e.g. tiktok")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    parser.add_argument(
        "--failure-rate", type=float, default=0.0, help="share (0..1) of requests answered 503"
    )
    parser.add_argument(
        "--reset-rate",
        type=float,
        default=0.0,
        help="share (0..1) of requests whose connection is reset before they are executed",
    )
    parser.add_argument(
        "--late-rate",
        type=float,
        default=0.0,
        help="share (0..1) of keyed POST/PATCH answered --late-delay seconds after executing",
    )
    parser.add_argument("--late-delay", type=float, default=0.0, help="seconds (see --late-rate)")
    parser.add_argument("--seed", type=int, default=None, help="seed for simulated faults")
    parser.add_argument(
        "--journal", default=None, help="append keyed executions and resets to this JSON-lines file"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: run one back end until interrupted."""
    args = _parse_args(argv)
    try:
        spec = BackendSpec(
            cluster=args.cluster,
            system=args.system,
            latency=args.latency,
            failure_rate=args.failure_rate,
            reset_rate=args.reset_rate,
            late_rate=args.late_rate,
            late_delay=args.late_delay,
            seed=args.seed,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    journal = open(args.journal, "ab") if args.journal else None  # noqa: SIM115 (process-long)

    loop: asyncio.AbstractEventLoop | None = None
    try:
        import uvloop
    except ImportError:
        pass
    else:
        loop = uvloop.new_event_loop()

    web.run_app(
        make_app(spec, journal),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
