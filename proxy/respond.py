"""Responses of the admin listener (aiohttp): no ``Server: Python/3.x aiohttp/3.y``.

aiohttp adds its ``Server`` header to every response that has none (a version banner for
whoever probes the listener). The admin listener's responses take the ``ServerHeader``
mixin, which drops it (aiohttp's default is one constant object: one identity test per
response). The data listener is Jalur's own (``listener``) and never sends a banner.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.http import SERVER_SOFTWARE

__all__ = ["Response", "ServerHeader"]


class ServerHeader:
    """Mixin for aiohttp response classes: aiohttp's default ``Server`` is dropped."""

    __slots__ = ()

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()  # type: ignore[misc]
        headers = self._headers  # type: ignore[attr-defined]
        if headers.get(hdrs.SERVER) is SERVER_SOFTWARE:
            del headers[hdrs.SERVER]


class Response(ServerHeader, web.Response):
    pass
