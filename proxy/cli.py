"""``jalur run | check | routes | demo | audit | report | consent-token | migration |
version``: the command line (stdlib argparse).

Logs go to stderr; the access log (when enabled) is JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

from . import __version__, heap, migrationctl
from . import config as cfg
from .idempotency import gates as idempotency_gates
from .router import Router

DEMO_CONFIG: Final = Path(__file__).parent / "demo" / "demo.yaml"
CONSENT_KEY_ENV: Final = "JALUR_BOUNDARY__CONSENT__KEY"
AUDIT_KEY_ENV: Final = "JALUR_AUDIT__KEY"
# Prefix of the metrics directory `run --workers N` makes (and removes) in the temp directory.
METRICS_DIR_PREFIX: Final = "jalur-metrics-"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jalur", description="Jalur transaction routing proxy")
    p.add_argument("--version", action="version", version=f"jalur {__version__}")
    p.add_argument("--log-level", default="INFO", help="stderr log level (default INFO)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="serve with a config file")
    run.add_argument("-c", "--config", required=True, help="YAML config file")
    run.add_argument(
        "--allow-python-parser",
        action="store_true",
        help="serve even if aiohttp's C HTTP parser is unavailable (not recommended)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the listening socket (default 1: no supervisor)",
    )
    run.add_argument(
        "--print-config",
        nargs="?",
        const="yaml",
        choices=("yaml", "json"),
        metavar="FORMAT",
        help="print the merged config (file + JALUR_* env), secrets masked, as yaml "
        "(default) or json, and exit without serving",
    )

    # Started by the supervisor, not by people: no help= so it is not listed in --help.
    worker = sub.add_parser("worker")
    worker.add_argument("-c", "--config", required=True, help="YAML config file")
    worker.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    worker.add_argument("--ready-fd", type=int, help="pipe to write 'ready' to")
    worker.add_argument("--slot", type=int, default=0, help="worker number (own audit trail)")
    worker.add_argument("--supervisor", type=int, help="pid of the supervisor (exit with it)")

    check = sub.add_parser("check", help="validate a config file and summarise it")
    check.add_argument("file", help="YAML config file")

    routes = sub.add_parser("routes", help="print the compiled route table")
    routes.add_argument("-c", "--config", required=True, help="YAML config file")

    demo = sub.add_parser("demo", help="simulated back ends + proxy on loopback")
    demo.add_argument(
        "-c", "--config", default=str(DEMO_CONFIG), help="demo config (default: built in)"
    )
    demo.add_argument(
        "--tls",
        action="store_true",
        help="commerce clusters over mutual TLS with a CA generated now",
    )
    demo.add_argument(
        "--tls-dir",
        type=Path,
        help="where --tls writes its CA and certificates (default: a new temporary directory)",
    )
    demo.add_argument(
        "--port-base",
        type=int,
        metavar="N",
        help="move every demo port by the same amount: the proxy on N (default 8080), the "
        "admin listener and the back ends (9901, 9001-9006 by default) beside it",
    )
    demo.add_argument(
        "--backends-only",
        action="store_true",
        help="only the simulated back ends (run the proxy yourself, e.g. with --workers)",
    )

    audit = sub.add_parser("audit", help="the tamper-evident audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify", help="check every hash chain and segment seal; exit 0 only if intact"
    )
    verify.add_argument("paths", nargs="+", metavar="PATH", help="audit files (any order)")
    _key_option(verify)
    verify.add_argument(
        "--live",
        action="store_true",
        help="accept records not sealed yet in the newest file (a proxy still writing it)",
    )
    verify.add_argument("--json", action="store_true", help="print the verdict as JSON")

    report = sub.add_parser("report", help="migration compliance report from a verified trail")
    report.add_argument("--audit", nargs="+", required=True, metavar="PATH", help="audit files")
    report.add_argument("--since", required=True, help="RFC 3339 time or date (inclusive)")
    report.add_argument("--until", required=True, help="RFC 3339 time or date (exclusive)")
    report.add_argument(
        "--format", choices=("json", "markdown", "html"), default="markdown", help="output"
    )
    report.add_argument(
        "--out", help="write here instead of stdout (Markdown: the chart goes beside it, .svg)"
    )
    report.add_argument("--live", action="store_true", help="as for `audit verify`")
    _key_option(report)

    token = sub.add_parser(
        "consent-token", help="print a consent token letting one system receive another's id"
    )
    token.add_argument(
        "--key",
        help=f"HMAC key (default: ${CONSENT_KEY_ENV}; prefer it, argv is visible in ps)",
    )
    token.add_argument("--user", required=True, help="the user's id in the from system")
    token.add_argument(
        "--from", dest="from_system", metavar="SYSTEM", required=True, help="the id's system"
    )
    token.add_argument(
        "--to", dest="to_system", metavar="SYSTEM", required=True, help="the receiving system"
    )
    token.add_argument(
        "--scope",
        dest="scopes",
        metavar="SCOPE",
        action="append",
        required=True,
        help="consented scope (repeatable)",
    )
    token.add_argument("--ttl", type=int, default=3600, help="seconds valid (default 3600)")
    migrationctl.add_parser(sub)
    sub.add_parser("version", help="print the version and the runtime it uses")
    return p


def _key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--key-file",
        help=f"file holding the audit key (default: ${AUDIT_KEY_ENV}; argv is visible in ps)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "migration":
        return migrationctl.run(args, sys.stdout, sys.stderr)
    if args.command == "check":
        return check(args.file, sys.stdout, sys.stderr)
    if args.command == "routes":
        config = _load_or_report(args.config, sys.stderr)
        if config is None:
            return 1
        print_routes(config, sys.stdout)
        return 0
    if args.command == "run":
        if args.workers < 1:
            print("--workers must be at least 1", file=sys.stderr)
            return 2
        config = _load_or_report(args.config, sys.stderr)
        if config is None:
            return 1
        if args.print_config:
            print_config(config, args.print_config, sys.stdout)
            return 0
        from .tls import check_files

        for warning in check_files(config)[1]:  # e.g. a certificate expiring within 30 days
            logging.getLogger("jalur.tls").warning("%s", warning)
        if not c_parser_in_use() and not args.allow_python_parser:
            print(
                "refusing to start: aiohttp's C HTTP parser is not in use (the pure-Python "
                "parser has had request-smuggling bugs); fix the install or pass "
                "--allow-python-parser",
                file=sys.stderr,
            )
            return 1
        gated = sorted(idempotency_gates(config))
        if args.workers > 1 and config.store.kind == "memory" and gated:
            print(
                f"refusing to start {args.workers} workers with store.kind: memory: routes "
                f"{', '.join(gated)} deduplicate payments, each worker would keep its own "
                "records, and a payment repeated on another worker would execute twice; set "
                "store.kind: redis (docs/payments.md) or run one worker",
                file=sys.stderr,
            )
            return 1
        from .accept import ListenError

        try:
            if args.workers > 1:
                own_dir = _multiprocess_metrics_dir()
                try:
                    from .supervisor import supervise

                    _run(supervise(config, args.config, args.workers))
                finally:
                    if own_dir is not None:
                        shutil.rmtree(own_dir, ignore_errors=True)
                return 0
            from .server import serve

            _run(serve(config, config_path=args.config))
        except ListenError as exc:
            print(exc.strerror, file=sys.stderr)  # one line: "listen HOST:PORT: why"
            return 1
        return 0
    if args.command == "worker":
        return _worker(args.config, args.fd, args.ready_fd, args.slot, args.supervisor)
    if args.command == "demo":
        from .demo.run import DEMO_AUDIT_KEY, moved_ports, run_demo

        os.environ.setdefault(AUDIT_KEY_ENV, DEMO_AUDIT_KEY)
        config = _load_or_report(args.config, sys.stderr)
        if config is None:
            return 1
        if args.port_base is not None:
            try:
                config = moved_ports(config, args.port_base)
            except ValueError as exc:
                print(f"demo: --port-base: {exc}", file=sys.stderr)
                return 2
        _run(
            run_demo(
                config,
                tls=args.tls or args.tls_dir is not None,
                tls_dir=args.tls_dir,
                backends_only=args.backends_only,
            )
        )
        return 0
    if args.command == "consent-token":
        return consent_token(args, sys.stdout, sys.stderr)
    if args.command == "version":
        print(version_line())
        return 0
    if args.command == "audit":
        return audit_verify(args, sys.stdout, sys.stderr)
    if args.command == "report":
        return report(args, sys.stdout, sys.stderr)
    return 2  # pragma: no cover - argparse rejects unknown commands


def version_line() -> str:
    """``jalur X.Y.Z (python 3.11.7, aiohttp 3.x with its C parser, uvloop 0.x)``."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "missing"

    parser = "with its C parser" if c_parser_in_use() else "pure-Python parser"
    return (
        f"jalur {__version__} (python {platform.python_version()}, "
        f"aiohttp {of('aiohttp')} {parser}, uvloop {of('uvloop')})"
    )


def print_config(config: cfg.Config, fmt: str, out: TextIO) -> None:
    """The config as it would be served (file + env overrides), secrets masked."""
    from .admin import masked

    data = masked(config)
    if fmt == "json":
        import json

        print(json.dumps(data, indent=2), file=out)
    else:
        import yaml

        out.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def consent_token(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .boundary import make_token

    key = args.key or os.environ.get(CONSENT_KEY_ENV)
    if not key:
        print(f"consent-token: no key: pass --key or set {CONSENT_KEY_ENV}", file=err)
        return 2
    try:
        token = make_token(key, args.user, args.from_system, args.to_system, args.scopes, args.ttl)
    except ValueError as exc:
        print(f"consent-token: {exc}", file=err)
        return 2
    print(token, file=out)
    return 0


def _audit_key(args: argparse.Namespace, err: TextIO) -> bytes | None:
    if args.key_file:
        try:
            return Path(args.key_file).read_text(encoding="utf-8").strip().encode()
        except OSError as exc:
            print(f"cannot read the key file: {exc.strerror}", file=err)
            return None
    key = os.environ.get(AUDIT_KEY_ENV)
    if not key:
        print(f"no audit key: set {AUDIT_KEY_ENV} or pass --key-file", file=err)
        return None
    return key.encode()


def audit_verify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``jalur audit verify``: 0 intact, 1 a break, 2 cannot check (no key, unreadable)."""
    import time

    from . import audit

    key = _audit_key(args, err)
    if key is None:
        return 2
    started = time.perf_counter()
    try:
        verdict = audit.verify(args.paths, key, live=args.live)
    except OSError as exc:
        print(f"cannot read {exc.filename}: {exc.strerror}", file=err)
        return 2
    elapsed = time.perf_counter() - started
    if args.json:
        import json

        body = {
            "intact": verdict.intact,
            "files": verdict.files,
            "records": verdict.records,
            "chains": verdict.chains,
            "seals": verdict.seals,
            "seconds": round(elapsed, 3),
            "breaks": [
                {"file": b.file, "line": b.line, "kind": b.kind, "detail": b.detail}
                for b in verdict.breaks
            ],
            "warnings": verdict.warnings,
        }
        print(json.dumps(body, indent=2), file=out)
    else:
        for b in verdict.breaks:
            print(b, file=out)
        for w in verdict.warnings:
            print(f"note: {w}", file=out)
        state = "intact" if verdict.intact else f"NOT intact: {len(verdict.breaks)} break(s)"
        print(
            f"{state}: {verdict.records} records, {verdict.chains} chain(s), "
            f"{verdict.seals} seal(s), {len(verdict.files)} file(s) in {elapsed:.2f}s",
            file=out,
        )
    return 0 if verdict.intact else 1


def report(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``jalur report``: 0 written, 1 the trail is not intact (refused), 2 bad arguments."""
    from . import report as report_mod

    key = _audit_key(args, err)
    if key is None:
        return 2
    try:
        since = report_mod.parse_time(args.since)
        until = report_mod.parse_time(args.until)
    except ValueError as exc:
        print(f"report: {exc}", file=err)
        return 2
    if until <= since:
        print("report: --until must be after --since", file=err)
        return 2
    try:
        built = report_mod.build(args.audit, key, since, until, live=args.live)
    except OSError as exc:
        print(f"cannot read {exc.filename}: {exc.strerror}", file=err)
        return 2
    except report_mod.NotVerified as exc:
        print(f"report refused: the trail is not intact ({len(exc.breaks)} break(s)):", file=err)
        for b in exc.breaks[:20]:
            print(f"  {b}", file=err)
        print("run `jalur audit verify` on it for the whole list", file=err)
        return 1
    if args.out:
        target = Path(args.out)
        href = None
        if args.format == "markdown":  # the chart beside it: Markdown cannot inline SVG
            chart = target.with_suffix(".svg")
            chart.write_text(report_mod.chart(built), encoding="utf-8")
            href = chart.name
        target.write_text(report_mod.render(built, args.format, chart_href=href), "utf-8")
    else:
        out.write(report_mod.render(built, args.format))
    return 0


def _run(coro: Coroutine[Any, Any, None]) -> None:
    heap.keep_freed_heap()
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(coro)


def c_parser_in_use() -> bool:
    """True when aiohttp parses requests with its C (llhttp) parser. The pure-Python
    fallback (no compiled extension, or AIOHTTP_NO_EXTENSIONS set) has had most of aiohttp's
    request-smuggling bugs; Jalur refuses to serve with it unless told otherwise. (Kept here,
    not in server.py: the CLI must not import prometheus-client before the multiprocess
    directory is set.)"""
    from aiohttp import http_parser

    return http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser"


def _multiprocess_metrics_dir() -> str | None:
    """prometheus-client multiprocess mode: the directory must be set before the library is
    imported, shared by the supervisor and its workers, and empty at start. Returns the
    directory when Jalur made it (the caller removes it at exit), None when the operator
    named it (``PROMETHEUS_MULTIPROC_DIR``: emptied, then left in place)."""
    import tempfile

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
        return None
    made = tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    return made


def _worker(
    config_path: str, fd: int, ready_fd: int | None, slot: int, supervisor: int | None
) -> int:
    import socket

    from . import parentwatch
    from .audit import per_worker

    parent = supervisor if supervisor is not None else os.getppid()
    parentwatch.die_with_parent()
    if parentwatch.orphaned(parent):
        return 1  # the supervisor died before the signal was armed

    config = _load_or_report(config_path, sys.stderr, warn=False)  # the supervisor warned
    if config is None:
        return 1
    config = per_worker(config, slot)
    from .server import serve

    sock = socket.socket(fileno=fd)
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    ours = os.path.basename(metrics_dir).startswith(METRICS_DIR_PREFIX)
    alive = _hold_shared(metrics_dir) if ours else None

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)

    try:
        _run(serve(config, config_path=config_path, data_sock=sock, on_ready=ready, parent=parent))
    finally:
        if alive is not None and parentwatch.parent_gone(parent) and _last_one(alive):
            # The supervisor cannot remove the metrics directory it made: the last of its
            # workers to stop does (one still writing its files would re-create some).
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


# A worker holds a shared lock on this file in the metrics directory while it may write
# metrics; the one that can take it exclusively is the last.
_ALIVE: Final = "workers.lock"


def _hold_shared(metrics_dir: str) -> int | None:
    import fcntl

    try:
        fd = os.open(os.path.join(metrics_dir, _ALIVE), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        return None
    return fd


def _last_one(fd: int) -> bool:
    """Release this worker's shared lock: True if no other worker holds one."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _load_or_report(path: str, err: TextIO, *, warn: bool = True) -> cfg.Config | None:
    """The config (file + ``JALUR_*`` overrides), or None after printing every error. With
    ``warn``, one line names the ``JALUR_`` variables ignored that look like overrides."""
    misses = cfg.env_near_misses(os.environ) if warn else []
    if misses:
        print(
            f"warning: ignored {', '.join(misses)}: not a config path "
            f"(an override is JALUR_<SECTION>__<FIELD>, e.g. JALUR_LISTEN__PORT)",
            file=err,
        )
    try:
        return cfg.load(path, env=os.environ)
    except cfg.ConfigError as exc:
        print(f"{exc.source}: {len(exc.errors)} error(s)", file=err)
        for e in exc.errors:
            print(f"  {e}", file=err)
        return None


def check(path: str, out: TextIO, err: TextIO) -> int:
    config = _load_or_report(path, err)
    if config is None:
        return 1
    from .tls import check_files

    for warning in check_files(config)[1]:  # the errors already refused the load
        print(f"warning: {warning}", file=err)
    for name, cluster in config.clusters.items():
        if cluster.tls is not None and not cluster.tls.verify:
            print(
                f"warning: $.clusters.{name}.tls.verify: false: the upstream's certificate is "
                "not checked",
                file=err,
            )
    print(f"{path}: OK", file=out)
    print(
        f"listen {config.listen.host}:{config.listen.port}  "
        f"admin {config.admin.host}:{config.admin.port}",
        file=out,
    )
    print("systems:", file=out)
    for name, system in config.systems.items():
        print(f"  {name:<20} {system.kind}", file=out)
    print("clusters:", file=out)
    for name, cluster in config.clusters.items():
        print(f"  {name:<20} {cluster.system:<14} {', '.join(cluster.endpoints)}", file=out)
    categories: dict[str, list[str]] = {}
    for route in config.routes:
        categories.setdefault(route.category, []).append(route.name)
    print(f"routes: {len(config.routes)}", file=out)
    print("categories:", file=out)
    tx = set(config.compliance.transaction_categories)
    for category, names in categories.items():
        mark = " (transaction)" if category in tx else ""
        print(f"  {category + mark:<26} {', '.join(names)}", file=out)
    from .routepolicy import describe

    for line in describe(config):
        print(line, file=out)
    sealed = "sealed" if config.audit.key else f"NOT sealed: {AUDIT_KEY_ENV} is not set"
    print(f"audit trail: {config.compliance.audit.path} ({sealed})", file=out)
    return 0


def describe_match(m: cfg.Match) -> str:
    parts = []
    if m.host:
        parts.append(f"host={m.host}")
    if m.exact is not None:
        parts.append(f"exact={m.exact}")
    elif m.prefix is not None:
        parts.append(f"prefix={m.prefix}")
    elif m.regex is not None:
        parts.append(f"regex={m.regex}")
    else:
        parts.append("any path")
    if not m.case_sensitive:
        parts.append("(case-insensitive)")
    for h in m.headers:
        parts.append(f"header:{h.name}")
    return " ".join(parts)


def print_routes(config: cfg.Config, out: TextIO) -> None:
    router = Router(config.routes)
    rows = [("#", "ROUTE", "METHODS", "MATCH", "CATEGORY", "CLUSTERS")]
    for r in router.routes:
        methods = ",".join(r.spec.match.methods) if r.spec.match.methods else "*"
        if len(r.targets) == 1:
            clusters = r.targets[0].cluster
        else:
            clusters = " ".join(f"{t.cluster}:{t.weight}" for t in r.targets)
        systems = {config.clusters[t.cluster].system for t in r.targets}
        clusters += f" ({', '.join(sorted(systems))})"
        if r.spec.shadow is not None:
            clusters += f" shadow:{r.spec.shadow.cluster}@{r.spec.shadow.percent:g}%"
        rows.append(
            (str(r.index), r.name, methods, describe_match(r.spec.match), r.category, clusters)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )
