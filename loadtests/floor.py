"""Two feature-less Python proxies: the floor under Jalur's CPU per request.

``bench.py`` runs them as contenders beside ``jalur-1`` and NGINX (``--no-floor`` leaves them
out), so one run says how Jalur's CPU per request divides up (issue #6 asks what stands
between Jalur and its target). Both read the whole upstream body and answer in one write,
where Jalur streams; a streaming variant of ``floor-aiohttp`` measured the same within this
box's noise (47-57 against 54-62 µs per small request, 3 alternating runs), so the difference
to ``jalur-1`` is Jalur's features, not its relay mode:

* ``floor-bare``: an ``asyncio.Protocol`` listener with llhttp (``httptools``), the request
  sent upstream through Jalur's own pooled ``H1Transport``, the answer written with one
  ``transport.write``. No routing, policies, metrics or logs; no limits, no streaming of
  request bodies (GET only), no pipelining. What uvloop + llhttp + H1Transport cost alone.
* ``floor-aiohttp``: the same forwarding behind aiohttp's low-level ``web.Server`` (Jalur's
  data listener) and a ``web.Response``. The difference to ``floor-bare`` is what aiohttp's
  listener costs per request; the difference to ``jalur-1`` is what Jalur's features cost.

Not a product: nothing here is used by Jalur, and neither server is safe to expose.

    floor.py bare|aiohttp PORT UPSTREAM_URL
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httptools
import uvloop
from aiohttp import web
from multidict import CIMultiDict

from proxy import accept
from proxy import config as cfg
from proxy.h1transport import H1Transport
from proxy.upstream import Endpoint

# Response header names a feature-less proxy still relays (hop-by-hop ones are dropped).
_HOP: frozenset[str] = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
)


def _transport(upstream: str) -> tuple[H1Transport, Endpoint]:
    cluster = cfg.Cluster(system="floor", endpoints=[upstream])
    return H1Transport(cluster, cfg.Listen()), Endpoint.parse(upstream)


async def _fetch(
    h1: H1Transport, endpoint: Endpoint, target: str, headers: CIMultiDict[str]
) -> tuple[int, list[tuple[str, str]], bytes]:
    up = await h1.send(endpoint, "GET", target, headers, None)
    parts = []
    while chunk := await up.read_chunk():
        parts.append(chunk)
    up.release()
    items = [(k, v) for k, v in up.header_items() if k.lower() not in _HOP]
    return up.status, items, b"".join(parts)


class _Bare(asyncio.Protocol):
    def __init__(self, h1: H1Transport, endpoint: Endpoint) -> None:
        self.h1 = h1
        self.endpoint = endpoint
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: CIMultiDict[str] = CIMultiDict()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_message_complete(self) -> None:
        headers, self.headers = self.headers, CIMultiDict()
        headers.popall("Connection", None)
        asyncio.get_running_loop().create_task(self._answer(self.url.decode(), headers))

    async def _answer(self, target: str, headers: CIMultiDict[str]) -> None:
        status, items, body = await _fetch(self.h1, self.endpoint, target, headers)
        head = [f"HTTP/1.1 {status} OK\r\n".encode()]
        for k, v in items:
            if k.lower() != "content-length":
                head.append(f"{k}: {v}\r\n".encode("latin-1"))
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        assert self.transport is not None
        self.transport.write(b"".join(head) + body)


async def _serve_bare(port: int, upstream: str) -> None:
    h1, endpoint = _transport(upstream)
    sock = accept.bind("127.0.0.1", port, 511)  # Jalur's accept loop, as jalur-1 has
    await accept.Acceptor(sock, lambda: _Bare(h1, endpoint)).serve_forever()


async def _serve_aiohttp(port: int, upstream: str) -> None:
    h1, endpoint = _transport(upstream)

    async def handler(request: web.BaseRequest) -> web.Response:
        headers = CIMultiDict(request.headers)
        headers.popall("Connection", None)
        status, items, body = await _fetch(h1, endpoint, request.raw_path, headers)
        out = CIMultiDict((k, v) for k, v in items if k.lower() != "content-length")
        return web.Response(status=status, body=body, headers=out)

    runner = web.ServerRunner(web.Server(handler, access_log=None))
    await runner.setup()
    await accept.AcceptSite(runner, accept.bind("127.0.0.1", port, 511)).start()
    await asyncio.Event().wait()


def main(argv: list[str]) -> Any:
    kind, port, upstream = argv[0], int(argv[1]), argv[2]
    serve = {"bare": _serve_bare, "aiohttp": _serve_aiohttp}[kind]
    return uvloop.run(serve(port, upstream))


if __name__ == "__main__":
    main(sys.argv[1:])
