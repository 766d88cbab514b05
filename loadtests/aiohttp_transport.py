"""The aiohttp ``ClientSession`` transport Jalur used before ``H1Transport`` (kept only for
``microbench_transport.py``'s comparison; nothing in ``proxy/`` uses it).

It relies on one aiohttp private name (``ClientSession._retry_connection``), which is why it
lives here and not in the proxy's data path.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import config as cfg
from proxy import errors, tls
from proxy.upstream import Endpoint, UpstreamResponse

# Bytes read from an upstream socket before the reader pauses it: bounds the memory one
# response can hold in the proxy whatever its size.
READ_BUFSIZE: Final = 64 * 1024


def map_exception(exc: BaseException) -> errors.ProxyError:
    """The one place a foreign exception becomes a ``ProxyError``."""
    if isinstance(exc, errors.ProxyError):
        return exc
    cause = exc
    if isinstance(exc, aiohttp.ClientSSLError):  # ClientConnectorCertificateError too
        cause = getattr(exc, "certificate_error", None) or exc.os_error or exc
    tls_error = tls.map_error(cause)
    if tls_error is not None:
        return tls_error
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return errors.ConnectTimeout(f"upstream connect timed out: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return errors.ConnectRefused(f"upstream connect refused: {exc.os_error}")
        return errors.ConnectFailed(f"upstream connect failed: {exc.os_error or exc}")
    if isinstance(exc, aiohttp.SocketTimeoutError | asyncio.TimeoutError):
        return errors.ResponseTimeout("upstream did not answer in time")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return errors.UpstreamReset(f"upstream closed the connection: {exc}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return errors.UpstreamReset(f"upstream body ended early: {exc}")
    if isinstance(exc, aiohttp.ClientResponseError):
        return errors.UpstreamProtocolError(f"invalid upstream response: {exc.message}")
    if isinstance(exc, ConnectionError | OSError):
        return errors.UpstreamReset(f"upstream connection error: {exc}")
    return errors.UpstreamError(f"upstream error: {type(exc).__name__}: {exc}")


class _AiohttpResponse:
    __slots__ = ("_resp",)

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp

    @property
    def status(self) -> int:
        return self._resp.status

    @property
    def reason(self) -> str:
        return self._resp.reason or ""

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._resp.headers

    def header_items(self) -> list[tuple[str, str]]:
        return list(self._resp.headers.items())

    def body_ready(self) -> bool:
        return False  # unknown: the head is written at once

    async def read_chunk(self) -> bytes:
        try:
            return await self._resp.content.readany()
        except Exception as exc:
            raise map_exception(exc) from exc

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()


class AiohttpTransport:
    """One pooled ``ClientSession`` per cluster, for the cluster's lifetime."""

    def __init__(self, cluster: cfg.Cluster, limits: cfg.Listen) -> None:
        self._timeouts = cluster.timeouts
        # https:// endpoints: the cluster's own trust decision (tls.for_cluster), never
        # aiohttp's default context; SNI and the verified name as in H1Transport.
        self._tls = tls.for_cluster("websocket", cluster, warn=False)
        self._server_name = cluster.tls.server_name if cluster.tls is not None else None
        connector = aiohttp.TCPConnector(
            limit=cluster.max_connections,
            limit_per_host=0,
            keepalive_timeout=cluster.keepalive_idle_timeout,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=None,
                sock_connect=cluster.timeouts.connect,
                sock_read=cluster.timeouts.idle,
            ),
            # Send only the headers the client sent; no invented User-Agent or Accept.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            read_bufsize=READ_BUFSIZE,
            max_line_size=limits.max_line_size,
            max_field_size=limits.max_field_size,
            raise_for_status=False,
        )
        # aiohttp silently re-sends GET/PUT/DELETE once when a pooled keep-alive connection
        # turns out to be dead. A proxy must decide retries itself (it knows whether bytes
        # reached the upstream), so the re-send is switched off.
        self._session._retry_connection = False

    async def send(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
    ) -> UpstreamResponse:
        url = URL(endpoint.url + target, encoded=True)
        try:
            async with asyncio.timeout(self._timeouts.response_headers):
                resp = await self._session.request(
                    method,
                    url,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    compress=None,
                    chunked=None,
                )
        except Exception as exc:
            raise map_exception(exc) from exc
        return _AiohttpResponse(resp)

    async def close(self) -> None:
        await self._session.close()
