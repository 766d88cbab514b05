"""Clusters, their endpoints, and the transport that talks HTTP/1.1 to them.

The rest of the proxy sees the upstream through ``Transport.send``: one call with a
request head and a body stream, returning a response head and a body stream. The
implementation here is aiohttp's ``ClientSession`` (one per cluster, pooled keep-alive
connections); a faster one can replace it without touching routing or policy.

``map_exception`` is the single boundary where aiohttp and OS exceptions become the
``errors.UpstreamError`` tree.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import config as cfg
from . import errors

# Bytes read from an upstream socket before the reader pauses it: bounds the memory one
# response can hold in the proxy whatever its size.
READ_BUFSIZE: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str  # "http://127.0.0.1:9001", also the metric label
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        u = URL(url)
        assert u.host is not None
        assert u.port is not None
        return cls(url=url.rstrip("/"), scheme=u.scheme, host=u.host, port=u.port)


class UpstreamResponse(Protocol):
    """A response head plus its body stream. Call ``release`` after the body was read to
    the end (the connection goes back to the pool) or ``close`` to discard it."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    def header_items(self) -> list[tuple[str, str]]: ...
    async def read_chunk(self) -> bytes: ...  # b"" at the end of the body
    def release(self) -> None: ...
    def close(self) -> None: ...


class Transport(Protocol):
    async def send(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
    ) -> UpstreamResponse: ...

    async def close(self) -> None: ...


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
        connector = aiohttp.TCPConnector(
            limit=cluster.max_connections,
            limit_per_host=0,
            keepalive_timeout=30.0,
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

    async def websocket(
        self, endpoint: Endpoint, target: str, headers: CIMultiDict[str], protocols: list[str]
    ) -> aiohttp.ClientWebSocketResponse:
        url = URL(endpoint.url + target, encoded=True)
        try:
            async with asyncio.timeout(self._timeouts.response_headers):
                return await self._session.ws_connect(
                    url, headers=headers, protocols=protocols, autoping=True, max_msg_size=0
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise errors.UpstreamProtocolError(
                f"upstream refused the websocket upgrade: {exc.status}"
            ) from exc
        except Exception as exc:
            raise map_exception(exc) from exc

    async def close(self) -> None:
        await self._session.close()


def map_exception(exc: BaseException) -> errors.ProxyError:
    """The one place a foreign exception becomes a ``ProxyError``."""
    if isinstance(exc, errors.ProxyError):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return errors.ConnectTimeout(f"upstream connect timed out: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):
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


class ClusterRuntime:
    """A cluster as served: its system, endpoints, transport and balancer state."""

    __slots__ = ("_next", "endpoints", "kind", "name", "spec", "system", "transport")

    def __init__(
        self, name: str, spec: cfg.Cluster, system: cfg.System, transport: Transport
    ) -> None:
        self.name = name
        self.spec = spec
        self.system = spec.system
        self.kind = system.kind
        self.endpoints = tuple(Endpoint.parse(u) for u in spec.endpoints)
        self.transport = transport
        self._next = 0

    def pick(self) -> Endpoint:
        """Round robin over the endpoints."""
        i = self._next
        self._next = (i + 1) % len(self.endpoints)
        return self.endpoints[i]
