"""Write an audit trail with `jalur demo`, then verify it and report on it (docs/audit.md).

Starts `jalur demo` (the built-in demo config, its ports moved to free ones, run in
``--dir``) and plays a small migration story against it, ``--phase`` seconds per step:

1. the config's split (checkout: 13 % legacy social, 87 % commerce), shoppers checking out,
   paying, looking at orders and carts, a few crafted paths refused (blocked);
2. ``ops-alice`` ramps checkout to 5 % legacy (POST /migration/checkout, X-Jalur-Actor);
3. ``ops-bob`` rolls back to 30 % legacy (an incident on the commerce side, say);
4. ``ops-alice`` moves every shopper to commerce (0 % legacy).

Then stops the demo with SIGTERM (by its PID: the trail is sealed) and runs
``jalur audit verify`` and ``jalur report`` (Markdown with its SVG chart, and JSON) on the
trail, into ``--dir``. Loopback only; about 4 x ``--phase`` seconds.

    .venv/bin/python scripts/demo_trail.py [--dir demo-trail] [--phase 30] [--rate 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import yaml
from yarl import URL

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "proxy" / "demo" / "demo.yaml"
TOKEN = "jalur-demo-token"
STORY = (
    (None, None),
    ({"shop-legacy": 5, "tokopedia-pay": 95}, "ops-alice"),
    ({"shop-legacy": 30, "tokopedia-pay": 70}, "ops-bob"),
    ({"shop-legacy": 0, "tokopedia-pay": 100}, "ops-alice"),
)
# Promotion paths a back end could read as payment ones (fullwidth dots under NFKC): 400.
CRAFTED = (
    "/api/live/%EF%BC%8E%EF%BC%8E/payment",
    "/api/feed/%EF%BC%8E%EF%BC%8E/checkout",
    "/api/live/%EF%BC%8E%EF%BC%8E/checkout",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def demo_config(directory: Path) -> Path:
    """The demo config with free loopback ports."""
    conf = yaml.safe_load(DEMO.read_text())
    conf["listen"]["port"] = free_port()
    conf["admin"]["port"] = free_port()
    ports: dict[str, int] = {}
    for cluster in conf["clusters"].values():
        cluster["endpoints"] = [
            f"http://127.0.0.1:{ports.setdefault(url, free_port())}" for url in cluster["endpoints"]
        ]
    path = directory / "demo.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


async def shop(base: str, admin: str, phase: float, rate: float) -> None:
    async with aiohttp.ClientSession() as s:
        shopper = 0
        for weights, actor in STORY:
            if weights is not None:
                headers = {"Authorization": f"Bearer {TOKEN}", "X-Jalur-Actor": str(actor)}
                url = f"{admin}/migration/checkout"
                async with s.post(url, json={"weights": weights}, headers=headers) as r:
                    assert r.status == 200, await r.text()
            deadline = time.monotonic() + phase
            while time.monotonic() < deadline:  # bounded: one phase
                shopper += 1
                user = {"x-user-id": f"shopper-{shopper % 500}"}
                kind = shopper % 10
                if kind < 5:
                    req = s.post(f"{base}/api/checkout", headers=user, data=b"{}")
                elif kind < 7:
                    req = s.post(f"{base}/api/payment/charge", headers=user, data=b"{}")
                elif kind < 9:
                    req = s.get(f"{base}/api/orders/{shopper}", headers=user)
                elif shopper % 50 == 9:
                    req = s.get(URL(base + CRAFTED[shopper % 3], encoded=True))
                else:
                    req = s.post(f"{base}/api/cart", headers=user, data=b"{}")
                async with req as r:
                    await r.read()
                await asyncio.sleep(1 / rate)  # pacing the load, not synchronisation


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dir", default="demo-trail", help="where the trail and reports go")
    p.add_argument("--phase", type=float, default=30.0, help="seconds per step of the story")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second")
    args = p.parse_args()
    directory = Path(args.dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("jalur-audit.log*"):
        old.unlink()
    config = demo_config(directory)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("JALUR_AUDIT__KEY", "jalur-demo-audit-key")
    jalur = [sys.executable, "-m", "proxy"]
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    proc = subprocess.Popen(
        [*jalur, "demo", "-c", str(config)],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        m = re.search(r"proxy on (http://\S+), admin on (http://\S+)", first)
        if m is None:
            print(f"jalur demo did not start: {first!r}", file=sys.stderr)
            return 1
        asyncio.run(shop(m.group(1), m.group(2), args.phase, args.rate))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
    trail = sorted(str(f) for f in directory.glob("jalur-audit.log*"))
    verify = subprocess.run(
        [*jalur, "audit", "verify", *trail], env=env, capture_output=True, text=True
    )
    (directory / "verify.txt").write_text(verify.stdout + verify.stderr)
    print(verify.stdout, end="")
    window = ["--since", since, "--until", until]
    for fmt, name in (("markdown", "report.md"), ("json", "report.json"), ("html", "report.html")):
        done = subprocess.run(
            [*jalur, "report", "--audit", *trail, *window, "--format", fmt, "--out", name],
            cwd=directory,
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
    print(f"reports in {directory}: report.md (+ report.svg), report.json, report.html")
    return verify.returncode


if __name__ == "__main__":
    sys.exit(main())
