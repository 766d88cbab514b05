"""TLS to upstreams on real loopback handshakes (certificates from ``trustme``).

Valid chain, unknown CA, wrong name, expired, a plain-text server behind an ``https://``
endpoint, mutual TLS with and without a client certificate, session resumption across
pooled connections, health checks and WebSocket upgrades over the cluster's TLS, and
failures counted, ejected and never retried into a weaker trust decision.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import shutil
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web

from proxy import config as cfg
from proxy import errors
from proxy.demo.backend import BackendSpec, make_app
from proxy.h1transport import H1Transport
from proxy.server import ProxyServer
from proxy.upstream import Endpoint

from .conftest import (
    SYSTEMS,
    Harness,
    Runner,
    build_config,
    cluster,
    jalur_demo,
    one_route,
    until,
)

NAME = "shop.internal"  # the name the upstream certificates are issued for


class Pki:
    """A CA, a server certificate for ``NAME`` and 127.0.0.1, written to files."""

    def __init__(self, tmp: Path, tag: str = "ca") -> None:
        self.dir = tmp / tag
        self.dir.mkdir(exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = self.write(self.ca.cert_pem.bytes(), "ca.pem")
        self.server = self.ca.issue_cert(NAME, "127.0.0.1")

    def write(self, data: bytes, name: str) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)

    def leaf_files(self, leaf: trustme.LeafCert, stem: str) -> tuple[str, str]:
        cert = self.write(b"".join(p.bytes() for p in leaf.cert_chain_pems), f"{stem}.pem")
        key = self.write(leaf.private_key_pem.bytes(), f"{stem}.key")
        return cert, key

    def server_context(
        self, leaf: trustme.LeafCert | None = None, client_ca: trustme.CA | None = None
    ) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        (leaf or self.server).configure_cert(ctx)
        if client_ca is not None:
            client_ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def tls_backend(
    h: Harness, ctx: ssl.SSLContext, name: str = "pay", system: str = "tokopedia"
) -> int:
    """The demo back end served over TLS with ``ctx``; its port."""
    app = make_app(BackendSpec(cluster=name, system=system))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    h.runners.append(runner)
    return int(runner.addresses[0][1])


def tls_cluster(port: int | str, **tls: Any) -> dict[str, Any]:
    endpoints = [port] if isinstance(port, str) else [f"https://127.0.0.1:{port}"]
    return cluster("tokopedia", *endpoints, tls=tls, retry={"attempts": 1})


def sample(p: ProxyServer, name: str, **labels: str) -> float:
    value = p.services.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def get(
    port: int, path: str = "/api/payment/x", method: str = "GET", data: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    """One request through the proxy: status and JSON body."""
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, f"http://127.0.0.1:{port}{path}", data=data) as r,
    ):
        return r.status, await r.json()


async def proxy_to(h: Harness, spec: dict[str, Any], category: str = "payment") -> ProxyServer:
    return await h.proxy(one_route({"pay": spec}, "pay", category))


# -- verification --------------------------------------------------------------------------


async def test_valid_chain_and_server_name(harness: Harness, pki: Pki) -> None:
    port = await tls_backend(harness, pki.server_context())
    p = await proxy_to(harness, tls_cluster(port, ca_file=pki.ca_file, server_name=NAME))
    status, body = await get(p.data_port)
    assert status == 200
    assert body["cluster"] == "pay"
    assert body["path"] == "/api/payment/x"


async def test_endpoint_host_is_the_verified_name_by_default(harness: Harness, pki: Pki) -> None:
    """No server_name: the endpoint's host (here the IP 127.0.0.1, in the certificate's
    subjectAltName) is what is verified."""
    port = await tls_backend(harness, pki.server_context())
    p = await proxy_to(harness, tls_cluster(port, ca_file=pki.ca_file))
    assert (await get(p.data_port))[0] == 200


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown_ca", "tls_verify"),
        ("wrong_name", "tls_verify"),
        ("expired", "tls_verify"),
        ("plain_http_server", "tls_handshake"),
        ("tls_too_old", "tls_handshake"),
    ],
)
async def test_untrusted_upstream_is_502_with_reason(
    harness: Harness, pki: Pki, tmp_path: Path, case: str, reason: str
) -> None:
    ca_file, server_name = pki.ca_file, NAME
    extra: dict[str, Any] = {}
    if case == "unknown_ca":
        ca_file = Pki(tmp_path, "other").ca_file
        port = await tls_backend(harness, pki.server_context())
    elif case == "wrong_name":
        server_name = "bank.internal"
        port = await tls_backend(harness, pki.server_context())
    elif case == "expired":
        now = dt.datetime.now(dt.UTC)
        old = pki.ca.issue_cert(
            NAME, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        )
        port = await tls_backend(harness, pki.server_context(old))
    elif case == "plain_http_server":
        port = (await harness.backend("pay", "tokopedia")).port
    else:  # the upstream speaks only TLS 1.2, the cluster wants 1.3
        ctx = pki.server_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        port = await tls_backend(harness, ctx)
        extra["min_version"] = "TLSv1.3"
    p = await proxy_to(
        harness, tls_cluster(port, ca_file=ca_file, server_name=server_name, **extra)
    )
    status, body = await get(p.data_port)
    assert status == 502
    assert body["reason"] == reason
    assert body["request_id"]
    assert "127.0.0.1" not in body["error"]  # no internal address in the answer
    assert sample(p, "jalur_upstream_errors_total", cluster="pay", kind=reason) == 1
    total = sample(
        p,
        "jalur_requests_total",
        route="all",
        category="payment",
        cluster="pay",
        method="GET",
        code="502",
    )
    assert total == 1


async def test_system_trust_store_by_default_refuses_a_private_ca(
    harness: Harness, pki: Pki
) -> None:
    """An https:// endpoint without a tls section is verified against the system store."""
    port = await tls_backend(harness, pki.server_context())
    spec = cluster("tokopedia", f"https://127.0.0.1:{port}", retry={"attempts": 1})
    p = await proxy_to(harness, spec)
    status, body = await get(p.data_port)
    assert (status, body["reason"]) == (502, "tls_verify")


async def test_verify_false_connects_to_an_untrusted_upstream_on_a_promotion_route(
    harness: Harness, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    port = await tls_backend(harness, pki.server_context())
    p = await proxy_to(harness, tls_cluster(port, verify=False), category="promotion")
    assert (await get(p.data_port))[0] == 200
    assert any("NOT checked" in r.getMessage() for r in caplog.records)


# -- mutual TLS ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_mutual_tls_with_and_without_a_client_certificate(
    harness: Harness, pki: Pki, tmp_path: Path, version: str
) -> None:
    clients = Pki(tmp_path, "clients")  # the upstream's CA for client certificates
    ctx = pki.server_context(client_ca=clients.ca)
    ctx.maximum_version = ssl.TLSVersion[version.replace(".", "_")]
    port = await tls_backend(harness, ctx)
    cert, key = clients.leaf_files(clients.ca.issue_cert("jalur.sidecar"), "jalur")
    with_cert = tls_cluster(
        port, ca_file=pki.ca_file, server_name=NAME, cert_file=cert, key_file=key
    )
    without = tls_cluster(port, ca_file=pki.ca_file, server_name=NAME)
    p = await harness.proxy(
        {
            "clusters": {"mtls": with_cert, "anon": without},
            "routes": [
                {"name": "a", "match": {"prefix": "/a"}, "category": "payment", "to": "mtls"},
                {"name": "b", "match": {"prefix": "/b"}, "category": "payment", "to": "anon"},
            ],
        }
    )
    assert (await get(p.data_port, "/a"))[0] == 200
    status, body = await get(p.data_port, "/b")
    assert status == 502
    assert body["reason"] == "tls_handshake", body
    assert sample(p, "jalur_upstream_errors_total", cluster="anon", kind="tls_handshake") == 1


# -- resumption, pooling, health -----------------------------------------------------------


def reuse_backend() -> tuple[web.Application, list[tuple[bool, str | None]]]:
    """An upstream that records, per request, whether its TLS session was resumed and the
    ALPN protocol chosen, and closes each connection (so every request needs a new one)."""
    seen: list[tuple[bool, str | None]] = []

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        obj = request.transport.get_extra_info("ssl_object")
        seen.append((obj.session_reused, obj.selected_alpn_protocol()))
        return web.Response(text="ok", headers={"Connection": "close"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    return app, seen


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_sessions_are_resumed_across_connections(run: Runner, pki: Pki, version: str) -> None:
    """The first connection does a full handshake; the following ones (new connections:
    the upstream closes each) resume the endpoint's last session, on both loops."""

    async def main() -> list[tuple[bool, str | None]]:
        app, seen = reuse_backend()
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        ctx = pki.server_context()
        ctx.maximum_version = ssl.TLSVersion[version.replace(".", "_")]
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        url = f"https://127.0.0.1:{runner.addresses[0][1]}"
        spec = cfg.Cluster(
            system="tokopedia",
            endpoints=[url],
            tls=cfg.UpstreamTls(ca_file=pki.ca_file, server_name=NAME),
        )
        from proxy import tls

        transport = H1Transport(spec, cfg.Listen(), tls=tls.for_cluster("pay", spec))
        try:
            for _ in range(4):
                resp = await transport.send(Endpoint.parse(url), "GET", "/", _headers(), None)
                assert resp.status == 200
                while await resp.read_chunk():
                    pass
                resp.release()
        finally:
            await transport.close()
            await runner.cleanup()
        return seen

    # ALPN: the upstream offers h2 first; Jalur asks for http/1.1 only.
    assert run(main()) == [(False, "http/1.1")] + [(True, "http/1.1")] * 3


def _headers() -> Any:
    from multidict import CIMultiDict

    return CIMultiDict({"Host": NAME})


async def test_pooled_tls_connection_is_kept_alive(harness: Harness, pki: Pki) -> None:
    port = await tls_backend(harness, pki.server_context())
    p = await proxy_to(harness, tls_cluster(port, ca_file=pki.ca_file, server_name=NAME))
    for _ in range(5):
        assert (await get(p.data_port))[0] == 200
    transport = p.state.clusters["pay"].transport
    assert isinstance(transport, H1Transport)
    assert transport.open_connections == 1  # five requests, one TLS connection


async def test_health_checks_use_the_cluster_tls(
    harness: Harness, pki: Pki, tmp_path: Path
) -> None:
    """The same TLS settings for active checks: a trusted endpoint stays healthy, one
    presenting a certificate of an unknown CA becomes unhealthy."""
    good = await tls_backend(harness, pki.server_context())
    stranger = Pki(tmp_path, "stranger")
    bad = await tls_backend(harness, stranger.server_context(), name="bad")
    check = {
        "path": "/healthz",
        "interval": 0.05,
        "timeout": 1,
        "unhealthy_threshold": 2,
        "jitter": 0,
    }
    spec = cluster(
        "tokopedia",
        f"https://127.0.0.1:{good}",
        f"https://127.0.0.1:{bad}",
        tls={"ca_file": pki.ca_file, "server_name": NAME},
        health_check=check,
    )
    p = await proxy_to(harness, spec)

    def healthy(port: int) -> float | None:
        return p.services.metrics.registry.get_sample_value(
            "jalur_endpoint_healthy",
            {"cluster": "pay", "endpoint": f"https://127.0.0.1:{port}"},
        )

    await until(lambda: healthy(bad) == 0)
    assert healthy(good) == 1
    for _ in range(4):  # only the trusted endpoint takes requests
        assert (await get(p.data_port))[0] == 200


# -- failures: ejection and retries --------------------------------------------------------


async def test_tls_failures_eject_and_retry_only_within_the_cluster_context(
    harness: Harness, pki: Pki, tmp_path: Path
) -> None:
    """Two endpoints, one with a certificate of an unknown CA. A GET that fails its
    handshake there is retried on the other endpoint with the same context (never without
    verification), and after ``consecutive_connect_failures`` the bad one is ejected."""
    good = await tls_backend(harness, pki.server_context())
    bad = await tls_backend(harness, Pki(tmp_path, "x").server_context(), name="bad")
    spec = cluster(
        "tokopedia",
        f"https://127.0.0.1:{bad}",
        f"https://127.0.0.1:{good}",
        tls={"ca_file": pki.ca_file, "server_name": NAME},
        retry={"attempts": 2, "backoff": {"base": 0.001, "max": 0.001}},
        outlier_detection={"consecutive_connect_failures": 2},
    )
    p = await proxy_to(harness, spec)
    for _ in range(6):
        status, body = await get(p.data_port)
        assert status == 200
        assert body["cluster"] == "pay"  # the trusted one answered, never "bad"
    assert sample(p, "jalur_upstream_errors_total", cluster="pay", kind="tls_verify") == 2
    ejected = p.services.metrics.registry.get_sample_value(
        "jalur_endpoint_healthy", {"cluster": "pay", "endpoint": f"https://127.0.0.1:{bad}"}
    )
    assert ejected == 0


async def test_post_is_not_retried_after_a_tls_alert_past_the_handshake(
    harness: Harness, pki: Pki, tmp_path: Path
) -> None:
    """TLS 1.3: the upstream refuses the missing client certificate only after the client
    finished its handshake and wrote the request; that failure is ``tls_handshake`` and a
    POST without Idempotency-Key is not sent again."""
    clients = Pki(tmp_path, "clients")
    port = await tls_backend(harness, pki.server_context(client_ca=clients.ca))
    spec = cluster(
        "tokopedia",
        f"https://127.0.0.1:{port}",
        tls={"ca_file": pki.ca_file, "server_name": NAME},
        retry={"attempts": 3, "retry_on": ["connect-failure", "reset"]},
    )
    p = await proxy_to(harness, spec)
    status, body = await get(p.data_port, "/api/payment/pay", "POST", b"{}")
    assert (status, body["reason"]) == (502, "tls_handshake")
    assert sample(p, "jalur_retries_total", route="all") == 0


async def test_websocket_upgrade_to_an_https_endpoint_uses_the_cluster_context(
    harness: Harness, pki: Pki
) -> None:
    port = await tls_backend(harness, pki.server_context())
    p = await proxy_to(
        harness, tls_cluster(port, ca_file=pki.ca_file, server_name=NAME), category="promotion"
    )
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(f"http://127.0.0.1:{p.data_port}/_sim/ws") as ws,
    ):
        await ws.send_str("over tls")
        msg = await ws.receive(timeout=5)
        assert msg.data == "over tls"


async def test_websocket_upgrade_to_an_untrusted_endpoint_is_refused(
    harness: Harness, pki: Pki, tmp_path: Path
) -> None:
    port = await tls_backend(harness, Pki(tmp_path, "y").server_context())
    p = await proxy_to(
        harness, tls_cluster(port, ca_file=pki.ca_file, server_name=NAME), category="promotion"
    )
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(f"http://127.0.0.1:{p.data_port}/_sim/ws")
    assert info.value.status == 502
    assert sample(p, "jalur_upstream_errors_total", cluster="pay", kind="tls_verify") == 1


def test_map_error_kinds() -> None:
    from proxy import tls

    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert isinstance(tls.map_error(verify), errors.TlsVerifyFailed)
    assert isinstance(tls.map_error(ssl.SSLError(1, "x")), errors.TlsHandshakeFailed)
    assert tls.map_error(ConnectionResetError()) is None


# -- configuration and `jalur check` -------------------------------------------------------


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(cfg.ConfigError) as info:
        build_config(data)
    return [f"{e.path}: {e.message}" for e in info.value.errors]


def test_config_refuses_mixed_schemes_and_tls_on_plain_endpoints(pki: Pki) -> None:
    mixed = cluster("tokopedia", "http://127.0.0.1:1", "https://127.0.0.1:2")
    plain = cluster("tokopedia", "http://127.0.0.1:1", tls={"ca_file": pki.ca_file})
    found = errors_of(
        {
            "clusters": {"mixed": mixed, "plain": plain},
            "routes": [{"name": "r", "match": {}, "category": "promotion", "to": "mixed"}],
        }
    )
    assert any(e.startswith("$.clusters.mixed.endpoints: mixes") for e in found), found
    assert any(e.startswith("$.clusters.plain.tls: set, but") for e in found), found
    assert errors_of(one_route({"c": cluster("tokopedia", "ftp://127.0.0.1:1")}, "c")) == [
        "$.clusters.c.endpoints[0]: endpoint must be http://host:port or https://host:port"
    ]


def test_verify_false_is_refused_for_a_transaction_category(pki: Pki) -> None:
    spec = cluster("tokopedia", "https://127.0.0.1:1", tls={"verify": False})
    found = errors_of(
        {
            "clusters": {"pay": spec, "feed": spec},
            "routes": [
                {"name": "p", "match": {"prefix": "/p"}, "category": "payment", "to": "pay"},
                {"name": "p2", "match": {"prefix": "/q"}, "category": "payment", "to": "pay"},
                {"name": "f", "match": {"prefix": "/f"}, "category": "promotion", "to": "feed"},
            ],
        }
    )
    assert len(found) == 1, found  # once per cluster, and not for the promotion cluster
    assert found[0].startswith("$.clusters.pay.tls.verify: false on a cluster serving")


def test_cert_without_key_is_refused(pki: Pki) -> None:
    cert, _ = pki.leaf_files(pki.server, "s")
    found = errors_of(one_route({"c": tls_cluster(1, cert_file=cert)}, "c"))
    assert found == ["$.clusters.c.tls: cert_file and key_file go together (mutual TLS needs both)"]


def test_config_load_checks_the_files_with_field_paths(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.leaf_files(pki.server, "server")
    _, other_key = pki.leaf_files(pki.ca.issue_cert("other.internal"), "other")
    junk = pki.write(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", "j")
    found = errors_of(
        {
            "listen": {
                "host": "127.0.0.1",
                "port": 0,
                "tls": {"cert_file": cert, "key_file": other_key},
            },
            "admin": {"host": "127.0.0.1", "port": 0, "tls": {"cert_file": junk, "key_file": key}},
            **one_route(
                {
                    "c": tls_cluster(
                        1, ca_file=str(tmp_path / "missing.pem"), cert_file=cert, key_file=key
                    )
                },
                "c",
            ),
        }
    )
    assert "$.listen.tls.key_file: does not load: the key does not match the certificate" in found
    assert any(e.startswith("$.admin.tls.cert_file: ") and "not a PEM" in e for e in found)
    assert f"$.clusters.c.tls.ca_file: no such file: {tmp_path / 'missing.pem'}" in found
    assert len(found) == 3, found


def test_jalur_check_warns_about_certificates_expiring_soon(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy import cli

    now = dt.datetime.now(dt.UTC)
    soon = pki.ca.issue_cert(NAME, not_after=now + dt.timedelta(days=10))
    cert, key = pki.leaf_files(soon, "soon")
    later, later_key = pki.leaf_files(pki.server, "later")
    data = {
        "listen": {"host": "127.0.0.1", "port": 0, "tls": {"cert_file": cert, "key_file": key}},
        "admin": {
            "host": "127.0.0.1",
            "port": 0,
            "tls": {"cert_file": later, "key_file": later_key},
        },
        "systems": SYSTEMS,
        **one_route({"c": tls_cluster(1, ca_file=pki.ca_file)}, "c"),
    }
    path = tmp_path / "jalur.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"{path}: OK" in out
    assert "warning: $.listen.tls.cert_file:" in err
    assert "expires in 9.9 days" in err or "expires in 10.0 days" in err
    assert "$.admin.tls" not in err  # trustme's default lifetime is years


async def test_rotated_client_certificate_is_used_by_new_connections(
    harness: Harness, pki: Pki, tmp_path: Path
) -> None:
    """mTLS: after the client certificate files change, the next new connection presents
    the new certificate (a full handshake: a session of the old context is not resumed)."""
    from cryptography import x509

    from proxy import tls

    clients = Pki(tmp_path, "clients")
    seen: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        der = request.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        seen.append(x509.load_der_x509_certificate(der).serial_number)
        return web.Response(text="ok", headers={"Connection": "close"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = pki.server_context(client_ca=clients.ca)
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    harness.runners.append(runner)
    first, second = clients.ca.issue_cert("jalur-1"), clients.ca.issue_cert("jalur-2")
    cert, key = clients.leaf_files(first, "client")
    port = int(runner.addresses[0][1])
    spec = tls_cluster(port, ca_file=pki.ca_file, server_name=NAME, cert_file=cert, key_file=key)
    p = await harness.proxy(one_route({"pay": spec}, "pay", "promotion"))
    base = f"http://127.0.0.1:{p.data_port}/"
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(base) as r:
                assert r.status == 200
        clients.leaf_files(second, "client")  # the files change in place
        tls.refresh_all()
        for _ in range(2):
            async with s.get(base) as r:
                assert r.status == 200

    def serial_of(leaf: trustme.LeafCert) -> int:
        pem = leaf.cert_chain_pems[0].bytes()
        return int(x509.load_pem_x509_certificate(pem).serial_number)

    assert seen == [serial_of(first)] * 2 + [serial_of(second)] * 2
    assert sample(p, "jalur_tls_reloads_total", result="success") == 1


async def test_jalur_demo_tls_runs_commerce_over_mutual_tls(tmp_path: Path) -> None:
    """`jalur demo --tls` as a user runs it: payments reach the commerce back end through
    verified mutual TLS with a CA made at start; the back end refuses a client without a
    certificate; the promotion side stays plain."""
    certs = tmp_path / "certs"
    async with jalur_demo(tmp_path, "--tls-dir", str(certs)) as (base, admin):
        conf = yaml.safe_load((tmp_path / "demo.yaml").read_text())
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{base}/api/payment/charge", data=b"{}") as r:
                assert r.status == 200
                assert r.headers["x-backend-system"] == "tokopedia"
            async with s.get(f"{base}/api/feed") as r:
                assert r.status == 200
            pay = conf["clusters"]["tokopedia-pay"]["endpoints"][0].replace("http:", "https:")
            anonymous = ssl.create_default_context(cafile=str(certs / "ca.pem"))
            with pytest.raises(aiohttp.ClientError):  # no client certificate: refused
                async with s.get(f"{pay}/api/payment/x", ssl=anonymous) as r:
                    await r.read()
            async with s.get(f"{admin}/metrics") as r:
                text = await r.text()
    assert 'role="cert",section="clusters.tokopedia-pay.tls"' in text
    # Every error kind is exported at 0 from the start; none may have counted.
    errors = re.findall(
        r'^jalur_upstream_errors_total\{cluster="tokopedia-pay",.*\} (\S+)$', text, re.M
    )
    assert errors, text
    assert {float(n) for n in errors} == {0.0}, text


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown_ca", errors.TlsVerifyFailed),
        ("plain_server", errors.TlsHandshakeFailed),
        ("client_cert_required", errors.TlsHandshakeFailed),
    ],
)
def test_transport_maps_tls_failures_on_both_loops(
    run: Runner, pki: Pki, tmp_path: Path, case: str, expected: type[errors.UpstreamError]
) -> None:
    """The transport's own mapping, on stdlib asyncio and on uvloop (what `jalur run` uses):
    the loops report these failures differently (an SSL error, a reset, a silent close)."""
    from proxy import tls

    async def main() -> errors.UpstreamError:
        runner = web.AppRunner(make_app(BackendSpec(cluster="pay", system="x")), access_log=None)
        await runner.setup()
        ca_file = pki.ca_file
        ctx: ssl.SSLContext | None = pki.server_context()
        if case == "unknown_ca":
            ca_file = Pki(tmp_path, "other").ca_file
        elif case == "plain_server":
            ctx = None
        else:
            ctx = pki.server_context(client_ca=Pki(tmp_path, "clients").ca)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        url = f"https://127.0.0.1:{runner.addresses[0][1]}"
        spec = cfg.Cluster(
            system="tokopedia",
            endpoints=[url],
            tls=cfg.UpstreamTls(ca_file=ca_file, server_name=NAME),
        )
        transport = H1Transport(spec, cfg.Listen(), tls=tls.for_cluster("pay", spec))
        try:
            await transport.send(Endpoint.parse(url), "GET", "/", _headers(), None)
        except errors.UpstreamError as exc:
            return exc
        finally:
            await transport.close()
            await runner.cleanup()
        raise AssertionError("the request succeeded")

    err = run(main())
    assert type(err) is expected, repr(err)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("wrk") is None
    or (shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists()),
    reason="wrk and nginx (Debian packages; make test installs them)",
)
async def test_bench_tls_resumes_every_handshake_against_nginx(tmp_path: Path) -> None:
    """`loadtests/bench_tls.py` end to end (1 s cells): NGINX as the mutual-TLS upstream
    counts ``$ssl_session_reused`` itself; behind Jalur, when each request needs a new
    connection, nearly all handshakes must be resumed, and nothing fails."""
    out = tmp_path / "tls.md"
    script = Path(__file__).parent.parent / "loadtests" / "bench_tls.py"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "--seconds",
        "1",
        "--rounds",
        "1",
        "--out",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(240):
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    rows = {
        (m.group(1), m.group(2)): m.groups()
        for m in re.finditer(
            r"^\| (\w+) \| (\w+) \| [\d,]+ \| [\d.]+ \| \d+ \| \d+ \| ([-\d%]+) \| (\d+) \|$",
            out.read_text(),
            re.M,
        )
    }
    assert len(rows) == 6, out.read_text()
    assert all(r[3] == "0" for r in rows.values()), out.read_text()
    resumed = rows[("reconnect", "jalur")][2]
    assert resumed.endswith("%"), out.read_text()
    assert int(resumed[:-1]) >= 90, out.read_text()
