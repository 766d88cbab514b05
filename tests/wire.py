"""Byte-level helpers for the framing, hostile-upstream and limit tests.

``WireUpstream`` is a raw TCP upstream that records every byte it receives (all
connections), counts accepted connections and parses what arrived with httptools (strict
llhttp) so a test can say exactly which requests an upstream would have executed. Each
complete request is answered with ``answer(upstream, index)``: bytes to write, or ``None``
to stay silent; ``close_after`` closes the connection after writing.

``converse`` is the client side: write raw bytes to the proxy, then collect every
response (parsed with httptools as well) until the proxy closes the connection, the
expected number of responses arrived, or a deadline passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

from .conftest import RawResponse

OK: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Message:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Answer:
    data: bytes | None  # None: write nothing
    close_after: bool = False


def ok(_up: WireUpstream, _index: int) -> Answer:
    return Answer(OK)


class _RequestSink:
    """httptools callbacks collecting one connection's requests."""

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = None
        self.done: list[Message] = []
        self._current: Message | None = None
        self._url = b""
        self._name = b""
        self._body = bytearray()

    def on_message_begin(self) -> None:
        self._current = Message("", "", [])
        self._url = b""
        self._body = bytearray()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._current is not None
        self._current.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        assert self._current is not None
        assert self.parser is not None
        self._current.method = self.parser.get_method().decode("latin-1")
        self._current.target = self._url.decode("latin-1")
        self._current.body = bytes(self._body)
        self.done.append(self._current)
        self._current = None


@dataclass
class WireUpstream:
    answer: Callable[[WireUpstream, int], Answer] = ok
    server: asyncio.Server | None = None
    port: int = 0
    connections: int = 0  # accepted TCP connections
    received: bytearray = field(default_factory=bytearray)  # every byte, every connection
    messages: list[Message] = field(default_factory=list)  # complete requests parsed
    malformed: int = 0  # connections whose bytes llhttp refused
    closed: int = 0  # connections that ended (either side)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> WireUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def targets(self) -> list[str]:
        return [m.target for m in self.messages]

    async def until(self, predicate: Callable[[WireUpstream], bool], within: float = 5.0) -> None:
        """Wait (event driven, with a deadline) until ``predicate`` holds."""
        async with asyncio.timeout(within):
            while not predicate(self):
                self.changed.clear()
                await self.changed.wait()

    def _touch(self) -> None:
        self.changed.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._touch()
        sink = _RequestSink()
        parser = httptools.HttpRequestParser(sink)
        sink.parser = parser
        broken = False
        try:
            while data := await reader.read(65536):
                self.received += data
                self._touch()
                if broken:
                    continue
                before = len(sink.done)
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    pass
                except httptools.HttpParserError:
                    broken = True
                    self.malformed += 1
                for msg in sink.done[before:]:
                    self.messages.append(msg)
                    self._touch()
                    reply = self.answer(self, len(self.messages) - 1)
                    if reply.data is not None:
                        writer.write(reply.data)
                        await writer.drain()
                    if reply.close_after:
                        return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed += 1
            self._touch()


async def wire_upstream(answer: Callable[[WireUpstream, int], Answer] = ok) -> WireUpstream:
    return await WireUpstream(answer).start()


Response = RawResponse  # one parsed response shape for raw-socket tests


class _ResponseSink:
    def __init__(self) -> None:
        self.done: list[Response] = []
        self.parser: httptools.HttpResponseParser | None = None
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()

    def on_message_begin(self) -> None:
        self._headers = []
        self._body = bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if status >= 200:  # interim 1xx answers are not responses
            self.done.append(Response(status, self._headers, bytes(self._body)))


@dataclass
class Conversation:
    responses: list[Response]
    raw: bytes  # every byte the proxy sent
    closed: bool  # the proxy closed (or reset) the connection
    reset: bool  # ... with a reset

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]


async def converse(
    port: int,
    data: bytes | list[bytes],
    *,
    responses: int = 1,
    wait: float = 5.0,
    linger: float = 0.0,
    followup: bytes | None = None,
) -> Conversation:
    """Write ``data`` (a list: written one part at a time, each drained) and read until the
    proxy closes, or ``responses`` responses arrived and then ``linger`` seconds passed
    without the connection closing, or ``wait`` seconds in all. ``followup`` is written
    on the same connection once the first response has arrived (count its answer in
    ``responses``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sink = _ResponseSink()
    parser = httptools.HttpResponseParser(sink)
    sink.parser = parser
    raw = bytearray()
    closed = reset = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    try:
        for part in [data] if isinstance(data, bytes) else data:
            writer.write(part)
            await writer.drain()
        while loop.time() < deadline:
            if followup is not None and sink.done:
                writer.write(followup)
                await writer.drain()
                followup = None
            budget = deadline - loop.time()
            if len(sink.done) >= responses:
                if linger <= 0:
                    break
                budget = min(budget, linger)
            try:
                async with asyncio.timeout(budget):
                    chunk = await reader.read(65536)
            except TimeoutError:
                if len(sink.done) >= responses:
                    break
                continue
            if not chunk:
                closed = True
                break
            raw += chunk
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserError:
                break
    except ConnectionResetError:
        closed = reset = True
    finally:
        writer.close()
    return Conversation(sink.done, bytes(raw), closed, reset)
