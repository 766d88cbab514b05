"""Responses Jalur writes itself: no ``Server: Python/3.x aiohttp/3.y``, and the last answer
on a connection says ``Connection: close``.

aiohttp adds its ``Server`` header to every response that has none (a version banner for
whoever probes the listener). Every response class Jalur answers with (its errors, the admin
listener's JSON, relayed answers, WebSocket upgrades) takes the ``ServerHeader`` mixin: a
``Server`` header the response already has (a back end's, relayed) is kept; otherwise the
value of ``listen.server_header`` is sent when the connection is the data listener's and it is
configured, and no ``Server`` header at all otherwise. The decision is one identity test per
response (aiohttp's default is one constant object). When the listener's protocol says the
connection is ``closing`` (its request limit is reached, or a drain started), the answer is
its last: ``Connection: close`` is written, and aiohttp closes the connection after it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import hdrs, web
from aiohttp.http import SERVER_SOFTWARE

__all__ = ["Response", "ServerHeader", "StreamResponse", "WebSocketResponse"]


class ServerHeader:
    """Mixin for aiohttp response classes: aiohttp's default ``Server`` is replaced by the
    listener's configured one (``server_header`` on the request's protocol) or dropped."""

    __slots__ = ()

    async def _prepare_headers(self) -> None:
        protocol: Any = getattr(self._req, "protocol", None)  # type: ignore[attr-defined]
        if getattr(protocol, "closing", False):
            # The connection's last answer (request limit, drain): say so.
            self.force_close()  # type: ignore[attr-defined]
        await super()._prepare_headers()  # type: ignore[misc]
        headers = self._headers  # type: ignore[attr-defined]
        if headers.get(hdrs.SERVER) is SERVER_SOFTWARE:
            value = getattr(protocol, "server_header", None)
            if value:
                headers[hdrs.SERVER] = value
            else:
                del headers[hdrs.SERVER]


class Response(ServerHeader, web.Response):
    pass


class StreamResponse(ServerHeader, web.StreamResponse):
    pass


class WebSocketResponse(ServerHeader, web.WebSocketResponse):
    pass
