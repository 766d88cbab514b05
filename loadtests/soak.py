"""Soak: ``make soak`` -- the Locust shoppers against Jalur for a long run with faults injected.

What it runs (every process started here is stopped by PID, whatever happens):

* every simulated back end of ``config/demo.yaml`` as its own process
  (``python -m proxy.demo.backend``), each demo endpoint **twice** (the URL and a twin on
  another free loopback port), so every cluster has at least two endpoints and a restart is
  survivable; each back end resets ``--reset-rate`` (1 %) of the requests it reads, before
  executing them, and journals its keyed executions and resets to
  ``<reports>/journal-<port>.jsonl``;
* ``jalur run -c <reports>/soak-config.yaml``: the demo config on those endpoints, plus for
  every cluster retries (3 attempts, ``reset`` retried too: an idempotent or keyed request is
  sent again after a reset), an active health check every second and outlier ejection on the
  first refused connect -- what an operator would configure for a restartable back end;
* the Locust journeys of ``locustfile.py`` (``run.run_locust``, as ``make loadtest`` does);
* every ``--restart-every`` seconds (60) one back-end process, in rotation, is stopped
  (SIGTERM by PID) and started again on the same port; its ``/_sim/executions`` and
  ``/_sim/faults`` counters are read before the stop and accumulated (a restart loses them);
* every 5 s Jalur's RSS (``/proc/PID/status``) and open descriptors (``/proc/PID/fd``);
* the commerce back ends answer ``--late-rate`` (2 %) of keyed payments ``LATE_DELAY`` (3 s)
  *after* executing them, past the commerce clusters' 2 s answer timeout: Jalur answers 504
  and keeps the key as "outcome unknown"; the shopper's repeat of that key must be answered
  from that record (never executed again);
  the fleet's store is a real redis-server;
* every ``--hostile-every`` seconds (30) a wave of hostile clients (``Hostile``), between the
  warm-up and the last measuring window: ``--hostile`` (150) payment uploads dripping one
  byte every 2 s (each with an ``X-Request-Id`` of ``DRIP_ID_PREFIX``), cut by
  ``listen.body_timeout`` (8 s in the soak config), and as many unfinished request heads of
  60 KiB (cut by ``header_read_timeout``) plus a few over ``max_head_bytes`` (431 at once).
  Their 408s are injected faults; real payments must not notice them.

How failures are attributed: every request Jalur answered is a line of its access log with
its ``request_id``, which Jalur also sends upstream as ``X-Request-Id`` (the same on every
attempt). A non-2xx answer is **injected (reset)** when a back end journalled a reset of that
request id (it could not be retried: a POST without ``Idempotency-Key``, or every attempt
was reset), **injected (restart)** when it is a 502/503 of a cluster whose endpoint was
being restarted at that moment (SIGTERM sent - 1 s .. back up + 3 s), and **unexplained**
otherwise; **injected (late answer)** when a back end journalled a late answer of that
request id, or the answer is a repeat of such a payment's key (the shoppers journal each
failure's key). Each Locust failure is matched to those answers by request id: the shoppers
append every failure with the response's ``x-request-id`` to ``<reports>/failures.jsonl``
(``LOADTEST_FAILURE_LOG``). A failure is explained only when its id is one of Jalur's non-2xx
answers with an injected cause; every other one is unexplained: a transaction served by a
social system, a payment executed twice, a retried payment not replayed, and a dropped
connection (no response, so no id).

Bars (exit 1 when one is missed): no unexplained Locust failure; no unexplained non-2xx
answer in Jalur's access log (even one Locust did not count); no payment executed twice (per
back end from ``/_sim/executions``, accumulated across restarts, and across all commerce
back ends from the journals); no payment served by a social system; Jalur's RSS and open
descriptors grow less than 10 % from the start (after warm-up) to the end (each the median
of the samples in a window, so one momentary spike does not decide); every restart came back.

    .venv/bin/python loadtests/soak.py [--time 10m] [--users 50] [--restart-every 60]
        [--reset-rate 0.01] [--late-rate 0.02] [--reports DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from run import (
    ROOT,
    Processes,
    free_port,
    http_get,
    jalur_counts,
    run_locust,
    seconds,
    sim_counters,
    start_jalur,
    start_redis,
    summarise,
)

HERE = Path(__file__).resolve().parent
DEMO = ROOT / "config" / "demo.yaml"
READY_DEADLINE = 15.0  # seconds a (re)started back end may take to answer
SAMPLE_EVERY = 5.0  # seconds between two RSS / descriptor samples
GROWTH_BAR = 0.10  # RSS and descriptors may grow less than this from start to end
RESTART_WINDOW = (1.0, 3.0)  # seconds before the stop / after the restart a failure is blamed on
# Commerce clusters give up on an answer after this long; a late answer comes LATE_DELAY
# after the back end executed the payment: Jalur answers 504 and keeps the key as "outcome
# unknown", and the shopper's repeat must be answered from that record, never executed.
COMMERCE_ANSWER_TIMEOUT = 2.0
LATE_DELAY = 3.0
# Request ids of the injected dripping uploads (Jalur keeps a valid incoming X-Request-Id).
DRIP_ID_PREFIX = "soak-drip-"
DRIP_EVERY = 2.0  # seconds between two bytes of a dripping upload
HEAD_BYTES = 60 * 1024  # an unfinished head just under listen.max_head_bytes (64 KiB)
OVERSIZED_HEADS = 5  # heads over max_head_bytes per wave (431 at once)
# The soak's listener: drips cut by the total body deadline, well inside the idle one.
HOSTILE_LISTEN: dict[str, Any] = {"body_idle_timeout": 5.0, "body_timeout": 8.0}
# What every soak cluster gets on top of the demo config (see the module docstring).
RESILIENCE: dict[str, Any] = {
    "retry": {
        "attempts": 3,
        "retry_on": ["connect-failure", "refused", "reset-before-request", "reset"],
    },
    "health_check": {
        "path": "/healthz",
        "interval": 1.0,
        "timeout": 0.5,
        "healthy_threshold": 1,
        "unhealthy_threshold": 2,
    },
    "outlier_detection": {
        "consecutive_connect_failures": 1,
        "base_ejection_time": 2.0,
        "max_ejection_time": 10.0,
    },
}


def log(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


@dataclass
class Endpoint:
    """One simulated back-end process (and its restarts)."""

    url: str
    port: int
    cluster: str
    system: str
    kind: str
    clusters: list[str]  # every cluster this endpoint serves
    journal: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    counters: Counter[str] = field(default_factory=Counter)  # accumulated /_sim counters

    def collect(self) -> bool:
        """Add the live process's counters to ``counters`` (it is about to stop)."""
        ok = True
        for what in ("executions", "faults"):
            counts = sim_counters(self.url, what)
            if counts is None:
                ok = False
                continue
            for k, v in counts.items():
                self.counters[f"{what}.{k}"] += int(v)
        return ok


def soak_config(reports: Path) -> tuple[Path, dict[str, Any], list[Endpoint]]:
    """The demo config on free loopback ports, every endpoint doubled, resilience added."""
    conf: dict[str, Any] = yaml.safe_load(DEMO.read_text())
    kinds = {name: s["kind"] for name, s in conf["systems"].items()}
    taken: set[int] = set()

    def port() -> int:
        while (p := free_port()) in taken:
            pass
        taken.add(p)
        return p

    twins: dict[str, list[str]] = {}  # demo URL -> its two soak URLs
    endpoints: dict[str, Endpoint] = {}
    for name, cluster in conf["clusters"].items():
        urls: list[str] = []
        for demo_url in cluster["endpoints"]:
            if demo_url not in twins:
                twins[demo_url] = []
                for _ in range(2):
                    p = port()
                    url = f"http://127.0.0.1:{p}"
                    twins[demo_url].append(url)
                    endpoints[url] = Endpoint(
                        url, p, name, cluster["system"], kinds[cluster["system"]], [],
                        reports / f"journal-{p}.jsonl",
                    )  # fmt: skip
            urls += twins[demo_url]
        for url in urls:
            endpoints[url].clusters.append(name)
        cluster["endpoints"] = urls
        cluster.update(RESILIENCE)
        if kinds[cluster["system"]] == "commerce":
            cluster["timeouts"] = {
                **cluster.get("timeouts", {}),
                "response_headers": COMMERCE_ANSWER_TIMEOUT,
            }
    conf["listen"] = {**conf["listen"], **HOSTILE_LISTEN, "host": "127.0.0.1", "port": 0}
    conf["admin"] = {**conf["admin"], "host": "127.0.0.1", "port": 0}
    conf["reload"] = {"watch": False}
    conf["access_log"] = {"path": str(reports / "access.jsonl")}
    conf.setdefault("compliance", {})["audit"] = {"path": str(reports / "audit.log")}
    # The fleet's store is a real redis-server (set by main): the proxy's RSS bar measures
    # the proxy, not records kept for a day.
    path = reports / "soak-config.yaml"
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    # Restart order: commerce and social endpoints alternate.
    commerce = [e for e in endpoints.values() if e.kind == "commerce"]
    social = [e for e in endpoints.values() if e.kind != "commerce"]
    order = [e for pair in zip(commerce, social, strict=False) for e in pair]
    order += commerce[len(social) :] + social[len(commerce) :]
    return path, conf, order


def start_backend(
    procs: Processes, ep: Endpoint, reset_rate: float, seed: int, late_rate: float = 0.0
) -> None:
    late = ["--late-rate", str(late_rate), "--late-delay", str(LATE_DELAY)]
    ep.proc = procs.start(
        f"back end {ep.cluster} :{ep.port}",
        [
            sys.executable, "-m", "proxy.demo.backend", "--cluster", ep.cluster,
            "--system", ep.system, "--port", str(ep.port), "--reset-rate", str(reset_rate),
            "--seed", str(seed + ep.port + 7919 * ep.restarts), "--journal", str(ep.journal),
            *(late if ep.kind == "commerce" and late_rate > 0 else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=str(ROOT),
    )  # fmt: skip


def wait_ready(eps: list[Endpoint]) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    for ep in eps:
        while sim_counters(ep.url, "faults") is None:
            if time.monotonic() > deadline or (ep.proc is not None and ep.proc.poll() is not None):
                raise SystemExit(f"soak: back end {ep.url} did not come up")
            time.sleep(0.05)


def proc_sample(pid: int) -> tuple[int, int] | None:
    """(RSS in KiB, open descriptors) of ``pid`` from /proc, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss, fds


def window_median(samples: list[tuple[float, int, int]], lo: float, hi: float) -> tuple[int, int]:
    chosen = [s for s in samples if lo <= s[0] <= hi] or samples[-1:]
    return (
        int(statistics.median(s[1] for s in chosen)),
        int(statistics.median(s[2] for s in chosen)),
    )


@dataclass
class Journals:
    resets: Counter[str]  # per request id (health checks carry none: "None")
    executed: Counter[str]  # per Idempotency-Key, on the commerce back ends
    late: dict[str, str]  # request id -> Idempotency-Key of the payments answered late
    reset_keys: set[str]  # Idempotency-Keys of payments whose connection was reset


def read_journals(eps: list[Endpoint]) -> Journals:
    """What the back ends journalled: resets, keyed executions, late answers."""
    resets: Counter[str] = Counter()
    executed: Counter[str] = Counter()
    late: dict[str, str] = {}
    reset_keys: set[str] = set()
    for ep in eps:
        if not ep.journal.exists():
            continue
        for line in ep.journal.read_bytes().splitlines():
            event = json.loads(line)
            if event["event"] == "reset":
                resets[str(event.get("request_id"))] += 1
                if event.get("key"):
                    reset_keys.add(str(event["key"]))
            elif event["event"] == "executed" and ep.kind == "commerce":
                executed[event["key"]] += 1
            elif event["event"] == "late":
                late[str(event.get("request_id"))] = str(event["key"])
    return Journals(resets, executed, late, reset_keys)


@dataclass
class Restart:
    endpoint: Endpoint
    stopped: float  # wall clock, SIGTERM sent
    ready: float = 0.0  # wall clock, answering again (0: never)


@dataclass
class Attribution:
    """Jalur's non-2xx answers (from its access log) and what caused each."""

    total: int = 0
    causes: Counter[str] = field(default_factory=Counter)
    unexplained: list[dict[str, Any]] = field(default_factory=list)
    answered: set[str] = field(default_factory=set)  # request ids of every non-2xx
    explained: set[str] = field(default_factory=set)  # ... of those an injected fault caused


def attribute(
    access: Path,
    resets: dict[str, int],
    restarts: list[Restart],
    late: set[str],
    repeats: set[str],
) -> Attribution:
    """Jalur's non-2xx answers, each attributed to an injected fault or unexplained.
    ``late``: request ids a back end answered late; ``repeats``: request ids of repeats of a
    payment whose first attempt was reset or answered late after a byte reached the back end
    (answered "outcome unknown", as designed: the key is consumed)."""
    out = Attribution()
    causes, unexplained = out.causes, out.unexplained
    before, after = RESTART_WINDOW
    if not access.exists():
        return out
    for raw in access.read_bytes().splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        code = int(line.get("response_code") or 0)
        if 200 <= code < 300:
            continue
        out.total += 1
        rid = str(line.get("request_id") or "")  # every answer has one; "" matches nothing
        out.answered.add(rid)
        if rid and rid in resets:
            causes["injected reset"] += 1
            out.explained.add(rid)
            continue
        if rid.startswith(DRIP_ID_PREFIX) and code == 408:
            causes["injected drip"] += 1
            out.explained.add(rid)
            continue
        if rid and rid in late:
            causes["injected late answer"] += 1
            out.explained.add(rid)
            continue
        if rid and rid in repeats:
            causes["repeat of a faulted payment"] += 1
            out.explained.add(rid)
            continue
        t = datetime.fromisoformat(line["start_time"]).timestamp()
        if code in (502, 503) and any(
            line.get("cluster") in r.endpoint.clusters
            and r.stopped - before <= t <= (r.ready or float("inf")) + after
            for r in restarts
        ):
            causes["injected restart"] += 1
            out.explained.add(rid)
            continue
        causes["unexplained"] += 1
        unexplained.append(line)
    return out


def read_failures(path: Path) -> tuple[set[str], int, dict[str, str]]:
    """The Locust failures the shoppers journalled (``LOADTEST_FAILURE_LOG``): the request ids
    they carried, how many carried none, and the Idempotency-Key of each keyed one."""
    ids: set[str] = set()
    keys: dict[str, str] = {}
    anonymous = 0
    if not path.exists():
        return ids, anonymous, keys
    for raw in path.read_bytes().splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            anonymous += 1
            continue
        rid = entry.get("request_id")
        if rid:
            ids.add(str(rid))
            if entry.get("key"):
                keys[str(rid)] = str(entry["key"])
        else:
            anonymous += 1
    return ids, anonymous, keys


@dataclass
class Hostile:
    """Waves of slow and bloated clients against Jalur's data port, each wave bounded in
    count and time (see the module docstring); outcomes are counted by kind."""

    port: int
    size: int
    outcomes: Counter[str] = field(default_factory=Counter)
    waves: int = 0
    _n: int = 0

    def wave(self) -> None:
        """One wave, run to its end (every client answered or closed) on its own loop."""
        self.waves += 1
        asyncio.run(self._wave())

    async def _wave(self) -> None:
        big = HEAD_BYTES * 2
        clients = [self._drip() for _ in range(self.size)]
        clients += [self._head(HEAD_BYTES) for _ in range(self.size)]
        clients += [self._head(big) for _ in range(OVERSIZED_HEADS)]
        async with asyncio.timeout(60):
            await asyncio.gather(*clients)

    async def _drip(self) -> None:
        self._n += 1
        rid = f"{DRIP_ID_PREFIX}{self.waves}-{self._n}"
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            self.outcomes["drip: connect failed"] += 1
            return
        try:
            writer.write(
                # Each drip its own session: this wave tests the body deadline, not the
                # per-shopper rate limit (which would refuse one address's drips with 429).
                f"POST /api/payment HTTP/1.1\r\nHost: shop\r\nX-Request-Id: {rid}\r\n"
                f"Authorization: Bearer {rid}\r\n"
                "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n".encode()
            )
            answer = asyncio.ensure_future(reader.read(4096))
            for _ in range(200):  # bounded: one byte per DRIP_EVERY, 200 bytes at most
                writer.write(b" ")
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                done, _ = await asyncio.wait({answer}, timeout=DRIP_EVERY)
                if done:
                    break
            data = await answer
            self.outcomes["drip: " + (data.split(b" ", 2)[1].decode() if data else "closed")] += 1
        except ConnectionError:
            self.outcomes["drip: reset"] += 1
        finally:
            writer.close()

    async def _head(self, size: int) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            self.outcomes["head: connect failed"] += 1
            return
        head = b"GET /api/feed HTTP/1.1\r\nHost: shop\r\n"
        i = 0
        while len(head) < size:
            head += b"X-Pad-%d: %s\r\n" % (i, b"h" * 4000)
            i += 1
        kind = "head" if size <= HEAD_BYTES else "oversized head"
        try:
            writer.write(head[:size])
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            data = await reader.read(4096)  # the refusal, when the proxy gives up
            self.outcomes[
                f"{kind}: " + (data.split(b" ", 2)[1].decode() if data else "closed")
            ] += 1
        except ConnectionError:
            self.outcomes[f"{kind}: reset"] += 1
        finally:
            writer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--time", default=os.environ.get("SOAK_TIME") or "10m")
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--spawn-rate", type=float, default=10)
    p.add_argument("--restart-every", type=float, default=60.0, help="seconds between restarts")
    p.add_argument("--reset-rate", type=float, default=0.01, help="share of upstream resets")
    p.add_argument(
        "--late-rate",
        type=float,
        default=0.02,
        help="share of keyed payments the commerce back ends answer only after Jalur timed out",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--hostile", type=int, default=150, help="drips and heads per wave (0: off)")
    p.add_argument("--hostile-every", type=float, default=30.0, help="seconds between waves")
    p.add_argument("--reports", default=str(HERE / "reports" / "soak"))
    p.add_argument("--summary", default=str(HERE / "reports" / "soak.txt"))
    args = p.parse_args(argv)
    duration = seconds(args.time)
    # run_locust's knobs: a fixed number of users, no shape, one local Locust.
    args.shape, args.distributed, args.workers = "none", False, 0
    args.locust_args = []  # no extra Locust options (run.py's pass-through)
    reports = Path(args.reports).resolve()
    reports.mkdir(parents=True, exist_ok=True)
    args.reports = str(reports)
    failure_log = reports / "failures.jsonl"
    for old in [*reports.glob("loadtest*"), *reports.glob("journal-*"), reports / "access.jsonl"]:
        old.unlink(missing_ok=True)
    failure_log.unlink(missing_ok=True)
    os.environ["LOADTEST_FAILURE_LOG"] = str(failure_log)  # the shoppers' env (run_locust)

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    procs = Processes()
    restarts: list[Restart] = []
    samples: list[tuple[float, int, int]] = []  # (seconds since locust start, RSS KiB, fds)
    try:
        config, conf, endpoints = soak_config(reports)
        conf["store"] = {"kind": "redis", "url": start_redis(procs, reports)}
        config.write_text(yaml.safe_dump(conf, sort_keys=False))
        for ep in endpoints:
            start_backend(procs, ep, args.reset_rate, args.seed, args.late_rate)
        wait_ready(endpoints)
        log(f"{len(endpoints)} back ends up")
        jalur, base, admin = start_jalur(
            procs, ["run", "-c", str(config)], reports, {}, "jalur run", "jalur.log"
        )
        token = conf["admin"].get("token")
        outcome: list[int] = []
        locust = threading.Thread(
            target=lambda: outcome.append(run_locust(procs, args, base, admin, token)),
            daemon=True,
        )
        t0 = time.monotonic()
        locust.start()
        next_restart, next_sample, turn = t0 + args.restart_every, t0, 0
        hostile = Hostile(int(base.rsplit(":", 1)[1]), args.hostile)
        warmup, window = measuring_windows(duration)
        # Waves between the warm-up window and the last one, so the RSS and descriptor bars
        # compare quiet moments; a wave lasts at most body_timeout + a few seconds.
        quiet_from = duration - window - HOSTILE_LISTEN["body_timeout"] - 5
        next_wave = t0 + warmup + window
        waves: threading.Thread | None = None
        while locust.is_alive():
            now = time.monotonic()
            if (
                args.hostile
                and now >= next_wave
                and now - t0 < quiet_from
                and (waves is None or not waves.is_alive())
            ):
                waves = threading.Thread(target=hostile.wave, daemon=True)
                waves.start()
                next_wave = now + args.hostile_every
            if now >= next_sample:
                sample = proc_sample(jalur.pid)
                if sample is not None:
                    samples.append((now - t0, *sample))
                next_sample += SAMPLE_EVERY
            if now >= next_restart and now - t0 < duration - min(5.0, duration / 4):
                ep = endpoints[turn % len(endpoints)]
                turn += 1
                if not ep.collect():
                    log(f"could not read the counters of {ep.url} before its restart")
                restart = Restart(ep, time.time())
                restarts.append(restart)
                assert ep.proc is not None
                procs.stop(ep.proc, f"back end {ep.cluster} :{ep.port}")
                ep.restarts += 1
                start_backend(procs, ep, args.reset_rate, args.seed, args.late_rate)
                with contextlib.suppress(SystemExit):
                    wait_ready([ep])
                    restart.ready = time.time()
                log(
                    f"restarted {ep.url} ({ep.cluster}) in {restart.ready - restart.stopped:.2f} s"
                    if restart.ready
                    else f"{ep.url} did not come back"
                )
                next_restart += args.restart_every
            locust.join(0.2)
        rc = outcome[0] if outcome else 1
        if waves is not None:
            waves.join(60)
        for ep in endpoints:
            if not ep.collect():
                log(f"could not read the final counters of {ep.url}")
        series = {
            "routes": jalur_counts(admin),
            "codes": jalur_counts(admin, "jalur_requests_total", "code"),
            "upstream_errors": jalur_counts(admin, "jalur_upstream_errors_total", "kind"),
            "retries": jalur_counts(admin, "jalur_retries_total", "route"),
            "idempotency": jalur_counts(admin, "jalur_idempotency_total", "outcome"),
            "rejected": jalur_counts(admin, "jalur_requests_rejected_total", "reason"),
            "unhealthy": {
                k: v
                for k, v in jalur_counts(admin, "jalur_endpoint_healthy", "endpoint").items()
                if v == 0
            },
        }
        _status, metrics_body = http_get(admin + "/metrics")
        (reports / "metrics.txt").write_bytes(metrics_body)
        procs.stop(jalur, "jalur run")  # flushes the access log
    finally:
        procs.stop_all()

    text, failed = report(
        args, reports, endpoints, restarts, samples, series, rc, duration, hostile
    )
    text_bars = "\n".join(f"  {'ok  ' if ok else 'MISS'} {what}" for what, ok in failed)
    text += "\nbars:\n" + text_bars
    Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
    Path(args.summary).write_text(text + "\n")
    print("\n" + text, flush=True)
    if not all(ok for _, ok in failed):
        log(f"FAILED (see {args.summary})")
        return 1
    log(f"passed (see {args.summary})")
    return 0


def measuring_windows(duration: float) -> tuple[float, float]:
    """Seconds of warm-up before the first RSS/descriptor window, and each window's length."""
    return min(60.0, 0.2 * duration), max(SAMPLE_EVERY, min(30.0, 0.1 * duration))


def report(
    args: argparse.Namespace,
    reports: Path,
    endpoints: list[Endpoint],
    restarts: list[Restart],
    samples: list[tuple[float, int, int]],
    series: dict[str, dict[str, float]],
    locust_rc: int,
    duration: float,
    hostile: Hostile,
) -> tuple[str, list[tuple[str, bool]]]:
    table, total, failures = summarise(reports, series["routes"], None, locust_rc)
    journals = read_journals(endpoints)
    resets, executed = journals.resets, journals.executed
    failed_ids, anonymous, failed_keys = read_failures(reports / "failures.jsonl")
    late_keys = set(journals.late.values())
    faulted = late_keys | journals.reset_keys
    repeats = {rid for rid, key in failed_keys.items() if key in faulted}
    seen = attribute(reports / "access.jsonl", resets, restarts, set(journals.late), repeats)
    causes, unexplained = seen.causes, seen.unexplained
    social = duplicate_failures = 0
    fail_path = reports / "loadtest_failures.csv"
    if fail_path.exists():
        with fail_path.open() as f:
            for row in csv.DictReader(f):
                if "transaction served by social system" in row["Error"]:
                    social += int(row["Occurrences"])
                if "executed" in row["Error"] and "times" in row["Error"]:
                    duplicate_failures += int(row["Occurrences"])
    # A Locust failure is explained only by its own request id: one of Jalur's non-2xx
    # answers that an injected fault caused. Anything else (no id, a 2xx Locust failed, an
    # unexplained answer, or a failure the shoppers did not journal) is not.
    explained = min(failures, len(failed_ids & seen.explained))
    not_explained = failures - explained
    hidden = len(failed_ids - seen.answered) + anonymous
    injected_resets = sum(ep.counters["faults.resets"] for ep in endpoints)
    per_backend_dupes = sum(
        ep.counters["executions.duplicates"] for ep in endpoints if ep.kind == "commerce"
    )
    keyed = sum(ep.counters["executions.keyed"] for ep in endpoints if ep.kind == "commerce")
    cross_dupes = sum(1 for n in executed.values() if n > 1)
    warmup, window = measuring_windows(duration)
    end_t = samples[-1][0] if samples else 0.0
    start_rss, start_fds = window_median(samples, warmup, warmup + window) if samples else (0, 0)
    end_rss, end_fds = window_median(samples, end_t - window, end_t) if samples else (0, 0)
    rss_growth = (end_rss - start_rss) / start_rss if start_rss else 1.0
    fd_growth = (end_fds - start_fds) / start_fds if start_fds else 1.0
    peak_rss = max((s[1] for s in samples), default=0)
    peak_fds = max((s[2] for s in samples), default=0)
    came_back = all(r.ready for r in restarts)

    def fmt(d: dict[str, float]) -> str:
        return ", ".join(f"{k} {int(v)}" for k, v in sorted(d.items())) or "none"

    lines = [
        f"soak: {args.time} ({duration:.0f} s), {args.users} users, "
        f"{len(endpoints)} back-end processes, reset rate {args.reset_rate:.2%}, "
        f"late-answer rate {args.late_rate:.2%} of keyed payments, "
        f"a restart every {args.restart_every:.0f} s",
        "",
        table,
        "",
        f"requests: {total}; failed: {failures}; explained by injected faults (matched by "
        f"request id): {explained}; not explained: {not_explained}",
        f"  Jalur non-2xx answers: {seen.total} (from its access log): "
        f"{causes['injected reset']} resets that could not be retried, "
        f"{causes['injected restart']} during a restart, {causes['injected drip']} dripping "
        f"uploads cut (408), {causes['injected late answer']} payments answered late, "
        f"{causes['repeat of a faulted payment']} repeats of a reset or late payment "
        f"(outcome unknown), {causes['unexplained']} unexplained; "
        f"Locust failures journalled: {len(failed_ids)} with a request id, {anonymous} "
        f"without; without a non-2xx from Jalur: {hidden}",
        f"injected: {injected_resets} connection resets at the back ends "
        f"(/_sim/faults, accumulated; {sum(resets.values())} in the journals), "
        f"{len(journals.late)} payments answered {LATE_DELAY:.0f} s after executing "
        f"(keys {len(late_keys)}), "
        f"{len(restarts)} restarts "
        + "("
        + ", ".join(
            f"{r.endpoint.cluster}:{r.endpoint.port} {r.ready - r.stopped:.1f}s"
            if r.ready
            else f"{r.endpoint.cluster}:{r.endpoint.port} NOT BACK"
            for r in restarts
        )
        + ")",
        f"hostile clients: {hostile.waves} waves of {hostile.size} dripping payment uploads "
        f"and {hostile.size} unfinished {HEAD_BYTES // 1024} KiB heads (+{OVERSIZED_HEADS} "
        f"oversized): {fmt(dict(hostile.outcomes))}",
        f"payments executed twice: {per_backend_dupes} per back end (/_sim/executions, "
        f"{keyed} keyed executions, accumulated across restarts); {cross_dupes} keys executed "
        f"more than once across all commerce back ends (journals, {len(executed)} keys); "
        f"Locust duplicate-execution failures {duplicate_failures}",
        f"payments served by a social system: {social}",
        f"jalur RSS: start {start_rss / 1024:.1f} MiB, end {end_rss / 1024:.1f} MiB "
        f"({rss_growth:+.1%}), peak {peak_rss / 1024:.1f} MiB; open fds: start {start_fds}, "
        f"end {end_fds} ({fd_growth:+.1%}), peak {peak_fds} "
        f"(medians over {window:.0f} s after a {warmup:.0f} s warm-up and over the last "
        f"{window:.0f} s; {len(samples)} samples every {SAMPLE_EVERY:.0f} s)",
        f"jalur_requests_total by code: {fmt(series['codes'])}",
        f"jalur_upstream_errors_total by kind: {fmt(series['upstream_errors'])}",
        f"jalur_retries_total by route: {fmt(series['retries'])}",
        f"jalur_idempotency_total by outcome: {fmt(series['idempotency'])}",
        f"jalur_requests_rejected_total by reason: {fmt(series['rejected'])}",
        f"endpoints unhealthy at the end: {fmt(series['unhealthy'])}",
    ]
    for line in unexplained[:10]:
        lines.append(
            f"  unexplained: {line.get('start_time')} {line.get('method')} {line.get('path')} "
            f"-> {line.get('response_code')} {line.get('response_flags')} "
            f"upstream {line.get('upstream_host')} id {line.get('request_id')}"
        )
    lines.append(f"reports: {reports}/ (access.jsonl, journal-*.jsonl, metrics.txt, loadtest_*)")
    bars = [
        (f"no failure beyond the injected faults ({not_explained})", not_explained == 0),
        (
            f"no unexplained non-2xx in Jalur's access log ({causes['unexplained']})",
            causes["unexplained"] == 0,
        ),
        (
            f"no payment executed twice ({per_backend_dupes} + {cross_dupes} + "
            f"{duplicate_failures})",
            per_backend_dupes == 0 and cross_dupes == 0 and duplicate_failures == 0,
        ),
        (f"no payment served by a social system ({social})", social == 0),
        (f"RSS growth under 10 % ({rss_growth:+.1%})", rss_growth < GROWTH_BAR),
        (f"open fds growth under 10 % ({fd_growth:+.1%})", fd_growth < GROWTH_BAR),
        ("every restarted back end came back", came_back),
        (
            "every dripping upload was cut with 408 and every unfinished head refused",
            set(hostile.outcomes) <= {"drip: 408", "head: 408", "oversized head: 431"},
        ),
        (f"requests were made ({total})", total > 0),
    ]
    return "\n".join(lines), bars


if __name__ == "__main__":
    sys.exit(main())
