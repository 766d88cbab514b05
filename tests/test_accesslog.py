"""proxy.accesslog: Envoy-named JSON lines, sampling, a bounded buffer, a writer thread."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy import config as cfg
from proxy.accesslog import AccessLog

ROOT = Path(__file__).resolve().parent.parent

FIELDS: dict[str, type | tuple[type, ...]] = {
    "start_time": str,
    "method": str,
    "path": str,
    "protocol": str,
    "response_code": int,
    "response_flags": str,
    "bytes_received": int,
    "bytes_sent": int,
    "duration": int,
    "upstream_service_time": (int, type(None)),
    "x_forwarded_for": (str, type(None)),
    "user_agent": (str, type(None)),
    "request_id": str,
    "authority": (str, type(None)),
    "upstream_host": (str, type(None)),
    "route": (str, type(None)),
    "category": (str, type(None)),
    "cluster": (str, type(None)),
    "system": (str, type(None)),
    "trace_id": (str, type(None)),
}


def entry(code: int = 200, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "method": "POST",
        "path": "/api/payment/charge?x=1",
        "response_code": code,
        "duration": 0.1234,
        "request_id": "req-1",
        "bytes_received": 120,
        "bytes_sent": 45,
        "start_time": 1_709_277_302.1239,
        "protocol": "HTTP/1.1",
        "response_flags": "-",
        "upstream_service_time": 0.1001,
        "x_forwarded_for": "10.0.0.1",
        "user_agent": "curl/8.5.0",
        "authority": "shop.example",
        "upstream_host": "127.0.0.1:9003",
        "route": "payment",
        "category": "payment",
        "cluster": "tokopedia-pay",
        "system": "tokopedia",
    }
    fields.update(overrides)
    return fields


def lines(data: bytes) -> list[dict[str, Any]]:
    assert data == b"" or data.endswith(b"\n")
    return [orjson.loads(line) for line in data.splitlines()]


class SlowStream(io.RawIOBase):
    """A sink whose ``write`` blocks until released, like a stdout pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.data = bytearray()
        self.writes = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.entered.set()
        self.release.wait(10)
        self.data += bytes(b)
        self.writes += 1
        return len(b)


class FailingStream(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        raise OSError(28, "No space left on device")


def test_all_fields_present_and_typed() -> None:
    out = io.BytesIO()
    access = AccessLog(stream=out)
    access.log(**entry())
    access.log(
        method="GET",
        path="/api/feed",
        response_code=404,
        duration=0.0004,
        request_id="req-2",
    )
    access.close()
    first, second = lines(out.getvalue())
    for record in (first, second):
        assert list(record) == list(FIELDS)
        for name, typ in FIELDS.items():
            assert isinstance(record[name], typ), (name, record[name])
    assert first == {
        "start_time": "2024-03-01T07:15:02.123Z",
        "method": "POST",
        "path": "/api/payment/charge?x=1",
        "protocol": "HTTP/1.1",
        "response_code": 200,
        "response_flags": "-",
        "bytes_received": 120,
        "bytes_sent": 45,
        "duration": 123,
        "upstream_service_time": 100,
        "x_forwarded_for": "10.0.0.1",
        "user_agent": "curl/8.5.0",
        "request_id": "req-1",
        "authority": "shop.example",
        "upstream_host": "127.0.0.1:9003",
        "route": "payment",
        "category": "payment",
        "cluster": "tokopedia-pay",
        "system": "tokopedia",
        "trace_id": None,
    }
    # Defaults: no upstream, no headers, start time derived from now - duration.
    assert second["upstream_service_time"] is None
    assert second["user_agent"] is None
    assert second["route"] is None
    assert second["duration"] == 0
    assert second["start_time"].endswith("Z")
    assert len(second["start_time"]) == len("2024-03-01T07:15:02.123Z")


def test_hostile_values_stay_one_valid_line() -> None:
    out = io.BytesIO()
    access = AccessLog(stream=out)
    nasty = 'a"b\\c\nd\r\x00\x1b[31m\u2028é'
    access.log(**entry(path="/x?" + nasty, user_agent=nasty, x_forwarded_for=nasty))
    access.close()
    (record,) = lines(out.getvalue())
    assert record["user_agent"] == nasty
    assert record["path"] == "/x?" + nasty


def test_bytes_that_are_not_utf8_are_escaped_not_raised() -> None:
    """aiohttp keeps a header's non-UTF-8 bytes as lone surrogates; orjson refuses them.
    Each byte 0x80-0xff in every request field is written as ``\\xNN`` (issue #18)."""
    out = io.BytesIO()
    access = AccessLog(stream=out)
    for byte in range(0x80, 0x100):
        raw = bytes([byte]).decode("utf-8", "surrogateescape")
        access.log(**entry(user_agent=raw, x_forwarded_for=raw, authority=raw, path="/" + raw))
    access.close()
    records = lines(out.getvalue())
    assert len(records) == 128
    for byte, record in zip(range(0x80, 0x100), records, strict=True):
        shown = f"\\x{byte:02x}"
        assert record["user_agent"] == record["x_forwarded_for"] == record["authority"] == shown
        assert record["path"] == "/" + shown


def test_sampling_keeps_errors() -> None:
    out = io.BytesIO()
    access = AccessLog(sample=0.0, stream=out)
    for code in (200, 201, 301, 404, 499):
        access.log(**entry(code))
    for code in (500, 502, 503, 504):
        access.log(**entry(code))
    access.close()
    assert [r["response_code"] for r in lines(out.getvalue())] == [500, 502, 503, 504]


def test_sampling_rate_is_about_right_and_seedable() -> None:
    def run(seed: int) -> list[str]:
        out = io.BytesIO()
        access = AccessLog(sample=0.01, stream=out, seed=seed)
        for i in range(20_000):
            access.log(**entry(request_id=f"r{i}"))
        access.close()
        return [r["request_id"] for r in lines(out.getvalue())]

    kept = run(7)
    assert 120 <= len(kept) <= 280  # ~200 expected
    assert run(7) == kept
    assert run(8) != kept


def test_full_sampling_logs_everything() -> None:
    out = io.BytesIO()
    access = AccessLog(sample=1.0, stream=out)
    for i in range(1000):
        access.log(**entry(request_id=f"r{i}"))
    access.close()
    assert [r["request_id"] for r in lines(out.getvalue())] == [f"r{i}" for i in range(1000)]
    assert access.dropped == 0
    assert access.written == 1000


def test_buffer_is_bounded_and_drops_are_counted() -> None:
    stream = SlowStream()
    access = AccessLog(stream=stream, max_pending=10, batch_lines=1)  # type: ignore[arg-type]
    access.log(**entry(request_id="r0"))
    assert stream.entered.wait(5)  # the writer thread is stuck in write()
    for i in range(1, 50):
        access.log(**entry(request_id=f"r{i}"))  # never blocks
    assert access.dropped == 40
    assert access.pending == 10
    # Errors are dropped too when the buffer is full: the bound holds for every line.
    access.log(**entry(503))
    assert access.dropped == 41
    stream.release.set()
    access.close()
    assert access.pending == 0
    assert access.written == 10
    assert [r["request_id"] for r in lines(bytes(stream.data))] == [f"r{i}" for i in range(10)]


async def test_one_write_per_flush_interval() -> None:
    stream = SlowStream()
    stream.release.set()
    access = AccessLog(stream=stream, flush_interval=0.3)  # type: ignore[arg-type]
    for i in range(300):
        access.log(**entry(request_id=f"a{i}"))
        if i % 10 == 0:
            await asyncio.sleep(0)  # many loop iterations, still one hand-off
    assert stream.writes == 0  # buffered until the timer fires
    for _ in range(200):
        await asyncio.sleep(0.01)
        if access.written == 300:
            break
    assert access.written == 300
    assert stream.writes == 1
    for i in range(300):
        access.log(**entry(request_id=f"b{i}"))
    access.close()  # hands off what is buffered, without waiting for the timer
    assert stream.writes == 2
    assert [r["request_id"] for r in lines(bytes(stream.data))] == [
        *(f"a{i}" for i in range(300)),
        *(f"b{i}" for i in range(300)),
    ]


async def test_batch_lines_hands_off_within_a_tick() -> None:
    stream = SlowStream()
    access = AccessLog(stream=stream, batch_lines=100)  # type: ignore[arg-type]
    for i in range(99):
        access.log(**entry(request_id=f"r{i}"))
    assert not stream.entered.wait(0.2)  # waiting for the end of the loop iteration
    access.log(**entry(request_id="r99"))
    assert stream.entered.wait(5)  # a full batch goes to the writer without awaiting
    stream.release.set()
    access.close()
    assert len(lines(bytes(stream.data))) == 100


async def test_file_lines_are_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(b'{"earlier":"line"}\n')
    access = AccessLog(stream=str(path))
    for i in range(500):
        access.log(**entry(200 + i % 400, request_id=f"r{i}"))
        if i % 50 == 0:
            await asyncio.sleep(0)
    access.close()
    records = lines(path.read_bytes())
    assert records[0] == {"earlier": "line"}  # appended, not truncated
    assert [r["request_id"] for r in records[1:]] == [f"r{i}" for i in range(500)]
    assert all(set(r) == set(FIELDS) for r in records[1:])


def test_write_failures_are_counted_not_raised() -> None:
    access = AccessLog(stream=FailingStream())  # type: ignore[arg-type]
    for _ in range(5):
        access.log(**entry())
    assert access.flush(5)
    access.close()
    assert access.failed == 5
    assert access.written == 0


def test_disabled_logs_nothing() -> None:
    out = io.BytesIO()
    access = AccessLog(enabled=False, stream=out)
    access.log(**entry(503))
    access.close()
    assert out.getvalue() == b""
    assert access.dropped == 0


def test_after_close_lines_are_dropped() -> None:
    out = io.BytesIO()
    access = AccessLog(stream=out)
    access.close()
    access.log(**entry())
    assert access.dropped == 1
    assert out.getvalue() == b""
    access.close()  # idempotent


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="sample"):
        AccessLog(sample=1.5, stream=io.BytesIO())
    with pytest.raises(ValueError, match="at least 1"):
        AccessLog(stream=io.BytesIO(), max_pending=0)
    with pytest.raises(ValueError, match="flush_interval"):
        AccessLog(stream=io.BytesIO(), flush_interval=-1)


def test_from_config(tmp_path: Path) -> None:
    assert cfg.Config().access_log == cfg.AccessLog(
        enabled=True, sample=1.0, path="-", buffer_lines=65536, flush_interval=0.1
    )
    path = tmp_path / "a.log"
    config = cfg.parse(
        f"access_log: {{sample: 0.0, path: {path}, buffer_lines: 5, flush_interval: 0.5}}\n"
        "systems: {s: {kind: commerce}}\nclusters: {c: {system: s, endpoints: [http://127.0.0.1:1]}}\n"
        "routes: [{name: r, match: {}, category: promotion, to: c}]\n"
    )
    access = AccessLog.from_config(config.access_log)
    assert access.sample == 0.0
    assert access.max_pending == 5
    assert access.flush_interval == 0.5
    access.log(**entry(200))
    access.log(**entry(500))
    access.close()
    assert [r["response_code"] for r in lines(path.read_bytes())] == [500]
    with pytest.raises(cfg.ConfigError, match=r"\$\.access_log\.sample"):
        cfg.parse("access_log: {sample: 2}")


def test_stdout_by_default() -> None:
    script = textwrap.dedent(
        """
        from proxy.accesslog import AccessLog
        access = AccessLog()
        for i in range(3):
            access.log(method="GET", path="/", response_code=200, duration=0.01,
                       request_id=f"r{i}")
        access.close()
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert [r["request_id"] for r in lines(result.stdout)] == ["r0", "r1", "r2"]
