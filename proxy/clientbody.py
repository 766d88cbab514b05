"""The client's request body, read at most once from the wire and sent as often as allowed.

Invariant: nothing reads a whole body into memory unless a policy asked for at most a
bounded number of bytes (the idempotency fingerprint, request buffering, a retry's copy);
every byte is counted against the route's limit and every wait is bounded by the body's
idle timeout and the listener's whole-body deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from aiohttp import web

from . import errors

HTTP11: Final = aiohttp.HttpVersion11
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClientBody:
    """The client's request body as an async iterator; remembers whether the *client*
    failed (disconnect mid-upload) so that is not blamed on the upstream.

    It enforces the route's body limits: more than ``limit`` bytes raises ``BodyTooLarge``
    and no byte for ``idle`` seconds raises ``BodyTimeout``; either is kept in ``refused``
    so that whoever was reading (the upstream transport, a policy) answers 413/408 instead
    of blaming the upstream. ``100 Continue`` goes out on the first read only, so every
    answer given without reading the body (a refusal, a 404, a 413 by Content-Length) is
    given without inviting the body first.

    It can be iterated again (a retry) when it is ``replayable``: the whole body is in
    ``preread``, or nothing of it was read for an upstream yet."""

    __slots__ = (
        "bytes",
        "client_failed",
        "continue_",
        "copy",
        "deadline",
        "idle",
        "limit",
        "prefix",
        "preread",
        "refused",
        "request",
        "started",
    )

    def __init__(
        self, request: web.BaseRequest, limit: int, idle: float, copy: bytearray | None = None
    ) -> None:
        self.request = request
        self.limit = limit
        self.idle = idle
        self.bytes = 0
        self.client_failed = False
        self.refused: errors.RequestError | None = None
        # The client waits for ``100 Continue`` before sending the body (HTTP/1.1 only).
        self.continue_ = request.version >= HTTP11 and (
            request.headers.get("Expect", "").lower() == "100-continue"
        )
        self.copy = copy  # a shadow's copy of the body (bounded by the shadow plan)
        self.preread: bytes | None = None  # the whole body, when a policy had to read it
        self.prefix: bytes | None = None  # read by ``buffer``, still to be sent first
        self.started = False  # an upstream attempt has begun reading the body
        # The whole body must have arrived by then (``listen.body_timeout``, read from the
        # listener's protocol; None off a listener): a client dripping a byte just inside
        # ``idle`` cannot hold the request (and what it holds) open for ever.
        total: float | None = getattr(request.protocol, "body_timeout", None)
        self.deadline = None if total is None else asyncio.get_running_loop().time() + total

    def client_done(self) -> bool:
        """The client has sent its whole body (what is left is buffered here)."""
        return self.request.content.is_eof()

    @property
    def replayable(self) -> bool:
        return self.preread is not None or not self.started

    async def buffer(self, limit: int) -> bool:
        """Read the body into ``preread`` if it is at most ``limit`` bytes, so a retry can
        send it again. A larger body keeps what was read as ``prefix`` and streams on."""
        if self.preread is not None:
            return True
        length = self.request.content_length
        if length is not None and length > limit:
            return False
        parts: list[bytes] = [self.prefix] if self.prefix else []  # from an earlier call
        size = len(self.prefix or b"")
        if size > limit:
            return False
        async for chunk in self._stream():
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                self.prefix = b"".join(parts)
                return False
        self.preread = b"".join(parts)
        self.prefix = None
        return True

    async def read_all(self, limit: int) -> bytes | None:
        """Read the whole body if it is at most ``limit`` bytes (None: larger)."""
        length = self.request.content_length
        if length is not None and length > limit:
            return None
        data = bytearray()
        async for chunk in self._stream():
            data += chunk
            if len(data) > limit:
                return None
        self.preread = bytes(data)
        return self.preread

    async def __aiter__(self) -> AsyncIterator[bytes]:
        again = self.started
        self.started = True
        if self.preread is not None:
            if self.copy is not None and not again:
                self.copy += self.preread
            if self.preread:
                yield self.preread
            return
        prefix, self.prefix = self.prefix, None
        if prefix:
            if self.copy is not None:
                self.copy += prefix
            yield prefix
        async for chunk in self._stream():
            if self.copy is not None:
                self.copy += chunk
            yield chunk

    async def _stream(self) -> AsyncIterator[bytes]:
        request = self.request
        content = request.content
        if self.continue_:
            self.continue_ = False
            await request.writer.write(CONTINUE)
        deadline = self.deadline
        while True:
            wait = self.idle
            try:
                if content.total_bytes > self.bytes or content.is_eof():
                    chunk = await content.readany()  # buffered: no timer needed
                else:
                    if deadline is not None:
                        wait = min(wait, max(0.0, deadline - asyncio.get_running_loop().time()))
                    async with asyncio.timeout(wait):
                        chunk = await content.readany()
            except TimeoutError:
                if wait == self.idle:
                    why = f"no request body bytes for {self.idle:g}s; request cut"
                    self.refused = errors.BodyTimeout(why)
                else:
                    why = "request body not complete within listen.body_timeout; request cut"
                    self.refused = errors.BodyDeadline(why)
                raise self.refused from None
            except Exception:
                self.client_failed = True
                raise
            if not chunk:
                return
            self.bytes += len(chunk)
            if self.bytes > self.limit:
                self.refused = errors.BodyTooLarge(
                    f"request body over this route's limit of {self.limit} bytes"
                )
                raise self.refused
            yield chunk
