"""TLS on the listeners and certificates that rotate.

In process: the data listener serves HTTPS (``X-Forwarded-Proto: https`` upstream), asks
for client certificates when ``client_ca_file`` is set, and the admin listener has its own
certificate. As deployed (``jalur run --workers 2`` with a Kubernetes Secret layout where
an update swaps the ``..data`` symlink): new connections get the new certificate while
requests keep flowing with 0 failures, a bad new pair keeps the old one and is counted,
and SIGHUP re-reads the files without a watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml

from proxy import tls
from proxy.server import ProxyServer

from .conftest import SERVING, SYSTEMS, Harness, RedisServer, cluster, one_route, until

HOST = "127.0.0.1"


class Secret:
    """A directory laid out like a mounted Kubernetes Secret: ``tls.crt`` and ``tls.key``
    are symlinks through ``..data``, which an update swaps atomically to a new directory."""

    def __init__(self, root: Path, ca: trustme.CA) -> None:
        self.root = root
        self.ca = ca
        root.mkdir()
        self.n = 0
        for name in ("tls.crt", "tls.key"):
            (root / name).symlink_to(f"..data/{name}")

    @property
    def cert(self) -> str:
        return str(self.root / "tls.crt")

    @property
    def key(self) -> str:
        return str(self.root / "tls.key")

    def publish(self, leaf: trustme.LeafCert, key_of: trustme.LeafCert | None = None) -> None:
        """A new version: write it to its own directory, then swap ``..data`` to it."""
        self.n += 1
        version = self.root / f"..v{self.n}"
        version.mkdir()
        (version / "tls.crt").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        (version / "tls.key").write_bytes((key_of or leaf).private_key_pem.bytes())
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.root / "..data")


def listen(secret: Secret, **tls_extra: str) -> dict[str, Any]:
    """A loopback listener section serving ``secret``."""
    tls = {"cert_file": secret.cert, "key_file": secret.key, **tls_extra}
    return {"host": HOST, "port": 0, "tls": tls}


def client_context(ca: trustme.CA, leaf: trustme.LeafCert | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if leaf is not None:
        leaf.configure_cert(ctx)
    return ctx


async def served_serial(port: int, ctx: ssl.SSLContext) -> int:
    """The serial number of the certificate a new connection to ``port`` is shown."""
    from cryptography import x509

    _, writer = await asyncio.open_connection(HOST, port, ssl=ctx)
    try:
        obj = writer.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True)
        return int(x509.load_der_x509_certificate(der).serial_number)
    finally:
        writer.close()


def serial(leaf: trustme.LeafCert) -> int:
    from cryptography import x509

    return int(x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number)


# -- in process ------------------------------------------------------------------------------


async def test_data_and_admin_listeners_serve_https(harness: Harness, tmp_path: Path) -> None:
    ca = trustme.CA()
    data = Secret(tmp_path / "data", ca)
    data.publish(ca.issue_cert(HOST))
    admin = Secret(tmp_path / "admin", ca)
    admin.publish(ca.issue_cert(HOST))
    b = await harness.backend("feed", "tiktok")
    p = await harness.proxy(
        {
            "listen": listen(data),
            "admin": listen(admin),
            **one_route({"feed": cluster("tiktok", b.url)}, "feed"),
        }
    )
    ctx = client_context(ca)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"https://{HOST}:{p.data_port}/feed", ssl=ctx) as r:
            assert r.status == 200
        async with s.get(f"https://{HOST}:{p.admin_port}/healthz", ssl=ctx) as r:
            assert r.status == 200
        async with s.get(f"https://{HOST}:{p.admin_port}/metrics", ssl=ctx) as r:
            text = await r.text()
        with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port
            async with s.get(f"http://{HOST}:{p.data_port}/feed") as r:
                await r.read()
    headers = {k.lower(): v for k, v in b.received[-1].headers}
    assert headers["x-forwarded-proto"] == "https"
    assert re.search(
        r'jalur_tls_certificate_expiry_seconds\{file="[^"]+/data/tls.crt",role="cert",'
        r'section="listen.tls"\} [0-9.e+]+',
        text,
    ), text


async def test_listener_client_certificates_required(harness: Harness, tmp_path: Path) -> None:
    ca = trustme.CA()
    clients = trustme.CA()
    secret = Secret(tmp_path / "data", ca)
    secret.publish(ca.issue_cert(HOST))
    client_ca = tmp_path / "clients.pem"
    client_ca.write_bytes(clients.cert_pem.bytes())
    b = await harness.backend("feed", "tiktok")
    p = await harness.proxy(
        {
            "listen": listen(secret, client_ca_file=str(client_ca)),
            **one_route({"feed": cluster("tiktok", b.url)}, "feed"),
        }
    )
    url = f"https://{HOST}:{p.data_port}/feed"
    async with aiohttp.ClientSession() as s:
        good = client_context(ca, clients.issue_cert("app.frontend"))
        async with s.get(url, ssl=good) as r:
            assert r.status == 200
    stranger = client_context(ca, trustme.CA().issue_cert("app.frontend"))
    for ctx in (client_context(ca), stranger):  # no client certificate; an unknown issuer
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            reader, writer = await asyncio.open_connection(HOST, p.data_port, ssl=ctx)
            writer.write(b"GET /feed HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(5):
                assert not (await reader.read()).startswith(b"HTTP/1.1")  # TLS 1.3: after
            writer.close()
    assert len(b.received) == 1
    await until(lambda: rejected(p, "tls_handshake") == 2)  # counted, not logged per client


def rejected(p: ProxyServer, reason: str) -> float:
    value = p.services.metrics.registry.get_sample_value(
        "jalur_requests_rejected_total", {"reason": reason}
    )
    return value or 0.0


async def test_a_client_that_never_completes_the_handshake_is_cut_and_counted(
    harness: Harness, tmp_path: Path
) -> None:
    """The handshake counts against ``header_read_timeout``: a client that connects and
    sends nothing (or plain HTTP) does not hold the connection."""
    ca = trustme.CA()
    secret = Secret(tmp_path / "data", ca)
    secret.publish(ca.issue_cert(HOST))
    b = await harness.backend("feed", "tiktok")
    conf = {"listen": {**listen(secret), "header_read_timeout": 0.3}}
    p = await harness.proxy({**conf, **one_route({"feed": cluster("tiktok", b.url)}, "feed")})
    reader, writer = await asyncio.open_connection(HOST, p.data_port)
    try:
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the proxy, nothing answered
    finally:
        writer.close()
    await until(lambda: rejected(p, "tls_handshake") == 1)
    reader, writer = await asyncio.open_connection(HOST, p.data_port)
    try:
        writer.write(b"GET /feed HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            assert not (await reader.read()).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    await until(lambda: rejected(p, "tls_handshake") == 2)
    assert b.received == []


async def test_bad_new_pair_keeps_the_old_one_and_is_counted(
    harness: Harness, tmp_path: Path
) -> None:
    ca = trustme.CA()
    secret = Secret(tmp_path / "data", ca)
    first = ca.issue_cert(HOST)
    secret.publish(first)
    b = await harness.backend("feed", "tiktok")
    p = await harness.proxy(
        {
            "listen": listen(secret),
            **one_route({"feed": cluster("tiktok", b.url)}, "feed"),
        }
    )
    ctx = client_context(ca)
    metrics = p.services.metrics.registry

    def reloads(result: str) -> float:
        return metrics.get_sample_value("jalur_tls_reloads_total", {"result": result}) or 0.0

    secret.publish(ca.issue_cert(HOST), key_of=ca.issue_cert(HOST))  # key of another cert
    tls.refresh_all()
    assert reloads("failure") == 1
    assert await served_serial(p.data_port, ctx) == serial(first)
    tls.refresh_all()  # unchanged files: nothing tried again
    assert reloads("failure") == 1
    second = ca.issue_cert(HOST)
    secret.publish(second)
    tls.refresh_all()
    assert reloads("success") == 1
    assert await served_serial(p.data_port, ctx) == serial(second)


# -- as deployed ----------------------------------------------------------------------------


async def start_jalur(
    tmp: Path, conf: dict[str, Any], workers: int
) -> tuple[asyncio.subprocess.Process, int, int, Path]:
    path = tmp / "jalur.yaml"
    path.write_text(yaml.safe_dump(conf))
    log = tmp / "jalur.log"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "run",
            "-c",
            str(path),
            "--workers",
            str(workers),
            stderr=err,
            stdout=asyncio.subprocess.DEVNULL,
            env={**env, "PYTHONUNBUFFERED": "1"},
            cwd=str(tmp),
        )
    try:
        async with asyncio.timeout(30):
            while not (m := SERVING.search(log.read_text())):
                if proc.returncode is not None:
                    raise AssertionError(f"jalur exited: {log.read_text()}")
                await asyncio.sleep(0.05)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, int(m.group(1)), int(m.group(2)), log


async def stop_jalur(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        return await proc.wait()


def listener_conf(b_url: str, secret: Secret, tmp: Path, watch: bool) -> dict[str, Any]:
    return {
        "listen": listen(secret),
        "admin": {"host": HOST, "port": 0},
        "drain": {"delay": 0, "timeout": 5},
        "reload": {"watch": watch, "interval": 0.1},
        "access_log": {"enabled": False},
        "systems": SYSTEMS,
        "clusters": {"pay": {"system": "tokopedia", "endpoints": [b_url]}},
        "routes": [{"name": "pay", "match": {"prefix": "/"}, "category": "payment", "to": "pay"}],
        "compliance": {"audit": {"path": str(tmp / "audit.log")}},
    }


async def all_new_connections_see(port: int, ctx: ssl.SSLContext, want: int) -> None:
    """Until 20 new connections in a row (spread over the workers) show serial ``want``."""
    async with asyncio.timeout(15):
        streak = 0
        while streak < 20:
            streak = streak + 1 if await served_serial(port, ctx) == want else 0


@pytest.mark.slow
async def test_rotation_under_load_with_two_workers_drops_nothing(
    harness: Harness, tmp_path: Path, redis_server: RedisServer
) -> None:
    ca = trustme.CA()
    secret = Secret(tmp_path / "secret", ca)
    secret.publish(ca.issue_cert(HOST))
    b = await harness.backend("pay", "tokopedia")
    conf = listener_conf(b.url, secret, tmp_path, watch=True)
    conf["store"] = {"kind": "redis", "url": redis_server.url}  # two workers: one store
    proc, port, admin, log = await start_jalur(tmp_path, conf, workers=2)
    ctx = client_context(ca)
    url = f"https://{HOST}:{port}/api/payment/status"
    done = asyncio.Event()
    ok = 0
    failures: list[str] = []

    async def shopper(keep_alive: bool) -> None:
        nonlocal ok
        connector = aiohttp.TCPConnector(ssl=ctx, force_close=not keep_alive)
        async with aiohttp.ClientSession(connector=connector) as s:
            for _ in range(100_000):  # bounded; ends when the test is done
                if done.is_set():
                    return
                try:
                    async with s.get(url) as r:
                        await r.read()
                        if r.status == 200:
                            ok += 1
                        else:
                            failures.append(f"status {r.status}")
                except aiohttp.ClientError as exc:
                    failures.append(repr(exc))

    shoppers = [asyncio.create_task(shopper(i % 2 == 0)) for i in range(6)]
    try:
        await until(lambda: ok >= 50, within=20)
        second = ca.issue_cert(HOST)
        secret.publish(second)
        await all_new_connections_see(port, ctx, serial(second))
        at = ok
        secret.publish(ca.issue_cert(HOST), key_of=ca.issue_cert(HOST))  # a bad pair
        async with aiohttp.ClientSession() as s:
            await until_metric(s, admin, 'jalur_tls_reloads_total{result="failure"} 2.0')
        assert await served_serial(port, ctx) == serial(second)
        await until(lambda: ok >= at + 50, within=20)
        third = ca.issue_cert(HOST)
        secret.publish(third)
        await all_new_connections_see(port, ctx, serial(third))
        await until(lambda: ok >= at + 100, within=20)
    finally:
        done.set()
        await asyncio.gather(*shoppers)
        code = await stop_jalur(proc)
    assert failures == []
    assert code == 0
    assert ok == len(b.received)
    assert "new certificate files do not load, keeping the previous ones" in log.read_text()


async def until_metric(s: aiohttp.ClientSession, admin: int, line: str) -> None:
    async with asyncio.timeout(15):
        while True:
            async with s.get(f"http://{HOST}:{admin}/metrics") as r:
                if line in await r.text():
                    return
            await asyncio.sleep(0.05)


async def test_sighup_rereads_the_certificate_files(harness: Harness, tmp_path: Path) -> None:
    ca = trustme.CA()
    secret = Secret(tmp_path / "secret", ca)
    first = ca.issue_cert(HOST)
    secret.publish(first)
    b = await harness.backend("pay", "tokopedia")
    proc, port, _, _ = await start_jalur(
        tmp_path, listener_conf(b.url, secret, tmp_path, watch=False), workers=1
    )
    ctx = client_context(ca)
    try:
        second = ca.issue_cert(HOST)
        secret.publish(second)
        assert await served_serial(port, ctx) == serial(first)  # no watch: not yet
        proc.send_signal(signal.SIGHUP)
        await all_new_connections_see(port, ctx, serial(second))
    finally:
        assert await stop_jalur(proc) == 0


async def test_jalur_run_logs_a_certificate_close_to_expiry(
    harness: Harness, tmp_path: Path
) -> None:
    import datetime as dt

    ca = trustme.CA()
    secret = Secret(tmp_path / "secret", ca)
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=5)
    secret.publish(ca.issue_cert(HOST, not_after=soon))
    b = await harness.backend("pay", "tokopedia")
    proc, port, _, log = await start_jalur(
        tmp_path, listener_conf(b.url, secret, tmp_path, watch=False), workers=1
    )
    try:
        assert await served_serial(port, client_context(ca)) > 0  # it serves meanwhile
    finally:
        assert await stop_jalur(proc) == 0
    text = log.read_text()
    assert "WARNING jalur.tls: $.listen.tls.cert_file:" in text, text
    assert "expires in 4.9 days" in text or "expires in 5.0 days" in text, text
