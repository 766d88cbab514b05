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
from typing import Final, TextIO

from aiohttp import web
from yarl import URL

from ..config import Config
from ..server import ProxyServer
from .backend import BackendSpec, start_backend

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


def print_banner(server: ProxyServer, config: Config, out: TextIO) -> None:
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
    print("\n".join(lines), file=out, flush=True)


async def run_demo(
    config: Config, *, out: TextIO = sys.stdout, backends_only: bool = False
) -> None:
    runners: list[web.AppRunner] = []
    try:
        for (host, port), spec in backend_specs(config).items():
            runner, _ = await start_backend(spec, host=host, port=port)
            runners.append(runner)
        server = None
        if backends_only:
            print(f"Jalur demo: {len(runners)} simulated back ends up", file=out, flush=True)
        else:
            server = ProxyServer(config)
            await server.start()
            print_banner(server, config, out)
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
