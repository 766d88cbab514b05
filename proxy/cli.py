"""``jalur run | check | routes | demo | consent-token``: the command line (stdlib argparse).

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

from . import __version__, heap
from . import config as cfg
from .router import Router

DEMO_CONFIG: Final = Path(__file__).parent / "demo" / "demo.yaml"
CONSENT_KEY_ENV: Final = "JALUR_BOUNDARY__CONSENT__KEY"
# Prefix of the metrics directory `run --workers N` makes (and removes) in the temp directory.
METRICS_DIR_PREFIX: Final = "jalur-metrics-"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jalur", description="Jalur transaction routing proxy")
    p.add_argument("--version", action="version", version=f"jalur {__version__}")
    p.add_argument("--log-level", default="INFO", help="stderr log level (default INFO)")
    sub = p.add_subparsers(dest="command", required=True)

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

    worker = sub.add_parser("worker", help=argparse.SUPPRESS)  # started by the supervisor
    worker.add_argument("-c", "--config", required=True)
    worker.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    worker.add_argument("--ready-fd", type=int, help="pipe to write 'ready' to")
    worker.add_argument("--supervisor", type=int, help="pid of the supervisor (exit with it)")

    check = sub.add_parser("check", help="validate a config file and summarise it")
    check.add_argument("file", help="YAML config file")

    routes = sub.add_parser("routes", help="print the compiled route table")
    routes.add_argument("-c", "--config", required=True, help="YAML config file")

    demo = sub.add_parser("demo", help="simulated back ends + proxy on loopback")
    demo.add_argument(
        "-c", "--config", default=str(DEMO_CONFIG), help="demo config (default: built in)"
    )

    token = sub.add_parser(
        "consent-token", help="print a consent token letting one system receive another's id"
    )
    token.add_argument(
        "--key",
        help=f"HMAC key (default: ${CONSENT_KEY_ENV}; prefer it, argv is visible in ps)",
    )
    token.add_argument("--user", required=True, help="the user's id in the from system")
    token.add_argument("--from", dest="from_system", metavar="SYSTEM", required=True)
    token.add_argument("--to", dest="to_system", metavar="SYSTEM", required=True)
    token.add_argument(
        "--scope",
        dest="scopes",
        metavar="SCOPE",
        action="append",
        required=True,
        help="consented scope (repeatable)",
    )
    token.add_argument("--ttl", type=int, default=3600, help="seconds valid (default 3600)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
        if not c_parser_in_use() and not args.allow_python_parser:
            print(
                "refusing to start: aiohttp's C HTTP parser is not in use (the pure-Python "
                "parser has had request-smuggling bugs); fix the install or pass "
                "--allow-python-parser",
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
        return _worker(args.config, args.fd, args.ready_fd, args.supervisor)
    if args.command == "demo":
        from .demo.run import run_demo

        config = _load_or_report(args.config, sys.stderr)
        if config is None:
            return 1
        _run(run_demo(config))
        return 0
    if args.command == "consent-token":
        return consent_token(args, sys.stdout, sys.stderr)
    return 2  # pragma: no cover - argparse rejects unknown commands


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


def _worker(config_path: str, fd: int, ready_fd: int | None, supervisor: int | None) -> int:
    import socket

    from . import parentwatch

    parent = supervisor if supervisor is not None else os.getppid()
    parentwatch.die_with_parent()
    if parentwatch.orphaned(parent):
        return 1  # the supervisor died before the signal was armed

    config = _load_or_report(config_path, sys.stderr, warn=False)  # the supervisor warned
    if config is None:
        return 1
    from .server import serve

    sock = socket.socket(fileno=fd)

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)

    try:
        _run(serve(config, config_path=config_path, data_sock=sock, on_ready=ready, parent=parent))
    finally:
        if parentwatch.orphaned(parent):
            # The supervisor cannot remove the metrics directory it made: its workers do.
            metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
            if os.path.basename(metrics_dir).startswith(METRICS_DIR_PREFIX):
                shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


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
