"""What Jalur tells the world (issue #19): no credentials where the config is shown, no
internal address or errno in an error body, no ``Server`` header on its own answers, and
``/config`` only for the admin token's bearer when one is set."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from .conftest import SERVING, SYSTEMS, Harness, free_port, raw_request

SECRET = "hunter2-redis-password"
TOKEN = "admin-s3cret-token"


def redis_url(port: int) -> str:
    return f"redis://jalur:{SECRET}@127.0.0.1:{port}/0"


async def test_config_view_needs_the_token_and_masks_url_credentials(harness: Harness) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(
        {
            "admin": {"host": "127.0.0.1", "port": 0, "token": TOKEN},
            "store": {"kind": "memory", "url": redis_url(6399)},
            "clusters": {"pay": {"system": "tokopedia", "endpoints": [b.url]}},
            "routes": [{"name": "all", "match": {}, "category": "payment", "to": "pay"}],
        }
    )
    admin = f"http://127.0.0.1:{p.admin_port}/config"
    async with aiohttp.ClientSession() as s:
        async with s.get(admin) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        async with s.get(admin, headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with s.get(admin, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200
            text = await r.text()
    assert SECRET not in text
    assert TOKEN not in text
    conf = orjson.loads(text)
    assert conf["store"]["url"] == "redis://***@127.0.0.1:6399/0"


async def test_print_config_masks_url_credentials(tmp_path: Path) -> None:
    data = {
        "systems": SYSTEMS,
        "store": {"kind": "redis", "url": redis_url(6399)},
        "clusters": {"pay": {"system": "tokopedia", "endpoints": ["http://127.0.0.1:9"]}},
        "routes": [{"name": "all", "match": {}, "category": "payment", "to": "pay"}],
    }
    f = tmp_path / "jalur.yaml"
    f.write_text(yaml.safe_dump(data))
    for fmt in ("yaml", "json"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "-c", str(f), "--print-config", fmt,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert SECRET.encode() not in out + err
        assert b"redis://***@127.0.0.1:6399/0" in out


async def test_a_running_proxy_never_logs_the_redis_password(tmp_path: Path) -> None:
    """The store is down: payments get 503 and the log explains, without the password."""
    dead = free_port()
    data = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "drain": {"delay": 0},
        "systems": SYSTEMS,
        "store": {"kind": "redis", "url": redis_url(dead)},
        "compliance": {"audit": {"path": str(tmp_path / "audit.log")}},
        "clusters": {"pay": {"system": "tokopedia", "endpoints": ["http://127.0.0.1:9"]}},
        "routes": [{"name": "pay", "match": {}, "category": "payment", "to": "pay"}],
    }
    f = tmp_path / "jalur.yaml"
    f.write_text(yaml.safe_dump(data))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--log-level", "DEBUG", "run", "-c", str(f),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.stderr is not None
    log = b""
    try:
        async with asyncio.timeout(20):
            while not (m := SERVING.search((line := await proc.stderr.readline()).decode())):
                assert line, "jalur exited before serving"
                log += line
        port = int(m.group(1))
        head = b"POST /pay HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k1\r\nContent-Length: 2\r\n"
        answer = await raw_request(port, head + b"Connection: close\r\n\r\n{}")
        assert answer.status in (502, 503)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, rest = await proc.communicate()
        log += rest
    assert b"idempotency store error" in log
    assert SECRET.encode() not in log


@pytest.mark.parametrize("fault", ["refused", "reset"])
async def test_upstream_failure_body_names_the_kind_and_the_log_the_detail(
    harness: Harness, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    closing = None
    if fault == "refused":
        port = free_port()  # nothing listens there
    else:

        async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.transport.abort()

        closing = await asyncio.start_server(reset, "127.0.0.1", 0)
        port = closing.sockets[0].getsockname()[1]
    p = await harness.proxy(
        {
            "clusters": {
                "pay": {
                    "system": "tokopedia",
                    "endpoints": [f"http://127.0.0.1:{port}"],
                    "retry": {"attempts": 1},
                }
            },
            "routes": [{"name": "all", "match": {}, "category": "promotion", "to": "pay"}],
        }
    )
    with caplog.at_level(logging.INFO, logger="jalur"):
        answer = await raw_request(
            p.data_port, b"GET /x HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n"
        )
    if closing is not None:
        closing.close()
    assert answer.status == 502
    body = orjson.loads(answer.body)
    rid = body["request_id"]
    assert body["reason"] == {"refused": "connect", "reset": "reset"}[fault]
    assert str(port) not in answer.body.decode()
    assert "127.0.0.1" not in answer.body.decode()
    assert "errno" not in answer.body.decode().lower()
    detail = [r.getMessage() for r in caplog.records if rid in r.getMessage()]
    assert detail, caplog.text
    assert str(port) in detail[0]


async def test_no_server_header_on_jalurs_own_answers(harness: Harness) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(
        {
            "clusters": {"pay": {"system": "tokopedia", "endpoints": [b.url]}},
            "routes": [
                {"name": "pay", "match": {"prefix": "/pay"}, "category": "payment", "to": "pay"}
            ],
        }
    )
    for head in (
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # 404 (handler)
        b"GET /a b c HTTP/1.1\r\nHost: x\r\n\r\n",  # 400 (aiohttp's parser refusal)
        b"GET /pay HTTP/1.1\r\nHost: x\r\nX_Bad: 1\r\nConnection: close\r\n\r\n",  # 400
    ):
        answer = await raw_request(p.data_port, head)
        assert answer.status >= 400
        assert answer.header("Server") is None, (head, answer.headers)
    async with aiohttp.ClientSession() as s:
        for path in ("/healthz", "/readyz", "/nowhere"):
            async with s.get(f"http://127.0.0.1:{p.admin_port}{path}") as r:
                assert "Server" not in r.headers, path
        # A relayed answer keeps what the back end said (here: aiohttp's own default).
        async with s.get(f"http://127.0.0.1:{p.data_port}/pay") as r:
            assert r.status == 200


async def test_a_configured_server_header_is_sent(harness: Harness) -> None:
    b = await harness.backend("pay", "tokopedia")
    p = await harness.proxy(
        {
            "listen": {"host": "127.0.0.1", "port": 0, "server_header": "jalur"},
            "clusters": {"pay": {"system": "tokopedia", "endpoints": [b.url]}},
            "routes": [
                {"name": "pay", "match": {"prefix": "/pay"}, "category": "payment", "to": "pay"}
            ],
        }
    )
    answer = await raw_request(
        p.data_port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.status == 404
    assert answer.header("Server") == "jalur"
