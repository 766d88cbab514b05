"""TLS: contexts built at config load, certificate files that rotate, errors mapped once.

Upstream (a cluster with ``https://`` endpoints): ``for_cluster`` builds one client
``SSLContext`` per cluster from its ``tls`` section -- the CA bundle (default: the system
trust store), chain *and* name verification on (``verify: false`` only with a loud warning,
and the config refuses it for a cluster serving a transaction category), the minimum
version (default TLS 1.2), ALPN ``http/1.1``, and a client certificate for mutual TLS. The
name sent as SNI and verified is ``server_name`` or else the endpoint's host. The
transport (``h1transport``) connects with ``connect_context(rotating, session)``: the last
TLS session an endpoint gave is offered again, so a pooled connection after the first
resumes instead of doing a full handshake.

Listeners: ``for_listener`` builds the server context of ``listen.tls`` / ``admin.tls``
(``client_ca_file`` set: every client must present a certificate it signed).

Rotation: every context is held by a ``Rotating``; the connection code reads
``rotating.context`` on each new connection, so swapping it never touches connections
already open (in-flight requests finish on the context they started with). ``refresh``
rebuilds it when one of its files changed on disk -- compared by resolved path, inode,
mtime and size, so a Kubernetes Secret update (a ``..data`` symlink swap) is seen -- or
always when forced (SIGHUP). A new pair that does not load (missing file, bad PEM, key not
matching the certificate) keeps the old context, is logged and counted in
``jalur_tls_reloads_total{result="failure"}``. ``watch`` polls every live ``Rotating``
of the process. ``jalur_tls_certificate_expiry_seconds{section,role,file}`` holds each
loaded certificate's ``notAfter`` (the earliest one of a CA bundle).

Errors: ``map_error`` is the one place an ``ssl`` exception becomes an ``errors`` type:
certificate verification (unknown CA, wrong name, expired) ``TlsVerifyFailed``
(``reason: tls_verify``), any other TLS failure ``TlsHandshakeFailed``
(``reason: tls_handshake``). Both are connect failures: counted against the endpoint's
health, retried (when ``retry_on`` allows) only on another endpoint of the same cluster,
which means the same context -- never on anything weaker, never in plain text.

``check_files`` is what ``jalur check`` (and every config load) runs: the files exist and
parse, the key matches the certificate; certificates expiring within
``EXPIRY_WARNING_SECONDS`` are reported as warnings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from . import config as cfg
from . import errors

if TYPE_CHECKING:
    from cryptography import x509

    from .metrics import Metrics

__all__ = [
    "ALPN",
    "EXPIRY_WARNING_SECONDS",
    "Rotating",
    "check_files",
    "connect_context",
    "for_cluster",
    "for_listener",
    "listener_context",
    "map_error",
    "refresh_all",
    "watch",
]

log = logging.getLogger("jalur.tls")

# The only application protocol Jalur speaks to upstreams and clients over TLS.
ALPN: Final = ("http/1.1",)
# A certificate expiring sooner than this (30 days, as cert-manager renews) is a warning.
EXPIRY_WARNING_SECONDS: Final = 30 * 86400
_VERSIONS: Final = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

# Every live Rotating of this process, for ``watch`` and ``refresh_all`` (a retired
# config's contexts drop out with its transports).
_LIVE: Final[weakref.WeakSet[Rotating]] = weakref.WeakSet()

Signature = tuple[tuple[str, int, int, int] | None, ...]


def _signature(paths: tuple[str, ...]) -> Signature:
    out: list[tuple[str, int, int, int] | None] = []
    for path in paths:
        try:
            real = os.path.realpath(path)
            st = os.stat(real)
        except OSError:
            out.append(None)
        else:
            out.append((real, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class Rotating:
    """One TLS context and the files it was built from (see the module docstring)."""

    __slots__ = (
        "__weakref__",
        "_build",
        "_files",
        "_metrics",
        "_signature",
        "context",
        "section",
    )

    def __init__(
        self,
        section: str,
        files: dict[str, str],
        build: Callable[[], ssl.SSLContext],
        metrics: Metrics | None,
    ) -> None:
        self.section = section  # "listen.tls", "clusters.pay.tls": metric label and logs
        self._files = files  # role -> path
        self._build = build
        self._metrics = metrics
        self._signature = _signature(tuple(files.values()))
        self.context = build()  # at config load a failure is the caller's
        self._export_expiry()
        _LIVE.add(self)

    def refresh(self, force: bool = False) -> bool | None:
        """Rebuild the context if a file changed (or ``force``): True when swapped, False
        when the new files did not load (the old context stays), None when unchanged."""
        if not self._files:
            return None
        signature = _signature(tuple(self._files.values()))
        if not force and signature == self._signature:
            return None
        self._signature = signature
        try:
            context = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error(
                "%s: new certificate files do not load, keeping the previous ones: %s",
                self.section,
                exc,
            )
            if self._metrics is not None:
                self._metrics.tls_reload(False)
            return False
        self.context = context
        self._export_expiry()
        if self._metrics is not None:
            self._metrics.tls_reload(True)
        log.info("%s: certificate files reloaded", self.section)
        return True

    def _export_expiry(self) -> None:
        if self._metrics is None:
            return
        for role, path in self._files.items():
            if role == "key":
                continue
            try:
                expiry = min(c.not_valid_after_utc for c in _read_certs(path))
            except (OSError, ValueError):
                continue
            self._metrics.tls_expiry(self.section, role, path, expiry.timestamp())


class _Live(ssl.SSLContext):
    """The context a listener is created with: every new connection is wrapped by the
    ``Rotating``'s *current* context (asyncio's and uvloop's SSL protocols only call
    ``wrap_bio``; uvloop wants an ``SSLContext`` instance, hence the subclass)."""

    rotating: Rotating

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return self.rotating.context.wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )


def listener_context(rotating: Rotating) -> ssl.SSLContext:
    """The ``ssl=`` of a listener that follows ``rotating`` (and keeps it alive)."""
    live = _Live(ssl.PROTOCOL_TLS_SERVER)
    live.rotating = rotating
    return live


def refresh_all(force: bool = False) -> None:
    """Refresh every live context of this process (SIGHUP: ``force``)."""
    for rotating in list(_LIVE):
        rotating.refresh(force)


async def watch(interval: float) -> None:
    """Poll the certificate files of every live context every ``interval`` seconds."""
    while True:
        await asyncio.sleep(interval)
        refresh_all()


# -- building contexts ---------------------------------------------------------------------


def _client_context(spec: cfg.UpstreamTls) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname + CERT_REQUIRED
    ctx.minimum_version = _VERSIONS[spec.min_version]
    if spec.verify:
        if spec.ca_file is not None:
            ctx.load_verify_locations(cafile=spec.ca_file)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if spec.cert_file is not None and spec.key_file is not None:
        ctx.load_cert_chain(spec.cert_file, spec.key_file)
    ctx.set_alpn_protocols(list(ALPN))
    return ctx


def for_cluster(
    name: str, spec: cfg.Cluster, metrics: Metrics | None = None, *, warn: bool = True
) -> Rotating | None:
    """The client context of a cluster with ``https://`` endpoints (None for ``http://``);
    ``warn``: log the loud warning of ``verify: false`` (once per cluster and load)."""
    if not spec.endpoints[0].lower().startswith("https://"):
        return None
    tls = spec.tls if spec.tls is not None else cfg.UpstreamTls()
    section = f"clusters.{name}.tls"
    if not tls.verify and warn:
        log.warning(
            "%s.verify is false: the upstream's certificate is NOT checked, anyone on the "
            "path can read and change this cluster's traffic",
            section,
        )
    files = {}
    if tls.ca_file is not None and tls.verify:
        files["ca"] = tls.ca_file
    if tls.cert_file is not None and tls.key_file is not None:
        files["cert"] = tls.cert_file
        files["key"] = tls.key_file
    return Rotating(section, files, lambda: _client_context(tls), metrics)


def _server_context(spec: cfg.ListenerTls) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[spec.min_version]
    ctx.load_cert_chain(spec.cert_file, spec.key_file)
    if spec.client_ca_file is not None:
        ctx.load_verify_locations(cafile=spec.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(list(ALPN))
    return ctx


def for_listener(section: str, spec: cfg.ListenerTls, metrics: Metrics | None = None) -> Rotating:
    files = {"cert": spec.cert_file, "key": spec.key_file}
    if spec.client_ca_file is not None:
        files["client_ca"] = spec.client_ca_file
    return Rotating(section, files, lambda: _server_context(spec), metrics)


class _Resuming:
    """Stands in for the cluster's ``SSLContext`` in ``create_connection`` to offer a
    saved session: both asyncio's and uvloop's SSL protocols only call ``wrap_bio`` on the
    context, which has no other way to take a session."""

    __slots__ = ("_ctx", "_session")

    def __init__(self, ctx: ssl.SSLContext, session: ssl.SSLSession) -> None:
        self._ctx = ctx
        self._session = session

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return self._ctx.wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=self._session,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


def connect_context(ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> ssl.SSLContext:
    """What to pass as ``ssl=`` to ``create_connection``: ``ctx`` itself, or a stand-in
    offering ``session`` for resumption."""
    if session is None:
        return ctx
    return _Resuming(ctx, session)  # type: ignore[return-value]  # duck-typed for wrap_bio


# -- errors ----------------------------------------------------------------------------------


def map_error(exc: BaseException, handshake: bool = False) -> errors.UpstreamError | None:
    """The ``errors`` type of a TLS failure with an upstream; None if ``exc`` is not one
    (the caller maps it as a plain connection error). ``handshake``: ``exc`` ended a TLS
    handshake on a connected socket, where a reset is the peer refusing the handshake
    (e.g. no common TLS version). The message names no address."""
    if handshake and isinstance(exc, ConnectionResetError | ConnectionAbortedError):
        return errors.TlsHandshakeFailed(
            f"the upstream closed the connection during the TLS handshake: {exc}"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = getattr(exc, "verify_message", None) or _reason(exc)
        return errors.TlsVerifyFailed(f"upstream certificate not trusted: {detail}")
    if isinstance(exc, ssl.SSLError):
        return errors.TlsHandshakeFailed(f"TLS handshake with the upstream failed: {_reason(exc)}")
    return None


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason slug (``WRONG_VERSION_NUMBER``), else the message."""
    return getattr(exc, "reason", None) or str(exc)


# -- checking files ----------------------------------------------------------------------------


def _read_certs(path: str) -> list[x509.Certificate]:
    # Imported here: cryptography is ~11 MiB of every process's memory, needed only when a
    # config names certificate files.
    from cryptography import x509

    with open(path, "rb") as f:
        data = f.read()
    certs = x509.load_pem_x509_certificates(data)
    if not certs:  # pragma: no cover - cryptography raises on none
        raise ValueError("no certificate in the file")
    return certs


def _sections(config: cfg.Config) -> list[tuple[str, dict[str, str], bool]]:
    """(field path, role -> (field, path), whether cert+key must pair) per TLS section."""
    out: list[tuple[str, dict[str, str], bool]] = []
    for at, spec in (("$.listen.tls", config.listen.tls), ("$.admin.tls", config.admin.tls)):
        if spec is not None:
            files = {"cert_file": spec.cert_file, "key_file": spec.key_file}
            if spec.client_ca_file is not None:
                files["client_ca_file"] = spec.client_ca_file
            out.append((at, files, True))
    for name, cluster in config.clusters.items():
        up = cluster.tls
        if up is None:
            continue
        files = {}
        if up.ca_file is not None:
            files["ca_file"] = up.ca_file
        if up.cert_file is not None and up.key_file is not None:
            files["cert_file"] = up.cert_file
            files["key_file"] = up.key_file
        out.append((f"$.clusters.{name}.tls", files, up.cert_file is not None))
    return out


def check_files(
    config: cfg.Config, now: datetime | None = None
) -> tuple[list[cfg.FieldError], list[str]]:
    """Problems with the TLS files a config names (errors, with field paths) and
    certificates close to expiry (warnings)."""
    problems: list[cfg.FieldError] = []
    warnings: list[str] = []
    when = now or datetime.now(UTC)
    for at, files, paired in _sections(config):
        readable = True
        for field, path in files.items():
            where = f"{at}.{field}"
            if not os.path.isfile(path):
                problems.append(cfg.FieldError(where, f"no such file: {path}"))
                readable = False
                continue
            if field == "key_file":
                continue
            try:
                certs = _read_certs(path)
            except OSError as exc:
                problems.append(cfg.FieldError(where, f"cannot read {path}: {exc.strerror}"))
                readable = False
                continue
            except ValueError as exc:
                problems.append(cfg.FieldError(where, f"{path} is not a PEM certificate: {exc}"))
                readable = False
                continue
            for cert in certs if field.endswith("ca_file") else certs[:1]:
                left = (cert.not_valid_after_utc - when).total_seconds()
                subject = cert.subject.rfc4514_string() or "(no subject)"
                if left <= 0:  # a warning as in Envoy and NGINX: rotation may be under way
                    warnings.append(f"{where}: {path}: certificate {subject} has EXPIRED")
                elif left < EXPIRY_WARNING_SECONDS:
                    warnings.append(
                        f"{where}: {path}: certificate {subject} expires in "
                        f"{left / 86400:.1f} days ({cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z)"
                    )
        if paired and readable:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                ctx.load_cert_chain(files["cert_file"], files["key_file"])
            except ssl.SSLError as exc:
                detail = _reason(exc)
                if "KEY_VALUES_MISMATCH" in str(exc).upper():
                    detail = "the key does not match the certificate"
                problems.append(cfg.FieldError(f"{at}.key_file", f"does not load: {detail}"))
            except OSError as exc:
                problems.append(cfg.FieldError(f"{at}.key_file", f"cannot read: {exc.strerror}"))
    return problems, warnings
