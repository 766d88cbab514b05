"""The access log: one JSON object per request per line, Envoy's field names, never blocking.

Fields (Envoy's JSON access-log names, plus Jalur's routing facts)::

    start_time             "2024-03-01T07:15:02.123Z" (RFC 3339, UTC, milliseconds)
    method, path, protocol "GET", "/api/feed?page=2" (as received), "HTTP/1.1"
    response_code          int
    response_flags         Envoy flags ("UF", "UT", "UC", "UH", "NR", "DPE", ...) or "-"
    bytes_received         request body bytes read from the client
    bytes_sent             response body bytes written to the client
    duration               int milliseconds, request head to last response byte
    upstream_service_time  int milliseconds until the upstream response head, or null
    x_forwarded_for, user_agent, authority    request headers as received, or null
    request_id             the x-request-id Jalur used
    upstream_host          "host:port" of the endpoint that served it, or null
    route, category, cluster, system          what Jalur decided, or null

How it avoids blocking the event loop: ``log`` formats the line (orjson) and appends it to
an in-memory list; the first line after a hand-off schedules, with ``loop.call_later``, the
next hand-off of the whole list to a writer thread ``flush_interval`` seconds later (at once
when ``batch_lines`` lines are waiting). The writer thread joins each batch and does one
``write`` + ``flush`` per batch, so a slow disk or a full stdout pipe stalls only that
thread. Waking the thread costs more than formatting a line (two GIL hand-overs: measured
~10 us per wake-up on uvloop, against ~3 us to format a line), so it is woken at most once
per interval (default 0.1 s; Envoy flushes its access log every 1 s), not once per loop
iteration.

Memory is bounded: at most ``max_pending`` lines may be waiting (buffered or handed off but
not yet written); past that a line is dropped and counted in ``dropped``. Lines lost to a
failing ``write`` are counted in ``failed``. ``close()`` (or ``flush()``) blocks until
everything accepted so far is written: call it at shutdown, off the loop
(``await asyncio.to_thread(access.close)``) if the sink may be slow.

Sampling: with ``sample < 1`` each request is kept with that probability (a seedable
``random.Random``, so tests are deterministic); a response with status >= 500 is always
logged. Sampling is decided before anything is formatted, so a sampled-out request costs
one comparison and one random draw. The request path asks ``keep(status)`` first and only
then gathers the fields for ``write``; ``log`` does both.

``log`` and the hand-off run in the event loop's thread only. The writer thread starts with
the first hand-off, so an ``AccessLog`` created before worker processes fork is usable in
each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import sys
import threading
import time
from typing import Any, BinaryIO, Final

import orjson

from . import config as cfg

__all__ = ["AccessLog", "printable"]

log = logging.getLogger("jalur.accesslog")

STDOUT: Final = "-"


def printable(value: Any) -> Any:
    """``value`` with every string in it made encodable: a request's bytes that are not
    UTF-8 (aiohttp keeps them as lone surrogates, ``surrogateescape``) become ``\\xNN``
    text, so a hostile byte is shown, never an exception. Only called after a line failed
    to encode: the common line pays nothing for it."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable(v) for v in value]
    return value


class AccessLog:
    """JSON-lines access log; see the module docstring for the threading model."""

    def __init__(
        self,
        enabled: bool = True,
        sample: float = 1.0,
        stream: BinaryIO | str | os.PathLike[str] = STDOUT,
        *,
        max_pending: int = 65536,
        batch_lines: int = 1024,
        flush_interval: float = 0.1,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError("sample must be between 0 and 1")
        if max_pending < 1 or batch_lines < 1:
            raise ValueError("max_pending and batch_lines must be at least 1")
        if not 0.0 <= flush_interval <= 60.0:
            raise ValueError("flush_interval must be between 0 and 60 seconds")
        self.enabled = enabled
        self.sample = sample
        self.max_pending = max_pending
        self.batch_lines = batch_lines
        self.flush_interval = flush_interval
        self._random = random.Random(seed).random
        self._owns_stream = False
        self._stream: BinaryIO | None = None
        if enabled:
            if isinstance(stream, str | os.PathLike):
                if os.fspath(stream) == STDOUT:
                    self._stream = sys.stdout.buffer
                else:
                    self._stream = open(stream, "ab")  # noqa: SIM115 - closed by close()
                    self._owns_stream = True
            else:
                self._stream = stream
        # Loop thread only.
        self._buf: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._accepted = 0  # lines appended to _buf, ever
        self.dropped = 0
        self._closed = False
        self._ts_second = -1
        self._ts_prefix = ""
        # Shared with the writer thread, under _cond.
        self._cond = threading.Condition()
        self._queue: list[list[bytes]] = []
        self._closing = False
        # Writer thread only (read elsewhere without the lock: single-writer ints).
        self._done = 0  # lines written or failed, ever
        self.written = 0
        self.failed = 0
        self._thread: threading.Thread | None = None
        self._thread_pid = 0

    @classmethod
    def from_config(cls, c: cfg.AccessLog) -> AccessLog:
        return cls(
            c.enabled,
            c.sample,
            c.path,
            max_pending=c.buffer_lines,
            flush_interval=c.flush_interval,
        )

    @property
    def pending(self) -> int:
        """Lines accepted but not yet written."""
        return self._accepted - self._done

    def keep(self, response_code: int) -> bool:
        """Whether a request with this status is to be logged (the sampling decision)."""
        if not self.enabled:
            return False
        return response_code >= 500 or self.sample >= 1.0 or self._random() < self.sample

    def log(self, *, response_code: int, **fields: Any) -> None:
        """``keep`` then ``write``: log one finished request if it is sampled in."""
        if self.keep(response_code):
            self.write(response_code=response_code, **fields)

    def write(
        self,
        *,
        method: str,
        path: str,
        response_code: int,
        duration: float,
        request_id: str,
        bytes_received: int = 0,
        bytes_sent: int = 0,
        start_time: float | None = None,
        protocol: str = "HTTP/1.1",
        response_flags: str = "-",
        upstream_service_time: float | None = None,
        x_forwarded_for: str | None = None,
        user_agent: str | None = None,
        authority: str | None = None,
        upstream_host: str | None = None,
        route: str | None = None,
        category: str | None = None,
        cluster: str | None = None,
        system: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        """Log one finished request that ``keep`` accepted. Times are in seconds:
        ``start_time`` Unix time (default: now minus ``duration``), ``duration`` and
        ``upstream_service_time`` elapsed."""
        if not self.enabled:
            return
        if self._closed or self._accepted - self._done >= self.max_pending:
            self.dropped += 1
            return
        if start_time is None:
            start_time = time.time() - duration
        fields = {
            "start_time": self._timestamp(start_time),
            "method": method,
            "path": path,
            "protocol": protocol,
            "response_code": response_code,
            "response_flags": response_flags,
            "bytes_received": bytes_received,
            "bytes_sent": bytes_sent,
            "duration": int(duration * 1000),
            "upstream_service_time": (
                None if upstream_service_time is None else int(upstream_service_time * 1000)
            ),
            "x_forwarded_for": x_forwarded_for,
            "user_agent": user_agent,
            "request_id": request_id,
            "authority": authority,
            "upstream_host": upstream_host,
            "route": route,
            "category": category,
            "cluster": cluster,
            "system": system,
            "trace_id": trace_id,
        }
        try:
            line = orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:  # a header's bytes were not UTF-8
            line = orjson.dumps(printable(fields), option=orjson.OPT_APPEND_NEWLINE)
        self._buf.append(line)
        self._accepted += 1
        if len(self._buf) >= self.batch_lines:
            self._handoff()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a script, a test): hand off at once
                self._handoff()
                return
            self._timer = loop.call_later(self.flush_interval, self._handoff)

    def flush(self, timeout: float | None = None) -> bool:
        """Hand off the buffer and wait until every line accepted so far is written (or
        failed). Blocks: for shutdown and tests, not for the request path."""
        target = self._accepted
        self._handoff()
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write everything accepted so far, stop the writer thread, close a file we opened.
        Lines logged afterwards are dropped (and counted)."""
        if self._closed:
            return
        self._handoff()
        self._closed = True
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("access log writer did not finish within %.1f s", timeout)
                return
        if self._stream is not None:
            with contextlib.suppress(OSError, ValueError):
                self._stream.flush()
            if self._owns_stream:
                self._stream.close()

    # -- internals -----------------------------------------------------------------------

    def _timestamp(self, t: float) -> str:
        second = int(t)
        if second != self._ts_second:
            self._ts_second = second
            self._ts_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._ts_prefix}.{int((t - second) * 1000):03d}Z"

    def _handoff(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()  # a no-op when it is this very call
        batch = self._buf
        if not batch:
            return
        self._buf = []
        with self._cond:
            self._queue.append(batch)
            self._cond.notify_all()
        if self._thread is None or self._thread_pid != os.getpid():
            self._start_writer()

    def _start_writer(self) -> None:
        self._thread_pid = os.getpid()
        self._thread = threading.Thread(target=self._writer, name="jalur-accesslog", daemon=True)
        self._thread.start()

    def _writer(self) -> None:
        stream = self._stream
        assert stream is not None
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                batches, self._queue = self._queue, []
                closing = self._closing
            if batches:
                n = sum(len(b) for b in batches)
                try:
                    stream.write(b"".join(itertools.chain.from_iterable(batches)))
                    stream.flush()
                except Exception as exc:  # a full disk or a closed pipe must not kill us
                    if not self.failed:
                        log.error("access log write failed: %s", exc)
                    self.failed += n
                else:
                    self.written += n
                with self._cond:
                    self._done += n
                    self._cond.notify_all()
            elif closing:
                return
