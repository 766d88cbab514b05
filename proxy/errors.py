"""Every error Jalur answers with, and the one place foreign exceptions become them.

The tree (status code, Envoy response flag, metric ``kind``)::

    ProxyError
    ├── RequestError                 the client's request cannot be served as sent
    │   ├── BadRequest          400  malformed or ambiguous request (bad path, bad header)
    │   ├── NoRoute             404  NR   no route matches
    │   ├── BodyTooLarge        413       the request body is over the route's limit
    │   └── BodyTimeout         408       no request body byte for ``listen.body_idle_timeout``
    │       └── BodyDeadline    408       the body not complete within ``listen.body_timeout``
    ├── PolicyError                  refused by a policy before anything was sent upstream
    │   ├── NoHealthyUpstream   503  UH   no endpoint may take the request now
    │   └── Overflow            503  UO   the cluster's circuit breaker is open (too many requests)
    └── UpstreamError                the upstream exchange failed; ``kind`` labels metrics
        ├── ConnectFailed       502  UF   connect refused, unreachable, DNS failure
        │   ├── ConnectRefused  502  UF   the endpoint actively refused the connection
        │   └── TlsHandshakeFailed 502 UF  the TLS handshake failed (``reason: tls_handshake``)
        │       └── TlsVerifyFailed 502 UF the upstream's certificate is not trusted:
        │                                  unknown CA, wrong name, expired (``tls_verify``)
        ├── ConnectTimeout      504  UF   TCP connect did not finish in time
        ├── ResponseTimeout     504  UT   no response head (or a body chunk) in time
        ├── UpstreamReset       502  UC   upstream closed or reset before its response head
        └── UpstreamProtocolError 502 UPE upstream sent something that is not HTTP/1.1
            └── InvalidUpgrade  502 UPE  a ``101`` that does not answer the upgrade asked
                                         (wrong token, bad ``Sec-WebSocket-Accept``, a
                                         subprotocol not offered; ``kind: upgrade``)

Every ``UpstreamError`` says how much of the request reached the socket:
``request_bytes_sent`` is ``0`` when the transport knows no byte was written (connect
failures always), a positive count when it knows some were, and ``None`` when it cannot
tell. ``None`` is treated as "the upstream may have received it", so a non-idempotent
request is then never retried (see ``retry``).

What a client is told is the class's ``public`` text and ``kind`` with the request id; the
``message`` (which may name an upstream address, an errno or a parser detail) goes only to
the log, under the same request id.

Foreign exceptions become this tree at the transport boundary only: ``h1transport`` (its
socket and parser errors) and ``upstream.map_connect_error`` (connect and TLS failures, also
for ``tunnel``); the rest of the proxy sees only this tree. An error that happens after the
response head was sent to the client is not answered at all: the client connection is
aborted (see ``relay``), because a 502 page inside a 200 would be a lie.
"""

from __future__ import annotations

from typing import ClassVar


class ProxyError(Exception):
    status: ClassVar[int] = 500
    flag: ClassVar[str] = "-"  # Envoy-style response flag for the access log
    kind: ClassVar[str] = "internal"  # bounded metric label
    # What the client is told: the kind of failure, never an address or errno.
    public: ClassVar[str] = "internal proxy error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestError(ProxyError):
    status = 400


class BadRequest(RequestError):
    status = 400
    flag = "DPE"
    kind = "bad_request"

    def __init__(self, message: str, reason: str = "bad_request") -> None:
        super().__init__(message)
        self.reason = reason


class NoRoute(RequestError):
    status = 404
    flag = "NR"
    kind = "no_route"


class BodyTooLarge(RequestError):
    status = 413
    flag = "DPE"
    kind = "body_too_large"


class BodyTimeout(RequestError):
    status = 408
    flag = "DPE"
    kind = "body_timeout"


class BodyDeadline(BodyTimeout):
    """The body was still arriving when ``listen.body_timeout`` ran out (a client dripping
    bytes, unlike a stalled one, keeps sending after the answer)."""


class PolicyError(ProxyError):
    status = 503


class NoHealthyUpstream(PolicyError):
    status = 503
    flag = "UH"
    kind = "no_healthy_upstream"
    public = "no healthy upstream endpoint"


class Overflow(PolicyError):
    status = 503
    flag = "UO"
    kind = "overflow"
    public = "upstream cluster at its request limit"


class UpstreamError(ProxyError):
    status = 502
    flag = "UF"
    kind = "upstream"
    public = "upstream request failed"
    # Bytes of the request handed to the upstream socket before the failure: 0 = none (safe
    # to send again whatever the method), None = unknown (assume the upstream got it).
    # A transport may set it on the instance.
    request_bytes_sent: int | None = None

    def __init__(self, message: str, *, request_bytes_sent: int | None = None) -> None:
        super().__init__(message)
        if request_bytes_sent is not None:
            self.request_bytes_sent = request_bytes_sent


class ConnectFailed(UpstreamError):
    status = 502
    flag = "UF"
    kind = "connect"
    public = "upstream connect failed"
    request_bytes_sent = 0


class ConnectRefused(ConnectFailed):
    """The endpoint answered the TCP connect with a reset (nothing listens there)."""

    public = "upstream refused the connection"


class TlsHandshakeFailed(ConnectFailed):
    """TCP connected but TLS did not come up (protocol or version mismatch, the upstream
    refused our client certificate or wanted one). Never retried with a weaker context:
    retries stay in the cluster, which has one context (``tls``)."""

    kind = "tls_handshake"


class TlsVerifyFailed(TlsHandshakeFailed):
    """The upstream's certificate failed verification (unknown CA, wrong name, expired)."""

    kind = "tls_verify"


class ConnectTimeout(UpstreamError):
    status = 504
    flag = "UF"
    kind = "connect_timeout"
    public = "upstream connect timed out"
    request_bytes_sent = 0


class ResponseTimeout(UpstreamError):
    status = 504
    flag = "UT"
    kind = "timeout"
    public = "upstream did not answer in time"


class UpstreamReset(UpstreamError):
    status = 502
    flag = "UC"
    kind = "reset"
    public = "upstream closed the connection"


class UpstreamProtocolError(UpstreamError):
    status = 502
    flag = "UPE"
    kind = "protocol"
    public = "upstream sent an invalid response"


class InvalidUpgrade(UpstreamProtocolError):
    """The upstream switched protocols, but not as asked (see ``tunnel``): its ``101`` is
    not relayed and nothing is tunnelled."""

    kind = "upgrade"
    public = "upstream sent an invalid protocol switch"
