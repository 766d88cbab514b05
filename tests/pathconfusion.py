"""A proxy with a social catch-all and commerce transaction routes, run in a thread, for
path-confusion tests that send raw request targets from synchronous code (hypothesis)."""

from __future__ import annotations

import asyncio
import posixpath
import re
import socket
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from proxy.demo.backend import RECEIVED

from .conftest import Harness

TRANSACTION_PREFIXES = ("/api/payment", "/api/checkout", "/api/cart", "/api/orders")

CONFIG: dict[str, Any] = {
    "clusters": {},  # filled with the back ends' ports
    "routes": [
        *(
            {
                "name": prefix.rsplit("/", 1)[1],
                "match": {"prefix": prefix, "case_sensitive": False},
                "category": "payment",
                "to": "pay",
            }
            for prefix in TRANSACTION_PREFIXES
        ),
        {"name": "feed", "match": {"prefix": "/api/feed"}, "category": "promotion", "to": "social"},
        {"name": "catch-all", "match": {"prefix": "/"}, "category": "promotion", "to": "social"},
    ],
}


@dataclass
class Running:
    port: int
    harness: Harness
    loop: asyncio.AbstractEventLoop

    def social_paths(self) -> list[str]:
        return [r.path for r in self.harness.backends["social"].app[RECEIVED]]

    def commerce_paths(self) -> list[str]:
        return [r.path for r in self.harness.backends["pay"].app[RECEIVED]]

    def clear(self) -> None:
        self.harness.backends["social"].app[RECEIVED].clear()
        self.harness.backends["pay"].app[RECEIVED].clear()


def send(port: int, target: bytes) -> int:
    """One raw request; the status code, or 0 when the proxy closed without an answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(m.group(1)) if m else 0


def backend_readings(path: str) -> set[str]:
    """How a lenient back end might read a forwarded path -- written independently of
    proxy.compliance on purpose: lower-case, decoded up to three times, NFKC, `;params`
    dropped, trailing dots/spaces trimmed from segments, backslashes as slashes, dots
    resolved."""
    out: set[str] = set()
    current = path
    for _ in range(4):
        for variant in {current, unicodedata.normalize("NFKC", current)}:
            v = variant.lower().replace("\\", "/")
            v = "/".join(seg.split(";", 1)[0].rstrip(". ") for seg in v.split("/"))
            v = v.split("?", 1)[0].split("#", 1)[0].split("\x00", 1)[0]
            # (normpath keeps a leading "//" as POSIX allows: strip slashes first)
            out.add(posixpath.normpath("/" + v.lstrip("/")))
        nxt = unquote(current, errors="replace")
        if nxt == current:
            break
        current = nxt
    return out


def is_transaction(path: str) -> bool:
    return any(
        r == p or r.startswith(p) for r in backend_readings(path) for p in TRANSACTION_PREFIXES
    )


def run_in_thread(tmp: Path) -> Iterator[Running]:
    loop = asyncio.new_event_loop()
    started: list[Running] = []
    ready = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        h = Harness(tmp)
        try:
            social = await h.backend("social", "tiktok")
            pay = await h.backend("pay", "tokopedia")
            conf: dict[str, Any] = dict(CONFIG)
            conf["clusters"] = {
                "social": {"system": "tiktok", "endpoints": [social.url]},
                "pay": {"system": "tokopedia", "endpoints": [pay.url]},
            }
            conf["access_log"] = {"enabled": False}
            p = await h.proxy(conf)
            started.append(Running(p.data_port, h, loop))
            ready.set()
            await stop.wait()
        finally:
            await h.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    if not ready.wait(20):
        raise RuntimeError("proxy did not start")
    try:
        yield started[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(20)
        loop.close()
