"""``jalur demo --tls``: a throw-away CA and certificates, made at run time.

The commerce back ends of the demo serve HTTPS with a certificate for ``SERVER_NAME`` (and
127.0.0.1) and require a client certificate; Jalur's commerce clusters get a ``tls``
section that trusts only this CA, verifies ``SERVER_NAME`` and presents its own client
certificate (mutual TLS). Made with ``cryptography`` (a runtime dependency of Jalur for
certificate checks), so the demo needs nothing from the test extras. Keys are ECDSA P-256;
certificates last ``VALID_DAYS``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..config import Config, UpstreamTls

__all__ = ["SERVER_NAME", "DemoPki", "make_pki", "over_tls"]

# The name the demo's commerce back ends are certified for (SNI and verified name).
SERVER_NAME: Final = "commerce.demo.internal"
# A demo certificate's lifetime: long enough for a session, short enough to be harmless.
VALID_DAYS: Final = 7


@dataclass(frozen=True)
class DemoPki:
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_context(self) -> ssl.SSLContext:
        """What a demo commerce back end serves with: its certificate, client certs required."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        ctx.load_verify_locations(cafile=self.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Jalur demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_pki(directory: Path) -> DemoPki:
    """A CA, a server certificate for ``SERVER_NAME`` and a client certificate, as PEM files
    in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Jalur demo CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf(
        SERVER_NAME,
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client, client_key = leaf("jalur-demo-sidecar", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    pki = DemoPki(
        ca_file=directory / "ca.pem",
        server_cert=directory / "commerce.pem",
        server_key=directory / "commerce.key",
        client_cert=directory / "jalur-client.pem",
        client_key=directory / "jalur-client.key",
    )
    pki.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, pki.server_key)
    pki.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    _write_key(client_key, pki.client_key)
    return pki


def over_tls(config: Config, pki: DemoPki) -> Config:
    """``config`` with every commerce cluster's endpoints on ``https://`` and a ``tls``
    section trusting only the demo CA, verifying ``SERVER_NAME``, with Jalur's client
    certificate."""
    tls = UpstreamTls(
        ca_file=str(pki.ca_file),
        server_name=SERVER_NAME,
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    clusters = {}
    for name, cluster in config.clusters.items():
        if config.systems[cluster.system].kind == "commerce":
            endpoints = [u.replace("http://", "https://", 1) for u in cluster.endpoints]
            cluster = msgspec.structs.replace(cluster, endpoints=endpoints, tls=tls)
        clusters[name] = cluster
    return msgspec.structs.replace(config, clusters=clusters)
