"""``jalur demo``: the simulated back ends of every cluster plus the proxy, on loopback.

Each distinct endpoint in the config gets one simulated back end that answers as the
cluster(s) it serves; endpoints must be loopback addresses (the demo never reaches out).
Stops everything on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Final, TextIO

import msgspec
import yaml
from aiohttp import web
from yarl import URL

from ..config import Config, parse
from ..server import ProxyServer
from .backend import BackendSpec, start_backend
from .pki import DemoPki, make_pki, over_tls

# The demo's audit key (used when JALUR_AUDIT__KEY is not set), so that `make demo` leaves a
# trail that `jalur audit verify` accepts. A demo secret printed in the banner: never reuse it.
DEMO_AUDIT_KEY: Final = "jalur-demo-audit-key"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def backend_specs(config: Config) -> dict[tuple[str, int], BackendSpec]:
    """One simulated back end per distinct endpoint, named after its first cluster."""
    specs: dict[tuple[str, int], BackendSpec] = {}
    for name, cluster in config.clusters.items():
        for endpoint in cluster.endpoints:
            url = URL(endpoint)
            assert url.host is not None
            assert url.port is not None
            if not _loopback(url.host):
                raise SystemExit(f"demo: endpoint {endpoint} of {name} is not a loopback address")
            specs.setdefault((url.host, url.port), BackendSpec(cluster=name, system=cluster.system))
    return specs


# Highest port a TCP listener can have.
MAX_PORT: Final = 65535


def moved_ports(config: Config, base: int) -> Config:
    """``config`` with the data listener on ``base`` and the admin listener and every
    endpoint moved by the same amount (``jalur demo --port-base``), validated again. Raises
    ValueError when a moved port would leave 1..65535."""
    offset = base - config.listen.port
    data = msgspec.to_builtins(config)

    def moved(port: int, what: str) -> int:
        new = port + offset
        if not 1 <= new <= MAX_PORT:
            raise ValueError(f"{what} would move from {port} to {new}, outside 1..{MAX_PORT}")
        return new

    data["listen"]["port"] = moved(config.listen.port, "the proxy port")
    data["admin"]["port"] = moved(config.admin.port, "the admin port")
    for name, cluster in data["clusters"].items():
        cluster["endpoints"] = [
            str(URL(e).with_port(moved(URL(e).port or 80, f"{name}'s endpoint {e}")))
            for e in cluster["endpoints"]
        ]
    return reparse(data, f"demo --port-base {base}")


def reparse(data: dict[str, Any], source: str) -> Config:
    """A changed demo config through the loader again, so it is validated like any file
    (the audit key, which comes only from the environment, passed as such)."""
    key = (data.get("audit") or {}).pop("key", None)
    env = {"JALUR_AUDIT__KEY": key} if key else None
    return parse(yaml.safe_dump(data), source, env=env)


def tls_endpoints(config: Config) -> set[tuple[str, int]]:
    """The (host, port) of every ``https://`` endpoint."""
    out = set()
    for cluster in config.clusters.values():
        for endpoint in cluster.endpoints:
            url = URL(endpoint)
            if url.scheme == "https" and url.host is not None and url.port is not None:
                out.add((url.host, url.port))
    return out


def print_banner(
    server: ProxyServer, config: Config, out: TextIO, pki: DemoPki | None = None
) -> None:
    base = f"http://{config.listen.host}:{server.data_port}"
    admin = f"http://{config.admin.host}:{server.admin_port}"
    lines = [
        f"Jalur demo: proxy on {base}, admin on {admin}",
        "Try (look at the x-backend-system header):",
        f"  curl -i {base}/api/feed",
        f"  curl -i -X POST {base}/api/payment/charge -d '{{}}'",
        f"  curl -i {base}/api/orders/42",
        f"  curl -i {base}/api/nothing-here            # 404 JSON",
        f"  curl -i '{base}/api/feed/%2e%2e/payment'    # canonical path -> payment route",
        f"  curl -i '{base}/api/feed%2Fx'               # 400: encoded slash",
        f"  curl -s {admin}/readyz",
        "Migration in progress on /api/checkout (13 % legacy social, 87 % commerce):",
        f'  for u in $(seq 1 200); do curl -s -o /dev/null -X POST -H "x-user-id: u$u" '
        f"{base}/api/checkout; done",
        f"  curl -s {admin}/migration",
        f"  curl -s -X POST -H 'Authorization: Bearer {config.admin.token or 'TOKEN'}' "
        f'-d \'{{"weights": {{"shop-legacy": 0, "tokopedia-pay": 100}}}}\' '
        f"{admin}/migration/checkout",
        "Ctrl-C stops everything.",
    ]
    trail = config.compliance.audit.path
    if trail != "-":
        key = config.audit.key
        prefix = f"JALUR_AUDIT__KEY={key} " if key == DEMO_AUDIT_KEY else ""
        lines[-1:-1] = [
            f"Audit trail in {trail} (sealed when the demo stops); then:",
            f"  {prefix}jalur audit verify {trail}*",
            f"  {prefix}jalur report --audit {trail}* --since 2020-01-01 --until 2100-01-01",
        ]
    if pki is not None:
        port = min(p for _, p in tls_endpoints(config))
        lines[-1:-1] = [
            f"Commerce clusters over mutual TLS (throw-away CA in {pki.ca_file.parent}):",
            f"  openssl s_client -connect 127.0.0.1:{port} -CAfile {pki.ca_file} "
            f"-cert {pki.client_cert} -key {pki.client_key} -brief </dev/null",
            f"  curl -s {admin}/metrics | grep jalur_tls_",
        ]
    print("\n".join(lines), file=out, flush=True)


async def run_demo(
    config: Config,
    *,
    out: TextIO = sys.stdout,
    tls_dir: Path | None = None,
    tls: bool = False,
    backends_only: bool = False,
) -> None:
    """Serve the demo; with ``tls`` the commerce clusters run over mutual TLS with a CA made
    now (files in ``tls_dir``, default a new temporary directory); with ``backends_only``
    only the simulated back ends (the proxy is run separately, e.g. with --workers)."""
    runners: list[web.AppRunner] = []
    pki = None
    if tls:
        pki = make_pki(tls_dir or Path(tempfile.mkdtemp(prefix="jalur-demo-tls-")))
        # Through the loader again: the new sections and files are validated like any config.
        config = reparse(msgspec.to_builtins(over_tls(config, pki)), "demo --tls")
    secure = tls_endpoints(config)
    try:
        for (host, port), spec in backend_specs(config).items():
            ctx = pki.server_context() if pki is not None and (host, port) in secure else None
            runner, _ = await start_backend(spec, host=host, port=port, ssl_context=ctx)
            runners.append(runner)
        server = None
        if backends_only:
            print(f"Jalur demo: {len(runners)} simulated back ends up", file=out, flush=True)
        else:
            server = ProxyServer(config)
            await server.start()
            print_banner(server, config, out, pki)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        if server is not None:
            await server.stop(drain_delay=0)
    finally:
        for runner in runners:
            await runner.cleanup()
