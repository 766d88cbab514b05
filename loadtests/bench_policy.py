"""What each traffic-policy feature costs per request: ``make bench-policy``.

One ``jalur run`` process per configuration, all on the same upstream (NGINX serving the
small JSON file of ``bench.py``, and answering 200 to OTLP exports on ``/v1/traces``),
measured with ``wrk`` at fixed concurrency, configurations interleaved over ``--rounds``.
The measured route is ``bench.jalur_config``'s ``feed`` route with, per configuration:

``off``
    no route timeout, no rate limit, ``tracing.enabled: false`` (traceparent untouched);
``timeout``
    ``timeout: 10`` and a route ``retry`` block (per-try 2 s x 2);
``ratelimit-local``
    a ``user`` bucket (the identity digest of Authorization) and a ``route`` bucket in the
    process, rates high enough never to refuse;
``ratelimit-fleet``
    the same buckets fleet-wide in a redis-server (one Lua call per request);
``trace``
    W3C trace context (the default): traceparent read, a new one per try, ids logged;
``trace-otlp``
    plus OpenTelemetry spans exported over OTLP/HTTP, every request sampled;
``all``
    timeout, local rate limit and trace-otlp together.

Every request carries ``Authorization`` and a sampled ``traceparent``. Placement as in
``bench.py`` (wrk, upstream and redis on CPU 0, the proxy on CPU 1); the proxy's CPU per
request is utime + stime of its process over the measured interval. Prints a Markdown table
(medians), appended to ``--out`` when given.

    python loadtests/bench_policy.py [--seconds 8] [--rounds 3] [--conns 50] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from bench import (
    NGINX_UPSTREAM,
    SMALL_BODY,
    Contender,
    Processes,
    Sample,
    cpu_times,
    free_port,
    jalur_config,
    log,
    parse_wrk,
    pinned,
    start_jalur,
    start_nginx,
    wait_http,
)
from run import start_redis

LOAD_CPU, PROXY_CPU = 0, 1
PATH = "/api/feed/small"
HEADERS = (
    "Authorization: Bearer shopper-1",
    "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
)
# OTLP exports are answered 200 by the upstream NGINX (the body is discarded).
# (Braces doubled: NGINX_UPSTREAM is a str.format template.)
_OTLP = "        location = /v1/traces {{ return 200; }}\n"
_STATIC = "        location = /api/feed/64k {{ default_type application/octet-stream; }}\n"
assert _STATIC in NGINX_UPSTREAM
UPSTREAM = NGINX_UPSTREAM.replace(_STATIC, _STATIC + _OTLP)

TIMEOUT: dict[str, Any] = {"timeout": 10, "retry": {"attempts": 2, "per_try_timeout": 2}}
LIMIT: dict[str, Any] = {
    "route": {"rate": 1_000_000, "burst": 1_000_000},
    "user": {"rate": 1_000_000, "burst": 1_000_000},
}


def variants(upstream: str, redis: str) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """name -> (what the feed route adds, top-level additions)."""
    off = {"tracing": {"enabled": False}}
    otlp = {"tracing": {"otlp_endpoint": f"{upstream}/v1/traces", "sample": 1.0}}
    fleet = {"store": {"kind": "redis", "url": redis}, **off}
    return {
        "off": ({}, off),
        "timeout": (TIMEOUT, off),
        "ratelimit-local": ({"rate_limit": LIMIT}, off),
        "ratelimit-fleet": ({"rate_limit": {**LIMIT, "scope": "fleet"}}, fleet),
        "trace": ({}, {}),
        "trace-otlp": ({}, otlp),
        "all": ({**TIMEOUT, "rate_limit": LIMIT}, otlp),
    }


def config(
    port: int, upstream: str, work: Path, route: dict[str, Any], top: dict[str, Any]
) -> dict[str, Any]:
    conf = jalur_config(port, upstream, work)
    feed = next(r for r in conf["routes"] if r["name"] == "feed")
    feed.update(route)
    conf.update(top)
    return conf


def measure(c: Contender, conns: int, seconds: float, cpu: int | None) -> Sample:
    assert c.pid is not None
    wall = time.monotonic()
    user0, sys0 = cpu_times(c.pid)
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency"]
    for h in HEADERS:
        cmd += ["-H", h]
    done = subprocess.run(
        pinned(cpu, [*cmd, c.url("small")]),
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    sample = parse_wrk(done.stdout)
    user1, sys1 = cpu_times(c.pid)
    used = user1 - user0 + sys1 - sys0
    n = max(1, sample.requests)
    sample.cpu_us = 1e6 * used / n
    sample.sys_us = 1e6 * (sys1 - sys0) / n
    sample.busy = used / (time.monotonic() - wall)
    return sample


def table(samples: dict[str, list[Sample]], args: argparse.Namespace) -> str:
    def med(name: str, attr: str) -> float:
        return statistics.median(getattr(s, attr) or 0.0 for s in samples[name])

    base = med("off", "cpu_us")
    lines = [
        f"wrk -c{args.conns}, {args.seconds:g} s x {args.rounds} rounds (medians), "
        f"GET {PATH} (~100 B), one `jalur run` process pinned to its own CPU",
        "",
        "| configuration | req/s | p50 ms | p99 ms | CPU µs/req | vs off | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in samples:
        cpu = med(name, "cpu_us")
        errors = sum(s.errors for s in samples[name])
        lines.append(
            f"| {name} | {med(name, 'rps'):,.0f} | {med(name, 'p50_ms'):.2f} | "
            f"{med(name, 'p99_ms'):.2f} | {cpu:.0f} | {cpu - base:+.0f} | {errors} |"
        )
    return "\n".join(lines)


# -- in-process: the hooks alone ---------------------------------------------------------


def micro(n: int, redis: str | None, otlp: str | None) -> list[tuple[str, float, float]]:
    """(hook, CPU µs per call, wall µs per call) of each per-request hook, called ``n`` times
    in a uvloop loop as the handler calls it (the spans' export thread not counted)."""
    import asyncio

    import uvloop
    from multidict import CIMultiDict, CIMultiDictProxy

    from proxy import config as cfg
    from proxy import ratelimit, tracing

    headers = CIMultiDictProxy(CIMultiDict(h.split(": ", 1) for h in HEADERS))
    cookies: dict[str, str] = {}
    out: list[tuple[str, float, float]] = []

    def limited(scope: str) -> cfg.Config:
        base = jalur_config(0, "http://127.0.0.1:9", Path("."))
        feed = next(r for r in base["routes"] if r["name"] == "feed")
        feed["rate_limit"] = {**LIMIT, "scope": scope}
        if scope == "fleet":
            assert redis is not None
            base["store"] = {"kind": "redis", "url": redis}
        return cfg.parse(yaml.safe_dump(base))

    async def run() -> None:
        async def timed(name: str, step: Any) -> None:
            for _ in range(min(n, 1000)):  # warm-up
                await step()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                await step()
            cpu = (time.process_time() - cpu0) * 1e6 / n
            out.append((name, cpu, (time.perf_counter() - wall0) * 1e6 / n))

        async def nothing() -> None:
            return None

        async def within() -> None:
            async with asyncio.timeout(10):
                await nothing()

        await timed("baseline: awaiting a coroutine that returns at once", nothing)
        await timed("route timeout (asyncio.timeout around the send)", within)
        for scope in ("local", "fleet") if redis else ("local",):
            limiters = ratelimit.build(limited(scope))
            limiter = limiters["feed"]

            async def check(limiter: ratelimit.Limiter = limiter) -> None:
                assert await limiter.check(headers.getall, cookies.get, "127.0.0.1") is None

            await timed(f"rate limit, {scope} (route + user bucket)", check)
            await ratelimit.close(limiters)
        fresh = CIMultiDictProxy(CIMultiDict(h.split(": ", 1) for h in HEADERS[:1]))
        specs = [("trace context (no SDK)", cfg.Tracing(), headers)]
        if otlp:
            spans = cfg.Tracing(otlp_endpoint=otlp)
            specs.append(("trace + OTel spans (SDK), sampled parent", spans, headers))
            tenth = cfg.Tracing(otlp_endpoint=otlp, sample=0.1)
            specs.append(("trace + OTel spans (SDK), new traces at sample 0.1", tenth, fresh))
        for name, spec, sent in specs:
            tracer = tracing.Tracer(spec)

            async def trace(
                tracer: tracing.Tracer = tracer, sent: CIMultiDictProxy[str] = sent
            ) -> None:
                t = tracer.start(sent, "GET")
                assert t is not None
                t.attempt("http://127.0.0.1:9")
                t.attempt_done(200)
                t.finish("GET", "feed", 200, {"jalur.request_id": "r", "jalur.cluster": "c"})

            await timed(name, trace)
            tracer.close()

    uvloop.run(run())
    return out


def micro_table(rows: list[tuple[str, float, float]], n: int) -> str:
    lines = [
        f"In-process, {n:,} calls each (`bench_policy.py --micro`): what the handler's hook "
        "costs per request",
        "",
        "| hook | CPU µs/call | wall µs/call |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {cpu:.1f} | {wall:.1f} |" for name, cpu, wall in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--micro", type=int, metavar="N", help="only time the hooks, N calls each")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--only", nargs="*", help="configurations to run (default: all)")
    p.add_argument("--out", type=Path, help="append the Markdown table to this file")
    args = p.parse_args(argv)
    if args.micro:
        procs = Processes()
        work = Path(tempfile.mkdtemp(prefix="jalur-bench-policy-"))
        try:
            redis = start_redis(procs, work) if shutil.which("redis-server") else None
            sink = f"http://127.0.0.1:{free_port()}/v1/traces"  # nothing listens: export fails
            text = micro_table(micro(args.micro, redis, sink), args.micro)
        finally:
            procs.stop_all()
            shutil.rmtree(work, ignore_errors=True)
        print(text)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(text + "\n")
        return 0
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if shutil.which("wrk") is None or not os.path.exists(nginx):
        raise SystemExit("bench_policy: needs nginx and wrk (make install-bench-tools)")
    cpu = LOAD_CPU if (os.cpu_count() or 1) > 1 else None
    proxy_cpu = PROXY_CPU if cpu is not None else None
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="jalur-bench-policy-"))
    work.chmod(0o755)  # NGINX workers (user nobody when run as root) read the files
    try:
        www = work / "www" / "api" / "feed"
        www.mkdir(parents=True)
        (www / "small").write_bytes(SMALL_BODY)
        (www / "64k").write_bytes(SMALL_BODY)
        for d in (work, work / "www", work / "www" / "api", www):
            d.chmod(0o755)
        up_port = free_port()
        conf = UPSTREAM.format(dir=work / "upstream", port=up_port, www=work / "www")
        start_nginx(procs, "upstream", conf, work / "upstream", cpu, nginx)
        upstream = f"http://127.0.0.1:{up_port}"
        redis = start_redis(procs, work)
        contenders: dict[str, Contender] = {}
        for name, (route, top) in variants(upstream, redis).items():
            if args.only and name not in args.only:
                continue
            port = free_port()
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config(port, upstream, work, route, top)))
            proc = start_jalur(procs, name, path, 1, proxy_cpu, work)
            contenders[name] = Contender(name, port, proc.pid, "jalur run")
        deadline = time.monotonic() + 30
        for c in contenders.values():
            proc = next(pr for _, pr in procs.procs if pr.pid == c.pid)
            wait_http(c.url("small"), deadline, proc)
        samples: dict[str, list[Sample]] = {k: [] for k in contenders}
        for r in range(args.rounds):
            for name, c in contenders.items():
                log(f"round {r + 1}/{args.rounds}: {name}")
                measure(c, args.conns, 1.0, cpu)  # warm-up
                samples[name].append(measure(c, args.conns, args.seconds, cpu))
        text = table(samples, args)
        print(text)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(text + "\n")
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
