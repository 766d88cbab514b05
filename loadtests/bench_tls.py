"""TLS to the upstream: Jalur against NGINX's ``proxy_ssl``, in the same run.

A smaller companion of ``bench.py`` (same upstream files, accounting, placement and wrk
parsing, imported from it). The upstream is NGINX serving ``/api/feed/small`` over HTTPS
and requiring a client certificate (mutual TLS, certificates from ``proxy.demo.pki``:
ECDSA P-256, TLS 1.3). Both proxies verify the upstream (CA + name), present a client
certificate and resume TLS sessions; clients talk plain HTTP to the proxies.

Three upstream modes, each its own NGINX port:

``plain``
    no TLS at all, keep-alive: the baseline the TLS modes are read against.
``keepalive``
    the upstream keeps connections open: the steady state of a pooled sidecar, where TLS
    costs record encryption only (and a handshake per new pooled connection).
``reconnect``
    the upstream closes every connection after one answer (``keepalive_requests 1``), so
    every proxied request opens a new TLS connection: the cost of the handshake, and what
    session resumption saves. The upstream logs ``$ssl_session_reused`` per request; the
    share of resumed handshakes is reported for both proxies.

Contenders: ``jalur`` (``jalur run``, one process) and ``nginx`` (NGINX as a reverse proxy:
``proxy_ssl_verify on``, ``proxy_ssl_session_reuse on``, ``keepalive 256`` to the upstream in
``keepalive`` mode). Placement as in ``bench.py``: wrk and the upstream on CPU 0, the proxy on
CPU 1. Each cell ``--rounds`` times, contenders interleaved, medians reported. Prints a
Markdown table (and appends it to ``--out`` when given).

    python loadtests/bench_tls.py [--seconds 10] [--rounds 3] [--conns 50] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from bench import (
    NGINX_PROXY,
    SIZES,
    Contender,
    Processes,
    Sample,
    free_port,
    jalur_config,
    log,
    measure,
    start_jalur,
    start_nginx,
    wait_http,
)

from proxy.demo.pki import SERVER_NAME, DemoPki, make_pki

LOAD_CPU, PROXY_CPU = 0, 1
MODES = ("plain", "keepalive", "reconnect")

UPSTREAM = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    sendfile on;
    types {{ }}
    log_format reuse "$ssl_session_reused";
    ssl_certificate {pki.server_cert};
    ssl_certificate_key {pki.server_key};
    ssl_client_certificate {pki.ca_file};
    ssl_verify_client on;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    ssl_session_timeout 1h;
    ssl_session_tickets on;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
{servers}}}
"""

# bench.py's NGINX reverse proxy, with the upstream reached over (verified, mutual) TLS.
_SSL = """\
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {pki.ca_file};
            proxy_ssl_name {name};
            proxy_ssl_server_name on;
            proxy_ssl_certificate {pki.client_cert};
            proxy_ssl_certificate_key {pki.client_key};
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_session_reuse on;
"""
_PASS = "            proxy_pass http://feed;\n"
assert _PASS in NGINX_PROXY
PROXY = NGINX_PROXY.replace(_PASS, _PASS.replace("http:", "{scheme}:") + _SSL)


def upstream_server(port: int, www: Path, tls: bool, reconnect: bool, work: Path) -> str:
    """One server block of the upstream NGINX."""
    extra = (
        f"access_log {work}/reuse.log reuse; keepalive_requests 1;"
        if reconnect
        else "access_log off; keepalive_timeout 75s; keepalive_requests 1000000;"
    )
    return (
        f"    server {{ listen 127.0.0.1:{port}{' ssl' if tls else ''} backlog=4096; {extra}\n"
        f"        root {www}; location = /api/feed/small {{ default_type application/json; }} }}\n"
    )


def jalur_tls_config(
    port: int, upstream: int, work: Path, pki: DemoPki, mode: str
) -> dict[str, Any]:
    if mode == "plain":
        return jalur_config(port, f"http://127.0.0.1:{upstream}", work)
    conf = jalur_config(port, f"https://127.0.0.1:{upstream}", work)
    tls = {
        "ca_file": str(pki.ca_file),
        "server_name": SERVER_NAME,
        "cert_file": str(pki.client_cert),
        "key_file": str(pki.client_key),
    }
    for cluster in conf["clusters"].values():
        cluster["tls"] = tls
    return conf


def reuse_share(log_file: Path, since: int) -> tuple[float | None, int]:
    """Share of resumed handshakes among upstream requests logged after byte ``since``."""
    with log_file.open("rb") as f:
        f.seek(since)
        marks = f.read().split()
    if not marks:
        return None, 0
    return sum(m == b"r" for m in marks) / len(marks), len(marks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--out", type=Path, help="append the Markdown table to this file")
    args = p.parse_args(argv)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if shutil.which("wrk") is None or not os.path.exists(nginx):
        raise SystemExit("bench_tls: needs nginx and wrk (make install-bench-tools)")
    cpu = LOAD_CPU if (os.cpu_count() or 1) > 1 else None
    proxy_cpu = PROXY_CPU if cpu is not None else None
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="jalur-bench-tls-"))
    work.chmod(0o755)  # NGINX workers (user nobody when run as root) read the files
    try:
        pki = make_pki(work / "pki")
        www = work / "www"
        (www / "api" / "feed").mkdir(parents=True)
        for d in (www, www / "api", www / "api" / "feed"):
            d.chmod(0o755)
        (www / "api" / "feed" / "small").write_bytes(SIZES["small"][1])
        ports = {m: free_port() for m in MODES}
        up = start_nginx(
            procs,
            "upstream",
            UPSTREAM.format(
                dir=work / "up",
                pki=pki,
                servers="".join(
                    upstream_server(ports[m], www, m != "plain", m == "reconnect", work / "up")
                    for m in MODES
                ),
            ),
            work / "up",
            cpu,
            nginx,
        )
        contenders: dict[tuple[str, str], Contender] = {}
        for mode in MODES:
            nport, jport = free_port(), free_port()
            d = work / f"nginx-{mode}"
            scheme = "http" if mode == "plain" else "https"
            conf = PROXY.format(
                dir=d, upstream=ports[mode], port=nport, pki=pki, name=SERVER_NAME, scheme=scheme
            )
            n = start_nginx(procs, f"nginx-{mode}", conf, d, proxy_cpu, nginx)
            contenders[(mode, "nginx")] = Contender("nginx", nport, n.pid, "NGINX proxy_ssl")
            path = work / f"jalur-{mode}.yaml"
            path.write_text(yaml.safe_dump(jalur_tls_config(jport, ports[mode], work, pki, mode)))
            j = start_jalur(procs, f"jalur-{mode}", path, 1, proxy_cpu, work)
            contenders[(mode, "jalur")] = Contender("jalur", jport, j.pid, "jalur run")
        deadline = time.monotonic() + 30
        for c in contenders.values():
            assert c.pid is not None
            proc = next(pr for _, pr in procs.procs if pr.pid == c.pid)
            wait_http(c.url("small"), deadline, proc)
        reuse_log = work / "up" / "reuse.log"
        samples: dict[tuple[str, str], list[Sample]] = {k: [] for k in contenders}
        reuse: dict[tuple[str, str], list[float]] = {k: [] for k in contenders}
        for r in range(args.rounds):
            for key, c in contenders.items():
                log(f"round {r + 1}/{args.rounds}: {key[0]} {key[1]}")
                measure(c, "small", args.conns, 1.0, cpu, up.pid)  # warm-up
                since = reuse_log.stat().st_size if reuse_log.exists() else 0
                s = measure(c, "small", args.conns, args.seconds, cpu, up.pid)
                samples[key].append(s)
                if key[0] == "reconnect" and reuse_log.exists():
                    share, _ = reuse_share(reuse_log, since)
                    if share is not None:
                        reuse[key].append(share)
        print(table(samples, reuse, args))
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(table(samples, reuse, args) + "\n")
    finally:
        procs.stop_all()
        if not os.environ.get("BENCH_TLS_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _med(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def table(
    samples: dict[tuple[str, str], list[Sample]],
    reuse: dict[tuple[str, str], list[float]],
    args: argparse.Namespace,
) -> str:
    rows = [
        f"TLS to the upstream, small GET, c={args.conns}, {args.seconds:g} s x {args.rounds} "
        "rounds (medians)",
        "",
        "| upstream mode | proxy | req/s | p99 ms | proxy CPU µs/req | upstream CPU µs/req "
        "| resumed handshakes | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cpu: dict[tuple[str, str], float | None] = {}
    for (mode, name), ss in samples.items():
        cpu[(mode, name)] = _med([s.cpu_us for s in ss])
        share = _med(list(reuse[(mode, name)]))
        rows.append(
            f"| {mode} | {name} | {_med([s.rps for s in ss]) or 0:,.0f} "
            f"| {_med([s.p99_ms for s in ss]) or 0:.1f} | {cpu[(mode, name)] or 0:.0f} "
            f"| {_med([s.up_cpu_us for s in ss]) or 0:.0f} "
            f"| {'-' if share is None else f'{share:.0%}'} | {sum(s.errors for s in ss)} |"
        )
    rows.append("")
    for mode in MODES:
        j, n = cpu.get((mode, "jalur")), cpu.get((mode, "nginx"))
        if j and n:
            line = f"- {mode}: Jalur / NGINX CPU per request = {j / n:.1f}x"
            jp, np_ = cpu.get(("plain", "jalur")), cpu.get(("plain", "nginx"))
            if mode == "keepalive" and jp and np_:
                line += f"; TLS adds {j - jp:+.0f} µs (Jalur), {n - np_:+.0f} µs (NGINX)"
            rows.append(line)
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
