"""Locust against ``jalur demo``: ``make loadtest`` and ``make loadtest-distributed``.

1. starts ``jalur demo`` (simulated back ends + the proxy) in the background and keeps its PID;
   waits for the ``jalur serving on ...`` line and then for ``GET /readyz`` = 200, with deadlines;
2. runs Locust headless for a bounded time (``--time``), locally or as a master with workers on
   loopback, writing CSV and HTML reports under ``--reports`` (default ``loadtests/reports/``);
3. scrapes ``jalur_requests_total`` from the admin listener so Locust's per-route counts can be
   compared with the proxy's own, stops the demo by its PID and prints a summary;
4. exits non-zero if Locust failed, any request failed, no request was made, a payment was
   executed twice, or a commerce back end could not be asked how often it executed.

Whatever happens (an error, Ctrl-C, SIGTERM) every process it started is stopped, by PID.

    .venv/bin/python loadtests/run.py [--distributed] [--time 60s] [--users 50] [--spawn-rate 10]
        [--shape none|step|migration|rollback] [--proxy-workers N] [--config FILE]
        [--free-ports] [--reports DIR] [LOCUST OPTION ...]

Any option this script does not know is passed to Locust as it is (master and workers), e.g.
``--tags payment``, ``--exclude-tags retry``, ``--loglevel DEBUG``: ``make loadtest
ARGS="--users 200 --tags transaction"``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any, Protocol

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEMO_CONFIG = ROOT / "proxy" / "demo" / "demo.yaml"
SERVING = re.compile(r"serving on ([^\s:]+):(\d+) \(admin ([^\s:]+):(\d+)\)")
STARTUP_DEADLINE = 30.0
STOP_DEADLINE = 20.0


def log(msg: str) -> None:
    print(f"loadtest: {msg}", file=sys.stderr, flush=True)


def seconds(text: str) -> float:
    """Locust's ``--run-time`` syntax (``60``, ``60s``, ``2m``, ``1h30m``) in seconds."""
    if text.isdigit():
        return float(text)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not parts or not text:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (e.g. 60s, 2m, 1h30m)")
    h, m, s = (int(g or 0) for g in parts.groups())
    return float(h * 3600 + m * 60 + s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_busy(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_get(url: str, timeout: float = 3.0, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Processes:
    """Every process this script started, stopped by PID in reverse order."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, **kw)
        self.procs.append((name, proc))
        log(f"started {name} (pid {proc.pid})")
        return proc

    def stop(self, proc: subprocess.Popen[bytes], name: str, sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {proc.pid}) did not stop in {STOP_DEADLINE:.0f} s: SIGKILL")
                proc.kill()
                proc.wait()
            log(f"stopped {name} (pid {proc.pid}, exit {proc.returncode})")

    def stop_all(self) -> None:
        for name, proc in reversed(self.procs):
            self.stop(proc, name)


class Starter(Protocol):
    def start(self, name: str, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]: ...


def start_redis(procs: Starter, work: Path, *extra: str) -> str:
    """A redis-server (Debian package) on a free loopback port for Jalur's shared store,
    set up as production wants it (noeviction, AOF in ``work``); its URL once it answers."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (make test-tools installs it)")
    port = free_port()
    proc = procs.start(
        f"redis-server :{port}",
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--maxmemory-policy", "noeviction", "--dir", str(work),
         *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not port_busy("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"redis-server on :{port} did not start")
        time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0"


def demo_config(args: argparse.Namespace, reports: Path) -> tuple[Path, dict[str, Any]]:
    """The config to run, rewritten onto free loopback ports with ``--free-ports``."""
    path = Path(args.config)
    conf: dict[str, Any] = yaml.safe_load(path.read_text())
    if not args.free_ports:
        listen, admin = conf.get("listen", {}), conf.get("admin", {})
        for what, part, default in (("listen", listen, 8080), ("admin", admin, 9901)):
            host, port = part.get("host", "127.0.0.1"), int(part.get("port", default))
            if port and port_busy(host if host != "0.0.0.0" else "127.0.0.1", port):
                raise SystemExit(
                    f"loadtest: {what} port {host}:{port} is already in use "
                    "(a demo still running?); stop it or use --free-ports"
                )
        return path, conf
    conf.setdefault("listen", {})["port"] = 0
    conf.setdefault("admin", {})["port"] = 0
    ports: dict[str, int] = {}
    for cluster in conf.get("clusters", {}).values():
        cluster["endpoints"] = [
            f"http://127.0.0.1:{ports.setdefault(url, free_port())}" for url in cluster["endpoints"]
        ]
    out = reports / "demo-config.yaml"
    out.write_text(yaml.safe_dump(conf, sort_keys=False))
    return out, conf


def start_demo(
    procs: Processes, config: Path, reports: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start ``jalur demo``; return it, the data base URL and the admin base URL once ready."""
    return start_jalur(procs, ["demo", "-c", str(config)], reports, env, "jalur demo", "demo.log")


def start_fleet(
    procs: Processes,
    config: Path,
    conf: dict[str, Any],
    reports: Path,
    env: dict[str, str],
    args: argparse.Namespace,
) -> tuple[subprocess.Popen[bytes], str, str]:
    """The demo's back ends (``jalur demo --backends-only``), a redis-server, and
    ``jalur run --workers N`` with the shared store on it: the deployment's shape."""
    jalur = Path(sys.executable).parent / "jalur"
    cmd = [str(jalur)] if jalur.exists() else [sys.executable, "-m", "proxy"]
    procs.start(
        "demo back ends",
        [*cmd, "demo", "--backends-only", "-c", str(config)],
        stdout=(reports / "backends.log").open("wb"),
        stderr=subprocess.STDOUT,
        cwd=str(reports),
    )
    deadline = time.monotonic() + STARTUP_DEADLINE
    for url in {u for c in conf.get("clusters", {}).values() for u in c["endpoints"]}:
        while sim_counters(url, "faults") is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"loadtest: back end {url} did not come up")
            time.sleep(0.05)
    fleet = dict(conf)
    fleet["store"] = {"kind": "redis", "url": start_redis(procs, reports)}
    path = reports / "fleet-config.yaml"
    path.write_text(yaml.safe_dump(fleet, sort_keys=False))
    workers = str(args.proxy_workers)
    return start_jalur(procs, ["run", "-c", str(path), "--workers", workers], reports, env)


def start_jalur(
    procs: Processes,
    jalur_args: list[str],
    reports: Path,
    env: dict[str, str],
    name: str = "jalur",
    logname: str = "jalur.log",
) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start ``jalur <jalur_args>`` (``demo -c ...`` or ``run -c ...``) with stdout and stderr
    in ``reports/logname``; return it, the data and admin base URLs once ``/readyz`` is 200."""
    jalur = Path(sys.executable).parent / "jalur"
    cmd = [str(jalur)] if jalur.exists() else [sys.executable, "-m", "proxy"]
    logfile = (reports / logname).open("wb")
    proc = procs.start(
        name,
        [*cmd, *jalur_args],
        stdout=logfile,  # the access log (JSON lines) and the banner
        stderr=subprocess.PIPE,
        cwd=str(reports),  # the compliance audit log lands here
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )
    found: list[re.Match[str]] = []
    seen = threading.Event()

    def drain(stream: IO[bytes]) -> None:
        # Keep reading stderr for the whole run: a full pipe would stall the proxy.
        for raw in stream:
            logfile.write(raw)
            logfile.flush()
            if not found and (m := SERVING.search(raw.decode("utf-8", "replace"))):
                found.append(m)
                seen.set()
        seen.set()

    assert proc.stderr is not None
    threading.Thread(target=drain, args=(proc.stderr,), daemon=True).start()
    if not seen.wait(STARTUP_DEADLINE) or not found:
        raise SystemExit(f"loadtest: {name} did not start (see {reports / logname})")
    m = found[0]
    host = "127.0.0.1" if m.group(1) in ("0.0.0.0", "::") else m.group(1)
    admin_host = "127.0.0.1" if m.group(3) in ("0.0.0.0", "::") else m.group(3)
    base, admin = f"http://{host}:{m.group(2)}", f"http://{admin_host}:{m.group(4)}"
    deadline = time.monotonic() + STARTUP_DEADLINE
    while True:
        with contextlib.suppress(OSError):
            if http_get(admin + "/readyz", timeout=1)[0] == 200:
                break
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"loadtest: {admin}/readyz never answered 200")
        time.sleep(0.2)
    log(f"{name} ready: proxy {base}, admin {admin}")
    return proc, base, admin


def run_locust(
    procs: Processes, args: argparse.Namespace, base: str, admin: str, token: str | None
) -> int:
    reports = Path(args.reports)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "JALUR_LOADTEST_ADMIN_URL": admin,
        "JALUR_LOADTEST_SHAPE": "" if args.shape == "none" else args.shape,
        "JALUR_LOADTEST_MIGRATION_LOG": str(reports / "migration.json"),
    }
    if token:
        env["JALUR_LOADTEST_ADMIN_TOKEN"] = token
    common = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--host", base]
    master = [
        *common,
        "--headless",
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.time,
        "--stop-timeout",
        "5",
        "--csv",
        str(reports / "loadtest"),
        "--html",
        str(reports / "loadtest.html"),
        "--exit-code-on-error",
        "1",
        "--only-summary",
        *args.locust_args,
    ]
    workers: list[subprocess.Popen[bytes]] = []
    if args.distributed:
        port = free_port()
        master += [
            "--master",
            "--master-bind-host",
            "127.0.0.1",
            "--master-bind-port",
            str(port),
            "--expect-workers",
            str(args.workers),
            "--expect-workers-max-wait",
            "30",
        ]
        for i in range(args.workers):
            wlog = (reports / f"locust-worker-{i + 1}.log").open("wb")
            workers.append(
                procs.start(
                    f"locust worker {i + 1}",
                    [
                        *common,
                        "--worker",
                        "--master-host",
                        "127.0.0.1",
                        "--master-port",
                        str(port),
                        *args.locust_args,
                    ],
                    stdout=wlog,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
    proc = procs.start("locust master" if args.distributed else "locust", master, env=env)
    # Locust stops itself after --run-time; this bound catches a wedged run.
    limit = seconds(args.time) + 60 + (30 if args.distributed else 0)
    try:
        rc = proc.wait(limit)
    except subprocess.TimeoutExpired:
        log(f"locust still running {limit:.0f} s after start: stopping it")
        procs.stop(proc, "locust")
        rc = 1
    for i, w in enumerate(workers):
        try:
            w.wait(15)  # workers quit when the master does
        except subprocess.TimeoutExpired:
            procs.stop(w, f"locust worker {i + 1}")
    return rc if rc is not None else 1


def jalur_counts(
    admin: str, metric: str = "jalur_requests_total", label: str = "route"
) -> dict[str, float]:
    """``sum by (label) (metric)`` from the admin listener (``{}`` when it cannot be read)."""
    counts: dict[str, float] = {}
    try:
        status, body = http_get(admin + "/metrics")
    except OSError:
        return counts
    if status != 200:
        return counts
    for line in body.decode().splitlines():
        if line.startswith(metric + "{"):
            m = re.search(label + r'="([^"]*)"', line)
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def commerce_executions(conf: dict[str, Any]) -> tuple[int, int, list[str]]:
    """Keyed POST/PATCH executions and duplicates, summed over the demo's commerce back ends.

    Asks each simulated back end (``/_sim/executions``): a duplicate is a request with an
    ``Idempotency-Key`` that back end had already executed, i.e. a payment charged twice.
    Returns ``(keyed, duplicates, unreachable endpoints)``.
    """
    kinds = {name: (s or {}).get("kind") for name, s in (conf.get("systems") or {}).items()}
    keyed = duplicates = 0
    missed: list[str] = []
    asked: set[str] = set()  # an endpoint shared by two clusters is one back end
    for cluster in (conf.get("clusters") or {}).values():
        if kinds.get(cluster.get("system")) != "commerce":
            continue
        for url in cluster.get("endpoints", []):
            if url in asked:
                continue
            asked.add(url)
            counts = sim_counters(url, "executions")
            if counts is None:
                missed.append(url)
                continue
            keyed += int(counts.get("keyed", 0))
            duplicates += int(counts.get("duplicates", 0))
    return keyed, duplicates, missed


def sim_counters(url: str, what: str = "executions") -> dict[str, Any] | None:
    """A simulated back end's ``/_sim/executions`` or ``/_sim/faults`` (None: unreachable)."""
    try:
        status, body = http_get(url.rstrip("/") + "/_sim/" + what)
        counts = json.loads(body) if status == 200 else None
    except (OSError, ValueError):
        return None
    return counts if isinstance(counts, dict) else None


def summarise(
    reports: Path, jalur: dict[str, float], migration: Any, locust_rc: int
) -> tuple[str, int, int]:
    """The summary text, total requests and total failures (from Locust's CSV)."""
    stats_path = reports / "loadtest_stats.csv"
    if not stats_path.exists():
        return f"no Locust stats at {stats_path}", 0, 0
    with stats_path.open() as f:
        rows = list(csv.DictReader(f))
    # Routes first, then the admin calls of a shape, then the total.
    rows.sort(key=lambda r: (r["Name"] == "Aggregated", r["Type"] == "ADMIN", r["Name"]))
    width = max([20, *(len(r["Name"]) + len(r["Type"]) + 1 for r in rows if r["Type"] == "ADMIN")])
    lines = [
        f"{'route':<{width}} {'requests':>9} {'failures':>8} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'req/s':>7} {'jalur_requests_total':>21}",
    ]
    total_req = total_fail = 0
    for row in rows:
        name = row["Name"] if row["Type"] in ("GET", "POST", "") else f"{row['Type']} {row['Name']}"
        if row["Name"] == "Aggregated":
            total_req, total_fail = int(row["Request Count"]), int(row["Failure Count"])
        seen = jalur.get(row["Name"])
        lines.append(
            f"{name:<{width}} {row['Request Count']:>9} {row['Failure Count']:>8} {row['50%']:>7} "
            f"{row['95%']:>7} {row['99%']:>7} {float(row['Requests/s']):>7.1f} "
            f"{'' if seen is None else int(seen):>21}"
        )
    lines.append("")
    share = 100.0 * total_fail / total_req if total_req else 0.0
    lines.append(
        f"total: {total_req} requests, {total_fail} failures ({share:.2f} %); "
        f"locust exit code {locust_rc}"
    )
    fail_path = reports / "loadtest_failures.csv"
    if fail_path.exists():
        with fail_path.open() as f:
            failures = list(csv.DictReader(f))
        for row in failures[:10]:
            lines.append(
                f"  failure x{row['Occurrences']}: {row['Method']} {row['Name']}: {row['Error']}"
            )
    mig = reports / "migration.json"
    if mig.exists():
        data = json.loads(mig.read_text())
        route, category = data.get("route"), data.get("category")
        lines.append(
            f"migration of route {route}: weight on commerce, share of {route} served by "
            f"commerce, progress ratio of {category} and all (GET /migration, measured by the "
            "proxy over its sliding window):"
        )
        for s in data.get("samples", []):
            lines.append(
                f"  t={s['t']:>5}s  weight={s['weight_percent']!s:>4}%  "
                f"served={s['route_commerce_share']!s:>6}  "
                f"{category}={_num(s['category_ratio'])}  all={_num(s['all_ratio'])}"
            )
    if migration is not None:
        progress = {
            c: f.get("ratio") if isinstance(f, dict) else f
            for c, f in (migration.get("progress") or {}).items()
        }
        lines.append(f"GET /migration at the end: progress {json.dumps(progress)}")
    lines.append(f"reports: {reports}/loadtest_*.csv, {reports}/loadtest.html")
    return "\n".join(lines), total_req, total_fail


def _num(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other options go to Locust unchanged (e.g. --tags payment).",
        allow_abbrev=False,  # --tag must reach Locust, not be read as a prefix of ours
    )
    p.add_argument("--time", default="60s", help="locust --run-time (default 60s)")
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--spawn-rate", type=float, default=10)
    p.add_argument("--shape", choices=["none", "step", "migration", "rollback"], default="none")
    p.add_argument(
        "--proxy-workers",
        type=int,
        default=1,
        help="N > 1: the demo's back ends, a redis-server and `jalur run --workers N` sharing "
        "it (as deployed), instead of `jalur demo` in one process",
    )
    p.add_argument("--distributed", action="store_true", help="a master and --workers workers")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--config", default=str(DEMO_CONFIG), help="config for jalur demo")
    p.add_argument("--free-ports", action="store_true", help="run the demo on free ports")
    p.add_argument("--reports", default=str(HERE / "reports"))
    args, to_locust = p.parse_known_args(argv)
    args.locust_args = to_locust
    seconds(args.time)  # validate early
    reports = Path(args.reports).resolve()
    reports.mkdir(parents=True, exist_ok=True)
    args.reports = str(reports)
    for old in [*reports.glob("loadtest*"), reports / "migration.json"]:
        old.unlink(missing_ok=True)

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    procs = Processes()
    try:
        config, conf = demo_config(args, reports)
        token = (conf.get("admin") or {}).get("token") or os.environ.get(
            "JALUR_LOADTEST_ADMIN_TOKEN"
        )
        demo_env = {}
        if args.shape in ("migration", "rollback"):
            # The proxy's progress figure is a sliding window (5 min in the demo config); make
            # it short enough to follow each step of the ramp within the run (10 s at least).
            window = max(10, int(seconds(args.time) / 4))
            demo_env["JALUR_MIGRATION__WINDOW"] = str(window)
        if args.proxy_workers > 1:
            demo, base, admin = start_fleet(procs, config, conf, reports, demo_env, args)
        else:
            demo, base, admin = start_demo(procs, config, reports, demo_env)
        rc = run_locust(procs, args, base, admin, token)
        jalur = jalur_counts(admin)
        idem = jalur_counts(admin, "jalur_idempotency_total", "outcome")
        keyed, duplicates, missed = commerce_executions(conf)
        migration = None
        with contextlib.suppress(OSError, ValueError):
            status, body = http_get(admin + "/migration", token=token)
            migration = json.loads(body) if status == 200 else None
        procs.stop(demo, "jalur demo")
    finally:
        procs.stop_all()
    text, total, failures = summarise(reports, jalur, migration, rc)
    outcomes = ", ".join(f"{k} {int(v)}" for k, v in sorted(idem.items())) or "none"
    text += (
        f"\nidempotency gate (jalur_idempotency_total by outcome): {outcomes}"
        f"\ncommerce back ends: {keyed} executions with an Idempotency-Key, "
        f"{duplicates} executed twice (must be 0)"
        + (f"; NOT ASKED (unreachable, fails the run): {', '.join(missed)}" if missed else "")
    )
    (reports / "summary.txt").write_text(text + "\n")
    print("\n" + text, flush=True)
    # A back end that could not be asked may have executed a payment twice: no pass.
    if rc != 0 or failures or not total or duplicates or missed:
        log(
            f"FAILED (locust exit {rc}, {failures} failures, {total} requests, "
            f"{duplicates} duplicate executions, {len(missed)} commerce back ends not asked)"
        )
        return 1
    log("passed: no failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
