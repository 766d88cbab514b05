"""The idempotency gate's cost per keyed payment, side by side (``make gate-bench``).

Three Jalur processes (one worker each, pinned to the proxy CPU) on the same payment route,
the same simulated commerce back end (``proxy.demo.backend``) and the same wrk load (a new
``Idempotency-Key`` on every POST, so every request takes the first-attempt path: lock,
forward, store), measured in interleaved rounds:

* ``gate-off``: the route's ``idempotency: {enabled: false}`` (keys passed through);
* ``memory``: ``store.kind: memory``;
* ``redis``: ``store.kind: redis`` on a local redis-server (noeviction, AOF everysec).

Reported per contender, medians over the rounds: requests/s, Jalur's CPU per request, and
for ``redis`` the redis-server's CPU per request (the store's share of the cost). Writes a
section into ``loadtests/RESULTS.md`` between the gate markers.

    .venv/bin/python loadtests/gate_bench.py [--seconds 5] [--rounds 3] [--conns 50]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from bench import (
    LOAD_CPU,
    PROXY_CPU,
    WRK_THREADS,
    Processes,
    cpu_seconds,
    free_port,
    jalur_config,
    parse_wrk,
    pinned,
    start_jalur,
)
from run import port_busy, start_redis

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- gate:begin -->", "<!-- gate:end -->"
# A new key per request: every POST is a first attempt (lock, forward, store).
WRK_SCRIPT = """
local counter = 0
local prefix = tostring(math.random(1, 1e9))
request = function()
  counter = counter + 1
  local headers = {}
  headers["Idempotency-Key"] = prefix .. "-" .. counter
  headers["Content-Type"] = "application/json"
  return wrk.format("POST", "/api/payment/charge", headers, '{"amount": 5000}')
end
"""


def wait_port(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while not port_busy("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"gate-bench: nothing listens on {port}")
        time.sleep(0.05)


def contender_config(port: int, upstream: str, work: Path, kind: str, redis: str) -> Any:
    conf = jalur_config(port, upstream, work)
    conf["access_log"] = {"enabled": False}
    for route in conf["routes"]:
        if route["name"] == "payment" and kind == "gate-off":
            route["idempotency"] = {"enabled": False}
    if kind == "redis":
        conf["store"] = {"kind": "redis", "url": redis}
    return conf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="jalur-gate-bench-"))
    script = work / "keyed.lua"
    script.write_text(WRK_SCRIPT)
    results: dict[str, list[tuple[float, float, float]]] = {}
    try:
        up_port = free_port()
        upstream = procs.start(
            "backend",
            pinned(LOAD_CPU, [sys.executable, "-m", "proxy.demo.backend", "--cluster", "pay",
                              "--system", "tokopedia", "--port", str(up_port)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        wait_port(up_port, upstream, deadline)
        redis_url = start_redis(procs, work, "--appendfsync", "everysec")
        redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        redis_pid = next(
            proc.pid for name, proc in procs.procs if name == f"redis-server :{redis_port}"
        )
        contenders: dict[str, tuple[int, int]] = {}
        for kind in ("gate-off", "memory", "redis"):
            port = free_port()
            path = work / f"{kind}.yaml"
            conf = contender_config(port, f"http://127.0.0.1:{up_port}", work, kind, redis_url)
            path.write_text(yaml.safe_dump(conf))
            proc = start_jalur(procs, kind, path, 1, PROXY_CPU, work)
            wait_port(port, proc, deadline)
            contenders[kind] = (port, proc.pid)
        for rnd in range(args.rounds):
            for kind, (port, pid) in contenders.items():
                cpu0, redis0 = cpu_seconds(pid), cpu_seconds(redis_pid)
                cmd = ["wrk", f"-t{WRK_THREADS}", f"-c{args.conns}", f"-d{round(args.seconds)}s",
                       "--latency", "-s", str(script), f"http://127.0.0.1:{port}"]  # fmt: skip
                done = subprocess.run(
                    pinned(LOAD_CPU, cmd), capture_output=True, text=True, check=False,
                    timeout=args.seconds + 60,
                )  # fmt: skip
                sample = parse_wrk(done.stdout)
                if sample.errors:
                    raise SystemExit(f"gate-bench: {kind}: {sample.error_kinds}")
                n = max(1, sample.requests)
                proxy_us = 1e6 * (cpu_seconds(pid) - cpu0) / n
                redis_us = 1e6 * (cpu_seconds(redis_pid) - redis0) / n
                results.setdefault(kind, []).append((sample.rps, proxy_us, redis_us))
                print(
                    f"round {rnd + 1} {kind}: {sample.rps:.0f} req/s, Jalur {proxy_us:.0f} "
                    f"us/request, redis {redis_us:.1f} us/request",
                    flush=True,
                )
    finally:
        procs.stop_all()
    write(Path(args.out), table(results, args))
    return 0


def table(results: dict[str, list[tuple[float, float, float]]], args: argparse.Namespace) -> str:
    med = {k: [statistics.median(col) for col in zip(*v, strict=True)] for k, v in results.items()}
    off = med["gate-off"][1]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
        f"`python loadtests/gate_bench.py --seconds {args.seconds:g} --rounds {args.rounds} "
        f"--conns {args.conns}` (keyed POSTs, a new key each; medians of {args.rounds} "
        "interleaved rounds; Jalur pinned to one CPU, wrk and the back end to the other):",
        "",
        "| store | req/s | Jalur CPU µs/request | x gate off | redis-server CPU µs/request |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in ("gate-off", "memory", "redis"):
        rps, proxy_us, redis_us = med[kind]
        redis_cell = f"{redis_us:.1f}" if kind == "redis" else "-"
        lines.append(
            f"| {kind} | {rps:.0f} | {proxy_us:.0f} | {proxy_us / off:.2f} | {redis_cell} |"
        )
    lines.append("")
    lines.append(
        f"The gate adds {med['memory'][1] - off:.0f} µs per keyed payment with the memory store "
        f"and {med['redis'][1] - off:.0f} µs with Redis in Jalur's own process (two round "
        "trips: the begin script, and the complete script), plus what redis-server spends."
    )
    return "\n".join(lines)


def write(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else ""
    section = f"{BEGIN}\n{block}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text += f"\n## The idempotency gate's cost per keyed payment\n\n{section}\n"
    path.write_text(text)
    print(block)


if __name__ == "__main__":
    sys.exit(main())
