"""Typed configuration: YAML -> frozen msgspec Structs, env overrides, validation.

Everything that can be checked without traffic is checked here, and every problem is
reported with its field path (``$.routes[3].split[0].cluster``) and, where the YAML
tells us, the line it is on. ``load`` either returns a whole valid ``Config`` or raises
``ConfigError`` carrying *every* error found, never just the first.

Decoding is declarative (msgspec, ``forbid_unknown_fields``); the cross-references that a
schema cannot express (a route naming an unknown cluster, a cluster of an unknown system,
two routes with one name, an endpoint that is not an ``http://host:port`` URL) are checked
afterwards in ``_check_references``.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
import yaml
from yarl import URL

__all__ = [
    "Admin",
    "AuditKey",
    "Backoff",
    "Boundary",
    "Cluster",
    "Compliance",
    "Config",
    "ConfigError",
    "Consent",
    "CrossIdentity",
    "Drain",
    "FieldError",
    "HashOn",
    "HeaderMatch",
    "HealthCheck",
    "LbPolicy",
    "Listen",
    "ListenerTls",
    "Match",
    "Migration",
    "OutlierDetection",
    "Owns",
    "RateBucket",
    "RateLimit",
    "Retry",
    "RetryCondition",
    "Route",
    "SplitTarget",
    "Sticky",
    "System",
    "Timeouts",
    "TlsVersion",
    "Tracing",
    "Upgrade",
    "UpstreamTls",
    "load",
    "parse",
]

ENV_PREFIX: Final = "JALUR_"
# Separator between path segments in an override variable: JALUR_LISTEN__PORT=8081.
ENV_SEPARATOR: Final = "__"
# Prefix of the load tests' own variables (loadtests/): never a config override.
ENV_LOADTEST_PREFIX: Final = "JALUR_LOADTEST_"

Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]
Weight = Annotated[int, msgspec.Meta(ge=0, le=10000)]
Method = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{1,20}$")]
HeaderName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")]
CookieName = HeaderName  # RFC 6265 cookie-name is an RFC 9110 token, like a field name


class _Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Every config object: immutable, hashable, unknown keys are errors."""


# Oldest TLS version a connection may use (TLS 1.0 and 1.1 are deprecated by RFC 8996).
TlsVersion = Literal["TLSv1.2", "TLSv1.3"]
# A file path (certificate, key, CA bundle), relative to the working directory.
FilePath = Annotated[str, msgspec.Meta(min_length=1)]


class ListenerTls(_Base, frozen=True):
    """TLS on a listener (data or admin). The files are re-read when they change on disk
    and on SIGHUP (``tls.Rotating``); a bad new pair keeps the old one."""

    # PEM certificate chain the listener presents (leaf first).
    cert_file: FilePath
    # PEM private key of that certificate (unencrypted).
    key_file: FilePath
    # PEM CA bundle: when set, every client must present a certificate it signed (mTLS).
    client_ca_file: FilePath | None = None
    min_version: TlsVersion = "TLSv1.2"


class UpstreamTls(_Base, frozen=True):
    """TLS to a cluster's ``https://`` endpoints (Envoy's ``UpstreamTlsContext``, NGINX's
    ``proxy_ssl_*``). One context per cluster, built at config load."""

    # PEM CA bundle the upstream's chain is verified against; unset: the system trust store.
    ca_file: FilePath | None = None
    # Name sent as SNI and verified in the upstream's certificate; unset: the endpoint's host.
    server_name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9.:*-]{1,253}$")] | None = None
    # Client certificate chain and key presented to the upstream (mutual TLS); both or none.
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    min_version: TlsVersion = "TLSv1.2"
    # false turns off chain and name verification: anyone on the path can read and change
    # the traffic. Logged loudly, and refused for a cluster serving a transaction category.
    verify: bool = True

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS needs both)")


class Listen(_Base, frozen=True):
    host: str = "0.0.0.0"
    port: Port = 8080
    # Seconds a client may take to send a complete request head; protects the listener
    # from slow-header (slowloris) clients holding connections open.
    header_read_timeout: Seconds = 10.0
    # Seconds an idle keep-alive connection is kept open between requests.
    keepalive_timeout: Seconds = 75.0
    # Longest request line / single header line the parser accepts (bytes).
    max_line_size: Annotated[int, msgspec.Meta(ge=1024, le=65536)] = 8190
    max_field_size: Annotated[int, msgspec.Meta(ge=1024, le=65536)] = 8190
    # Most header fields in one request (431-style refusal beyond, answered 400).
    max_headers: Annotated[int, msgspec.Meta(ge=8, le=1024)] = 100
    # Open client connections per process; beyond it new connections are closed at once
    # (bounds file descriptors and memory under a connection flood).
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000
    # Requests served on one connection before it is closed (spreads load after scaling).
    max_requests_per_connection: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    # Connections the kernel queues before Jalur accepts them (listen(2) backlog, NGINX's
    # 511); a connection burst beyond it is dropped by the kernel before Jalur sees it.
    backlog: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 511
    # Pipelined requests parsed ahead of the one being served; reading pauses beyond it.
    max_pipelined: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    # Seconds without a byte of request body before the request is cut (408).
    body_idle_timeout: Seconds = 30.0
    # Seconds from the request head to the last byte of its body (408 beyond): a client
    # dripping a byte just inside body_idle_timeout cannot hold a request open for ever.
    body_timeout: Seconds = 300.0
    # A request body up to this size (by Content-Length, or a chunked body that ends within
    # it) is read whole before an upstream connection is taken (NGINX's
    # proxy_request_buffering): slow uploads then hold no upstream connection. Larger
    # bodies stream. Per route: routes[].buffer_body_bytes; 0 turns buffering off.
    buffer_body_bytes: Annotated[int, msgspec.Meta(ge=0, le=16 * 1024 * 1024)] = 64 * 1024
    # Largest request head (request line and every header field together); beyond it the
    # client is answered 431 and disconnected. Bounds memory per connection whatever
    # max_headers x max_field_size allow (Envoy: 60 KiB; NGINX: 4 x 8 KiB).
    max_head_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1024 * 1024)] = 64 * 1024
    # Largest request body on any route unless the route sets max_body_bytes (413 beyond).
    max_body_bytes: Annotated[int, msgspec.Meta(ge=0)] = 1024 * 1024 * 1024
    # Serve HTTPS instead of plain HTTP (optional: a sidecar often gets plain loopback).
    tls: ListenerTls | None = None
    # ``Server`` header on Jalur's own answers (errors, and relayed answers whose back end
    # sent none); unset: none, so no version banner tells a prober what to attack.
    server_header: Annotated[str, msgspec.Meta(pattern=r"^[!-~][ -~]{0,127}$")] | None = None

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(
                f"host {self.host!r} must be an IP address (0.0.0.0 or :: for every "
                "interface): a name could resolve to several addresses, one socket binds one"
            ) from None


class Admin(_Base, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 9901
    # Bearer token for mutating admin calls; unset means they are refused.
    token: str | None = None
    # Serve the admin listener over HTTPS (its own certificate; client_ca_file for mTLS).
    tls: ListenerTls | None = None


class Reload(_Base, frozen=True):
    # Re-read the config when the file (or the ConfigMap symlink it resolves through)
    # changes; checked every `interval` seconds. SIGHUP always reloads.
    watch: bool = True
    interval: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 2.0


class Drain(_Base, frozen=True):
    delay: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 5.0
    timeout: Seconds = 25.0


class Owns(_Base, frozen=True):
    cookies: list[CookieName] = []
    headers: list[HeaderName] = []


class System(_Base, frozen=True):
    kind: Literal["social", "commerce"]
    owns: Owns = Owns()


class Timeouts(_Base, frozen=True):
    # Seconds to establish a TCP connection to an endpoint.
    connect: Seconds = 2.0
    # Seconds from sending the request until the upstream response head has arrived.
    response_headers: Seconds = 15.0
    # Seconds of silence allowed between two body reads, either direction.
    idle: Seconds = 60.0


# How a cluster spreads requests over its endpoints (``balancer.BALANCERS``).
LbPolicy = Literal["round_robin", "least_request", "random", "hash"]
# What makes a failed attempt worth another (``retry``): the connect failed (any reason),
# was refused, the connection died before a byte of the request was written, died after
# the request was written but before the response head, or no head came in time.
RetryCondition = Literal["connect-failure", "refused", "reset-before-request", "reset", "timeout"]
# An upstream response status that is retried instead of relayed.
RetryStatus = Annotated[int, msgspec.Meta(ge=500, le=599)]


class HashOn(_Base, frozen=True):
    """The request key of ``lb_policy: hash``: one header or one cookie."""

    header: HeaderName | None = None
    cookie: CookieName | None = None

    def __post_init__(self) -> None:
        if (self.header is None) == (self.cookie is None):
            raise ValueError("hash_on needs exactly one of `header` or `cookie`")


class HealthCheck(_Base, frozen=True):
    """Active health checking: ``GET path`` on every endpoint every ``interval``."""

    # Request target of the check; a 2xx answer passes, anything else fails.
    path: Annotated[str, msgspec.Meta(pattern=r"^/[!-~]*$")] = "/healthz"
    # Seconds between two checks of one endpoint (each spread by +/- ``jitter``).
    interval: Seconds = 5.0
    # Seconds a check may take (connect, head and body) before it counts as failed.
    timeout: Seconds = 1.0
    # Consecutive passes that bring an unhealthy endpoint back.
    healthy_threshold: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    # Consecutive failures that take a healthy (or ejected) endpoint out.
    unhealthy_threshold: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    # Fraction of ``interval`` by which each wait is randomly shortened or lengthened.
    jitter: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.1


class OutlierDetection(_Base, frozen=True):
    """Passive ejection of endpoints that keep failing real requests."""

    # 5xx responses or failed exchanges (reset, timeout, protocol, connect) in a row that
    # eject an endpoint; 0 turns it off.
    consecutive_5xx: Annotated[int, msgspec.Meta(ge=0, le=10000)] = 5
    # Failed connects (refused, unreachable, timed out) in a row that eject; 0: off.
    consecutive_connect_failures: Annotated[int, msgspec.Meta(ge=0, le=10000)] = 3
    # First ejection lasts this long; the n-th ejection n times as long, up to the max.
    base_ejection_time: Seconds = 30.0
    max_ejection_time: Seconds = 300.0
    # At most this share of the cluster's endpoints is ejected at once (rounded down, so
    # a one-endpoint cluster is never ejected).
    max_ejection_percent: Annotated[int, msgspec.Meta(ge=0, le=100)] = 50

    def __post_init__(self) -> None:
        if self.max_ejection_time < self.base_ejection_time:
            raise ValueError("max_ejection_time must be at least base_ejection_time")


class Backoff(_Base, frozen=True):
    # Wait before retry n is random in [0, min(max, base * 2**(n-1))] seconds.
    base: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.025
    max: Annotated[float, msgspec.Meta(gt=0, le=300)] = 0.25

    def __post_init__(self) -> None:
        if self.max < self.base:
            raise ValueError("backoff max must be at least base")


class Retry(_Base, frozen=True):
    """When Jalur sends a failed request again (always within the same cluster)."""

    # Tries in all, the first included; 1 turns retries off.
    attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 2
    # Conditions and upstream statuses that are retried (``on`` would read as a YAML
    # boolean, hence Envoy's name).
    retry_on: list[RetryCondition | RetryStatus] = msgspec.field(
        default_factory=lambda: ["connect-failure", "refused", "reset-before-request"]
    )
    # Seconds one try may wait for its response head (default: timeouts.response_headers).
    per_try_timeout: Seconds | None = None
    backoff: Backoff = Backoff()
    # Retries in flight at once may be this share of the cluster's active requests ...
    budget_percent: Annotated[float, msgspec.Meta(ge=0, le=100)] = 20.0
    # ... but at least this many.
    min_retry_concurrency: Annotated[int, msgspec.Meta(ge=0, le=100000)] = 3
    # A retryable request body up to this size is kept in memory so it can be sent again;
    # a larger one is streamed and then not retried (unless no byte of it was sent).
    buffer_bytes: Annotated[int, msgspec.Meta(ge=0, le=16 * 1024 * 1024)] = 64 * 1024


class Upgrade(_Base, frozen=True):
    """Upgraded connections (WebSocket) to this cluster: after the upstream's validated
    ``101`` the two sockets are joined as a byte tunnel (docs/websocket.md)."""

    # Seconds without a byte in either direction before both connections are closed.
    # Envoy applies its stream idle timeout (5 min) to an upgraded stream; live-stream
    # clients ping well within it, and a dead peer behind a silent NAT is still reclaimed.
    idle_timeout: Seconds = 300.0
    # Bytes in both directions together after which the tunnel is cut; unset: no limit
    # (as Envoy and NGINX). Bounds what one upgraded connection may move in its lifetime.
    max_bytes: Annotated[int, msgspec.Meta(ge=1)] | None = None


class Cluster(_Base, frozen=True):
    system: Name
    endpoints: Annotated[list[str], msgspec.Meta(min_length=1)]
    timeouts: Timeouts = Timeouts()
    # Pooled upstream connections per cluster (all endpoints together).
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 1024
    # Circuit breaking: requests waiting for a connection beyond ``max_connections`` ...
    max_pending: Annotated[int, msgspec.Meta(ge=0, le=100000)] = 1024
    # ... and requests in flight to the cluster at once; beyond either: 503 (flag UO).
    max_requests: Annotated[int, msgspec.Meta(ge=1, le=1000000)] = 1024
    # Seconds an idle pooled connection is kept; below common upstream idle timeouts
    # (60-75 s) so a reused connection is rarely one the upstream is just closing.
    keepalive_idle_timeout: Seconds = 15.0
    lb_policy: LbPolicy = "round_robin"
    # The request key for ``lb_policy: hash`` (required with it, refused without it).
    hash_on: HashOn | None = None
    health_check: HealthCheck | None = None
    outlier_detection: OutlierDetection = OutlierDetection()
    retry: Retry = Retry()
    # A sandbox cluster has no real side effects: it may receive shadow copies of
    # non-idempotent requests (POST/PATCH); other clusters only get safe methods.
    sandbox: bool = False
    # TLS settings for ``https://`` endpoints (defaults apply when unset: system trust
    # store, SNI and verified name = the endpoint's host, TLS 1.2 or newer).
    tls: UpstreamTls | None = None
    # WebSocket and other upgrades to this cluster: idle timeout and byte limit.
    upgrade: Upgrade = Upgrade()

    def __post_init__(self) -> None:
        if (self.lb_policy == "hash") != (self.hash_on is not None):
            raise ValueError("`hash_on` is required with lb_policy hash and only with it")


class HeaderMatch(_Base, frozen=True):
    name: HeaderName
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None
    present: bool | None = None
    invert: bool = False


class Match(_Base, frozen=True):
    prefix: str | None = None
    exact: str | None = None
    regex: str | None = None
    methods: list[Method] | None = None
    host: str | None = None
    headers: list[HeaderMatch] = []
    case_sensitive: bool = True


class SplitTarget(_Base, frozen=True):
    cluster: Name
    weight: Weight


class Sticky(_Base, frozen=True):
    header: HeaderName | None = None
    cookie: str | None = None


class Shadow(_Base, frozen=True):
    """Copy a share of a route's requests to another cluster; its answer is compared with
    the real one and never returned."""

    cluster: Name
    # Share of the route's requests copied, in percent.
    percent: Annotated[float, msgspec.Meta(ge=0, le=100)] = 100.0
    # Compare a SHA-256 of both bodies as well as the status (costs hashing the response).
    compare_body: bool = False
    # Largest request body copied; a request with a larger body is not shadowed.
    max_body_bytes: Annotated[int, msgspec.Meta(ge=0, le=16 * 1024 * 1024)] = 64 * 1024


class IdempotencyPolicy(_Base, frozen=True):
    """Per route: how POST/PATCH with ``Idempotency-Key`` are deduplicated. Transaction
    routes of category ``payment`` get the defaults when they do not say otherwise."""

    enabled: bool = True
    # A POST/PATCH without Idempotency-Key is refused (400). Off by default: the shopper's
    # app must not have to change for Jalur to be deployed; keys are honoured when sent.
    require: bool = False
    # How long a completed response is kept for replay (seconds; default 24 h).
    ttl: Annotated[float, msgspec.Meta(ge=1, le=7 * 86400)] = 86400.0
    # Largest request body read to fingerprint the request (413 beyond).
    max_body_bytes: Annotated[int, msgspec.Meta(ge=0, le=64 * 1024 * 1024)] = 1024 * 1024
    # Largest response kept for replay; a larger one is remembered as done but cannot be
    # replayed (a repeat gets 409, never a second execution).
    max_response_bytes: Annotated[int, msgspec.Meta(ge=0, le=64 * 1024 * 1024)] = 1024 * 1024
    # A repeat while the first is in flight waits for it (up to wait_timeout) instead of 409.
    wait_in_flight: bool = False
    wait_timeout: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0
    # The back end deduplicates Idempotency-Key itself: only then may Jalur retry a keyed
    # request after a byte of it reached an upstream (else a retry could execute it twice).
    upstream_dedupes: bool = False


class RateBucket(_Base, frozen=True):
    """A token bucket: ``burst`` requests at once, refilled at ``rate`` per second."""

    # Tokens added per second (the sustained requests per second allowed).
    rate: Annotated[float, msgspec.Meta(gt=0, le=1_000_000)]
    # Bucket size: requests allowed at once after a quiet spell (at least 1).
    burst: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)]


class RateLimit(_Base, frozen=True):
    """A route's rate limits (``proxy/ratelimit.py``); a request must find a token in each
    bucket that is set, else 429."""

    # One bucket for the whole route.
    route: RateBucket | None = None
    # One bucket per user key: the route's identity as the idempotency scope reads it (the
    # headers and cookies its target systems own, plus Authorization), else the client address.
    user: RateBucket | None = None
    # local: buckets in each process (N workers x M replicas allow N*M times the rate);
    # fleet: one bucket for every worker and replica, in the shared store (store.kind redis).
    scope: Literal["local", "fleet"] = "local"

    def __post_init__(self) -> None:
        if self.route is None and self.user is None:
            raise ValueError("rate_limit needs `route`, `user` or both")


class Route(_Base, frozen=True):
    name: Name
    match: Match
    category: Name
    to: Name | None = None
    split: list[SplitTarget] | None = None
    sticky: Sticky | None = None
    shadow: Shadow | None = None
    idempotency: IdempotencyPolicy | None = None
    # The split's weights in this file win even where they give commerce a smaller share
    # than the live ones (an explicit, audited rollback); otherwise a reload never moves a
    # shopper back to the legacy side (docs/migration.md).
    split_rollback: bool = False
    # Largest request body on this route (413 beyond); None: ``listen.max_body_bytes``.
    max_body_bytes: Annotated[int, msgspec.Meta(ge=0)] | None = None
    # Bodies up to this size are read whole before an upstream connection is taken;
    # None: ``listen.buffer_body_bytes``; 0: always stream.
    buffer_body_bytes: Annotated[int, msgspec.Meta(ge=0, le=16 * 1024 * 1024)] | None = None
    # Seconds from the request's arrival until the upstream response head, every retry and
    # backoff included; beyond it 504 ``route_timeout``. None: only the clusters' timeouts.
    timeout: Seconds | None = None
    # Replaces the ``retry`` block of every cluster this route sends to (the cluster's retry
    # budget still applies); None: each cluster's own.
    retry: Retry | None = None
    # Token-bucket rate limits (429 beyond); None: no limit.
    rate_limit: RateLimit | None = None


class Audit(_Base, frozen=True):
    # Audit log file (JSON lines); "-" writes to stderr.
    path: str = "jalur-audit.log"
    # Rotate when the file reaches this size; keep this many rotated files.
    max_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 64 * 1024 * 1024
    backups: Annotated[int, msgspec.Meta(ge=0, le=100)] = 5
    # Records queued for the writer thread; bounds memory if the disk stalls.
    queue_size: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000
    on_overflow: Literal["block", "drop"] = "block"
    flush_interval: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0


class AuditKey(_Base, frozen=True):
    # HMAC-SHA256 key sealing the audit trail's segments (proxy/audit.py): without it a
    # trail cannot be shown untouched. Only from the environment (JALUR_AUDIT__KEY), never
    # in the file: a key in the ConfigMap would be readable by whoever can rewrite the trail.
    key: Annotated[str, msgspec.Meta(min_length=16)] | None = None


class Compliance(_Base, frozen=True):
    transaction_categories: list[Name] = msgspec.field(
        default_factory=lambda: ["payment", "user-data", "merchant"]
    )
    transition_until: datetime | None = None
    # Clusters of a social system that may still carry a transaction share until
    # ``transition_until``.
    legacy_clusters: list[Name] = []
    audit: Audit = Audit()


class CrossIdentity(_Base, frozen=True):
    """A header carrying one system's user identity that another system may receive only
    with the user's consent (e.g. the social user id passed to commerce)."""

    header: HeaderName
    from_system: Name
    to_system: Name
    scope: Name


class Consent(_Base, frozen=True):
    # HMAC-SHA256 key for consent tokens (set it from the environment:
    # JALUR_BOUNDARY__CONSENT__KEY). Without a key no cross-system identity is forwarded.
    key: Annotated[str, msgspec.Meta(min_length=16)] | None = None
    header: HeaderName = "x-jalur-consent"
    identities: list[CrossIdentity] = []


# Request headers that tell a back end who the client is or which URL / method to serve
# instead of the request line's. Removed before forwarding unless named in
# ``boundary.forwarding.pass_headers``: a client sets them at will.
FORWARDING_HEADERS: Final = (
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    # Spring's ForwardedHeaderFilter, Symfony and Rails build URLs (and Spring its path) from
    # these; Jalur sets X-Forwarded-For/Proto/Host itself.
    "x-forwarded-prefix",
    "x-forwarded-port",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "x-forwarded-server",
)


class Forwarding(_Base, frozen=True):
    # Proxies in front of Jalur whose X-Forwarded-For entries are kept, as Envoy's
    # xff_num_trusted_hops: the last N entries a client sent stay, then the peer address is
    # appended. 0 (the default): the peer address replaces whatever the client sent.
    xff_num_trusted_hops: Annotated[int, msgspec.Meta(ge=0, le=16)] = 0
    # Headers of FORWARDING_HEADERS (Forwarded, X-Real-IP, True-Client-IP, X-Original-URL,
    # X-Rewrite-URL, X-HTTP-Method-Override, X-HTTP-Method, X-Method-Override,
    # X-Forwarded-Prefix/Port/Ssl/Scheme/Server) to forward anyway, e.g. X-Real-IP set by a
    # trusted load balancer in front of Jalur.
    pass_headers: list[HeaderName] = []


class Boundary(_Base, frozen=True):
    # What to do with a request header whose name contains "_" (X_TT_User): some back ends
    # read it as "-" and it would slip past the owned-header rules.
    underscore_headers: Literal["reject", "drop"] = "reject"
    # What to do with a request header whose name has a character other than letters,
    # digits, "-" and "_" (X-Shop.User): PHP reads it as HTTP_X_SHOP_USER, past the
    # owned-header rules. reject: 400; drop: removed before forwarding.
    header_names: Literal["reject", "drop"] = "reject"
    forwarding: Forwarding = Forwarding()
    consent: Consent = Consent()


class Store(_Base, frozen=True):
    """The fleet's shared state: idempotency records and locks."""

    # memory: this process only (refused with --workers N > 1); redis: shared by every
    # worker and replica. Production needs redis with maxmemory-policy noeviction and
    # appendonly yes (docs/payments.md).
    kind: Literal["memory", "redis"] = "memory"
    # redis:// or rediss:// URL; put the password in the environment (JALUR_STORE__URL).
    url: str = "redis://127.0.0.1:6379/0"
    # Seconds one store call may take before the request is refused (503, fail closed).
    timeout: Annotated[float, msgspec.Meta(gt=0, le=30)] = 1.0
    # Memory store bounds: records are never evicted before their ttl; when a bound is
    # reached new keys get 503 idempotency_store_full until records expire.
    max_entries: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024 * 1024
    # Records one identity may hold at once (without identity: one client address, where
    # boundary.forwarding.xff_num_trusted_hops tells it; else only the global bounds).
    max_entries_per_identity: Annotated[int, msgspec.Meta(ge=1)] = 1_000
    # Seconds after a redis store is seen to have lost its data (restarted without
    # persistence) during which keys not found are answered "outcome unknown" instead of
    # forwarded: a payment in flight across the loss is not executed twice.
    lost_data_quarantine: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 60.0
    # Seconds an in-flight lock outlives the last renewal by its proxy (renewed every
    # lease_ttl / 5 while the request runs): after its proxy died, repeats get 409 for up to
    # this long, then "outcome unknown" until the key's ttl. Never a second execution.
    lease_ttl: Annotated[float, msgspec.Meta(ge=0.5, le=600)] = 15.0


class Migration(_Base, frozen=True):
    # Weight of each category in the total migration-progress figure.
    weights: dict[Name, Annotated[float, msgspec.Meta(ge=0)]] = msgspec.field(
        default_factory=lambda: {"payment": 0.6, "user-data": 0.2, "merchant": 0.2}
    )
    # Sliding window (seconds) over which progress and observed shares are measured.
    window: Annotated[float, msgspec.Meta(ge=10, le=86400)] = 300.0
    # Shadow copies in flight at once per process; beyond it copies are dropped (counted).
    max_shadow_in_flight: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 64


class Metrics(_Base, frozen=True):
    # Histogram bucket upper bounds in seconds (request duration, upstream response);
    # the default is OpenTelemetry's. Strictly increasing, finite.
    buckets: Annotated[
        tuple[Annotated[float, msgspec.Meta(gt=0, le=86400)], ...],
        msgspec.Meta(min_length=1, max_length=64),
    ] = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

    def __post_init__(self) -> None:
        if any(a >= b for a, b in zip(self.buckets, self.buckets[1:], strict=False)):
            raise ValueError("buckets must be strictly increasing")


class AccessLog(_Base, frozen=True):
    enabled: bool = True
    # Share of requests logged (0.01 = about 1 %); responses >= 500 are always logged.
    sample: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    # JSON lines destination: "-" is stdout, anything else a file appended to.
    path: str = "-"
    # Lines waiting for the writer thread; past this, lines are dropped and counted.
    buffer_lines: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 65536
    # Seconds between hand-offs of buffered lines to the writer thread.
    flush_interval: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.1


# Trace-context fields the boundary drops toward a system unless ``tracing.propagate`` lists
# them for it: a client's baggage may carry another system's user data.
TRACE_CONTEXT_FIELDS: Final = ("baggage", "tracestate")
TraceField = Literal["baggage", "tracestate"]


class Tracing(_Base, frozen=True):
    """W3C Trace Context and OpenTelemetry spans (``proxy/tracing.py``)."""

    # Read or start a W3C trace per request: a new traceparent per upstream try, the trace id
    # in the access log and audit records. false: traceparent passes through untouched.
    enabled: bool = True
    # OTLP/HTTP traces URL (e.g. http://127.0.0.1:4318/v1/traces); None: no spans exported
    # (traceparent is still read, generated and passed on). Needs `pip install jalur[tracing]`.
    otlp_endpoint: str | None = None
    # Share of new traces (no sampled traceparent from the client) whose spans are exported.
    sample: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    # service.name of the exported spans.
    service_name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] = "jalur"
    # Per system: the trace-context fields (baggage, tracestate) it may receive; every other
    # system gets neither (the boundary strips them like identity).
    propagate: dict[Name, list[TraceField]] = {}


class Config(_Base, frozen=True):
    listen: Listen = Listen()
    admin: Admin = Admin()
    drain: Drain = Drain()
    reload: Reload = Reload()
    store: Store = Store()
    systems: dict[Name, System] = {}
    clusters: dict[Name, Cluster] = {}
    routes: list[Route] = []
    compliance: Compliance = Compliance()
    boundary: Boundary = Boundary()
    migration: Migration = Migration()
    metrics: Metrics = Metrics()
    access_log: AccessLog = AccessLog()
    # The audit trail's secret; the rest of the audit settings are compliance.audit.
    audit: AuditKey = AuditKey()
    tracing: Tracing = Tracing()


@dataclass(frozen=True, slots=True)
class FieldError:
    path: str  # "$.routes[3].to"
    message: str
    line: int | None = None  # 1-based line in the YAML file, when known

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line is not None else ""
        return f"{self.path}{where}: {self.message}"


class ConfigError(Exception):
    """A configuration that cannot be served. ``errors`` holds every problem found."""

    def __init__(self, errors: list[FieldError], source: str = "<config>") -> None:
        self.errors = errors
        self.source = source
        super().__init__(f"{source}: " + "; ".join(str(e) for e in errors))


# -- loading ----------------------------------------------------------------------------


def load(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    now: datetime | None = None,
) -> Config:
    """Read a YAML file, apply ``JALUR_*`` overrides from ``env``, decode and validate.

    ``now`` (default: the current time) is when transition deadlines are judged."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([FieldError("$", f"cannot read file: {exc.strerror}")], str(p)) from exc
    config = parse(text, source=str(p), env=env, now=now)
    if not config.routes:
        # A file to serve from (unlike a fragment given to ``parse``) must route something:
        # a half-written file under ``reload.watch`` must not turn every request into a 404.
        at = FieldError("$.routes", "no routes: every request would be answered 404")
        raise ConfigError([at], str(p))
    return config


def parse(
    text: str,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    *,
    now: datetime | None = None,
) -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError([FieldError("$", f"invalid YAML: {exc}", line)], source) from exc
    if data is None:
        # An empty file is what a truncated, non-atomic write leaves behind: never 0 routes.
        raise ConfigError([FieldError("$", "the file is empty (no document)")], source)
    if not isinstance(data, dict):
        raise ConfigError([FieldError("$", "the document must be a mapping")], source)
    if "idempotency" in data:
        raise ConfigError(_located([_MOVED_IDEMPOTENCY], node, {}), source)
    errors: list[FieldError] = _duplicate_keys(node)
    errors.extend(_env_only(data))
    overridden: dict[str, str] = {}
    if env is not None:
        errors.extend(_apply_env(data, env, overridden))
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError:
        errors.extend(_collect(data, Config, "$"))
        raise ConfigError(_located(errors, node, overridden), source) from None
    errors.extend(_check_references(config))
    from .compliance import static_violations  # compliance imports this module

    errors.extend(static_violations(config, now))
    if not errors:
        from .tls import check_files  # tls imports this module

        errors.extend(check_files(config, now)[0])
    if errors:
        raise ConfigError(_located(errors, node, overridden), source)
    return config


_MOVED_IDEMPOTENCY: Final = FieldError(
    "$.idempotency",
    "moved: the shared store is now the top-level `store` (idempotency.store -> store.kind, "
    "idempotency.redis_url -> store.url, max_entries/max_bytes -> store.*); per-route "
    "policies stay under routes[].idempotency",
)


# -- environment overrides -------------------------------------------------------------

# Settings a file may not hold: (path in the document, the variable that sets it).
ENV_ONLY: Final = ((("audit", "key"), "JALUR_AUDIT__KEY"),)


def _env_only(data: dict[str, Any]) -> Iterator[FieldError]:
    for path, var in ENV_ONLY:
        node: Any = data
        for seg in path:
            node = node.get(seg) if isinstance(node, dict) else None
        if node is not None:
            yield FieldError(
                "$." + ".".join(path), f"set it from the environment ({var}), not in the file"
            )


def _duplicate_keys(root: yaml.Node | None) -> list[FieldError]:
    """A key given twice in one mapping: YAML loaders keep the last silently, so an edit
    that adds a key again would change the config without anyone seeing it."""
    errors: list[FieldError] = []
    todo: list[tuple[yaml.Node, str]] = [(root, "$")] if root is not None else []
    while todo:
        node, path = todo.pop()
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else "?"
                line = k.start_mark.line + 1
                if key in first and key != "<<":
                    errors.append(
                        FieldError(
                            f"{path}.{key}", f"duplicate key (first on line {first[key]})", line
                        )
                    )
                first.setdefault(key, line)
                todo.append((v, f"{path}.{key}"))
        elif isinstance(node, yaml.SequenceNode):
            todo.extend((v, f"{path}[{i}]") for i, v in enumerate(node.value))
    return sorted(errors, key=lambda e: e.line or 0)


def _env_path(var: str) -> list[str] | None:
    """The config path ``JALUR_A__B__C`` names (``["a", "b", "c"]``), or None when the
    variable is not a config override: no ``__`` (Kubernetes service links such as
    ``JALUR_PORT=tcp://...``, ``JALUR_SERVICE_HOST``), a first segment that is not a
    top-level config section, or a load-test variable. (Settings only the environment may
    hold, such as ``JALUR_AUDIT__KEY``, are overrides like any other: see ``ENV_ONLY``.)"""
    if not var.startswith(ENV_PREFIX) or var.startswith(ENV_LOADTEST_PREFIX):
        return None
    rest = var[len(ENV_PREFIX) :]
    if ENV_SEPARATOR not in rest:
        return None
    segments = [s.lower() for s in rest.split(ENV_SEPARATOR)]
    return segments if segments[0] in Config.__struct_fields__ else None


def env_near_misses(env: Mapping[str, str]) -> list[str]:
    """``JALUR_`` variables that are ignored but look meant as overrides: a single ``_``
    after a section name (``JALUR_LISTEN_PORT``), or a ``__`` path under an unknown section
    (``JALUR_LISTN__PORT``). Worth one warning line at start; never an error, as the
    environment also holds variables Jalur does not own."""
    misses = []
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or _env_path(var) is not None:
            continue
        if var.startswith(ENV_LOADTEST_PREFIX):
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        if ENV_SEPARATOR in rest or any(
            rest.startswith(section + "_") for section in Config.__struct_fields__
        ):
            misses.append(var)
    return misses


def _apply_env(
    data: dict[str, Any], env: Mapping[str, str], overridden: dict[str, str]
) -> list[FieldError]:
    """Apply ``JALUR_A__B=value``: set ``data[a][b]``, the value parsed as YAML.

    Only variables that name a config path count (``_env_path``); an unknown field under a
    known section is then an error like one in the file. Segments match existing keys
    case-insensitively with ``_`` standing for ``-`` (``JALUR_CLUSTERS__SHOP_LEGACY__...``
    reaches ``clusters.shop-legacy``)."""
    errors: list[FieldError] = []
    for var in sorted(env):
        segments = _env_path(var)
        if segments is None:
            continue
        if not all(segments):
            errors.append(FieldError("$", f"environment variable {var}: empty path segment"))
            continue
        node: Any = data
        for i, seg in enumerate(segments):
            if not isinstance(node, dict):
                errors.append(
                    FieldError(
                        "$." + ".".join(segments[:i]),
                        f"environment variable {var}: not a mapping, cannot override",
                    )
                )
                break
            key = _env_key(node, seg)
            if i == len(segments) - 1:
                overridden["$." + ".".join(segments[:i]) + ("." if i else "") + key] = var
                try:
                    node[key] = yaml.safe_load(env[var])
                except yaml.YAMLError as exc:
                    errors.append(FieldError("$", f"environment variable {var}: {exc}"))
            else:
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return errors


def _env_key(node: dict[str, Any], seg: str) -> str:
    for key in node:
        if isinstance(key, str) and key.lower().replace("-", "_") == seg:
            return key
    return seg


# -- error collection -------------------------------------------------------------------

_MSGSPEC_PATH: Final = re.compile(r" - at `\$(?P<rest>[^`]*)`$")


def _collect(data: Any, typ: Any, path: str) -> list[FieldError]:
    """Every validation error in ``data`` as ``typ``, not just msgspec's first one.

    msgspec stops at the first error; this descends into Structs, lists and dicts and
    converts each part on its own, so a config with five mistakes reports five."""
    try:
        msgspec.convert(data, typ)
        return []
    except msgspec.ValidationError as exc:
        first = _from_msgspec(exc, path)
    info = msgspec.inspect.type_info(typ)
    if isinstance(info, msgspec.inspect.StructType) and isinstance(data, dict):
        errors: list[FieldError] = []
        fields = {f.encode_name: f for f in info.fields}
        for key in data:
            if key not in fields:
                errors.append(FieldError(f"{path}.{key}", "unknown field"))
        for name, field in fields.items():
            if name in data:
                errors.extend(_collect(data[name], _field_type(typ, field.name), f"{path}.{name}"))
            elif field.required:
                errors.append(FieldError(f"{path}.{name}", "required field is missing"))
        return errors or [first]
    origin = getattr(typ, "__origin__", None)
    args: tuple[Any, ...] = getattr(typ, "__args__", ())
    if origin is list and isinstance(data, list) and args:
        errors = []
        for i, item in enumerate(data):
            errors.extend(_collect(item, args[0], f"{path}[{i}]"))
        return errors or [first]
    if origin is dict and isinstance(data, dict) and len(args) == 2:
        errors = []
        for key, value in data.items():
            key_errors = _collect(key, args[0], f"{path}.{key}")
            if key_errors:
                errors.append(FieldError(f"{path}.{key}", f"invalid name {key!r}"))
                continue
            errors.extend(_collect(value, args[1], f"{path}.{key}"))
        return errors or [first]
    return [first]


def _field_type(struct_type: Any, attr: str) -> Any:
    import typing

    return typing.get_type_hints(struct_type, include_extras=True)[attr]


def _from_msgspec(exc: msgspec.ValidationError, path: str) -> FieldError:
    message = str(exc)
    m = _MSGSPEC_PATH.search(message)
    if m:
        return FieldError(path + m.group("rest"), message[: m.start()])
    return FieldError(path, message)


# -- cross-reference checks -------------------------------------------------------------


def _check_references(config: Config) -> list[FieldError]:
    errors: list[FieldError] = _check_boundary(config)
    for name, cluster in config.clusters.items():
        if cluster.system not in config.systems:
            errors.append(
                FieldError(f"$.clusters.{name}.system", f"unknown system {cluster.system!r}")
            )
        schemes = set()
        for i, endpoint in enumerate(cluster.endpoints):
            problem = _endpoint_problem(endpoint)
            if problem:
                errors.append(FieldError(f"$.clusters.{name}.endpoints[{i}]", problem))
            else:
                schemes.add(URL(endpoint).scheme)
        if len(schemes) > 1:
            errors.append(
                FieldError(
                    f"$.clusters.{name}.endpoints",
                    "mixes http:// and https:// endpoints (one trust decision per cluster)",
                )
            )
        elif cluster.tls is not None and schemes == {"http"}:
            errors.append(
                FieldError(f"$.clusters.{name}.tls", "set, but the endpoints are http://")
            )
    errors.extend(_check_unverified(config))
    errors.extend(_check_policies(config))
    seen: dict[str, int] = {}
    for i, route in enumerate(config.routes):
        at = f"$.routes[{i}]"
        if route.name in seen:
            errors.append(
                FieldError(
                    f"{at}.name", f"duplicate route name (also $.routes[{seen[route.name]}])"
                )
            )
        seen.setdefault(route.name, i)
        errors.extend(_check_match(route.match, f"{at}.match"))
        if (route.to is None) == (route.split is None):
            errors.append(FieldError(at, "exactly one of `to` or `split` is required"))
        if route.to is not None and route.to not in config.clusters:
            errors.append(FieldError(f"{at}.to", f"unknown cluster {route.to!r}"))
        if route.split is not None:
            if not route.split:
                errors.append(FieldError(f"{at}.split", "needs at least one cluster"))
            elif sum(t.weight for t in route.split) == 0:
                errors.append(FieldError(f"{at}.split", "weights add up to 0"))
            names = [t.cluster for t in route.split]
            for j, target in enumerate(route.split):
                if target.cluster not in config.clusters:
                    errors.append(
                        FieldError(
                            f"{at}.split[{j}].cluster", f"unknown cluster {target.cluster!r}"
                        )
                    )
                if names.index(target.cluster) != j:
                    errors.append(
                        FieldError(f"{at}.split[{j}].cluster", "cluster named twice in one split")
                    )
        if route.shadow is not None:
            shadow = route.shadow.cluster
            if shadow not in config.clusters:
                errors.append(FieldError(f"{at}.shadow.cluster", f"unknown cluster {shadow!r}"))
            elif route.to == shadow or shadow in {t.cluster for t in route.split or ()}:
                errors.append(
                    FieldError(f"{at}.shadow.cluster", "a route cannot shadow to its own cluster")
                )
        if route.sticky is not None and (route.sticky.header is None) == (
            route.sticky.cookie is None
        ):
            errors.append(FieldError(f"{at}.sticky", "exactly one of `header` or `cookie`"))
    for i, name in enumerate(config.compliance.legacy_clusters):
        if name not in config.clusters:
            errors.append(
                FieldError(f"$.compliance.legacy_clusters[{i}]", f"unknown cluster {name!r}")
            )
    until = config.compliance.transition_until
    if until is not None and until.tzinfo is None:
        errors.append(
            FieldError(
                "$.compliance.transition_until",
                "needs a UTC offset (e.g. 2024-04-01T00:00:00+07:00)",
            )
        )
    return errors


def _check_policies(config: Config) -> list[FieldError]:
    """Per-route timeouts, retries and rate limits that cannot work; tracing settings."""
    errors: list[FieldError] = []
    for i, route in enumerate(config.routes):
        at = f"$.routes[{i}]"
        targets = [route.to] if route.to is not None else [t.cluster for t in route.split or []]
        if route.timeout is not None:
            for name in targets:
                cluster = config.clusters.get(name)
                if cluster is None:
                    continue
                retry = route.retry or cluster.retry
                per_try = retry.per_try_timeout or cluster.timeouts.response_headers
                if per_try * retry.attempts > route.timeout * (1 + 1e-9):
                    where = f"{at}.retry" if route.retry else f"$.clusters.{name}.retry"
                    errors.append(
                        FieldError(
                            f"{at}.timeout",
                            f"{route.timeout:g}s is shorter than {retry.attempts} tries of "
                            f"{per_try:g}s ({where}): the last tries could never finish; "
                            "lower the per-try timeout or the attempts, or raise the timeout",
                        )
                    )
        limit = route.rate_limit
        if limit is not None and limit.scope == "fleet" and config.store.kind != "redis":
            errors.append(
                FieldError(
                    f"{at}.rate_limit.scope",
                    "fleet needs the shared store (store.kind: redis); use local for one process",
                )
            )
    tracing = config.tracing
    for name in tracing.propagate:
        if name not in config.systems:
            errors.append(FieldError(f"$.tracing.propagate.{name}", f"unknown system {name!r}"))
    endpoint = tracing.otlp_endpoint
    if endpoint is not None:
        url = URL(endpoint)
        if url.scheme not in ("http", "https") or not url.host:
            errors.append(FieldError("$.tracing.otlp_endpoint", "must be an http(s):// URL"))
        elif _missing("opentelemetry.sdk"):
            errors.append(
                FieldError(
                    "$.tracing.otlp_endpoint",
                    "needs the OpenTelemetry SDK: pip install 'jalur[tracing]'",
                )
            )
    return errors


def _check_unverified(config: Config) -> list[FieldError]:
    """``tls.verify: false`` is refused on a cluster that a transaction route (``to``,
    ``split`` or ``shadow``) can reach: payments go only to an authenticated upstream."""
    errors: dict[str, FieldError] = {}  # one per cluster
    tx = set(config.compliance.transaction_categories)
    for i, route in enumerate(config.routes):
        if route.category not in tx:
            continue
        names = [route.to] if route.to is not None else [t.cluster for t in route.split or ()]
        if route.shadow is not None:
            names.append(route.shadow.cluster)
        for name in names:
            spec = config.clusters.get(name or "")
            if spec is not None and spec.tls is not None and not spec.tls.verify:
                errors.setdefault(
                    name or "",
                    FieldError(
                        f"$.clusters.{name}.tls.verify",
                        f"false on a cluster serving the transaction category "
                        f"{route.category!r} ($.routes[{i}]): its upstream must be verified",
                    ),
                )
    return list(errors.values())


# Header names a system cannot own: cookies go under ``owns.cookies``; the rest frame the
# request itself.
_NOT_OWNABLE: Final = frozenset(
    {"cookie", "set-cookie", "host", "content-length", "transfer-encoding", "connection"}
)
_UNDERSCORE: Final = "names with '_' never reach an upstream (see boundary.underscore_headers)"


def _check_boundary(config: Config) -> list[FieldError]:
    """Ownership must be unambiguous: one owner per header/cookie (case-insensitive), and a
    consent-gated identity header belongs to its ``from_system`` only."""
    errors: list[FieldError] = []
    consent = config.boundary.consent
    consent_header = consent.header.lower()
    if "_" in consent_header:
        errors.append(FieldError("$.boundary.consent.header", _UNDERSCORE))

    def ownable(header: str, at: str) -> bool:
        low = header.lower()
        if "_" in low:
            errors.append(FieldError(at, _UNDERSCORE))
        elif low in _NOT_OWNABLE or low == consent_header:
            errors.append(FieldError(at, f"{header!r} cannot be a system's or identity header"))
        else:
            return True
        return False

    for i, item in enumerate(config.boundary.forwarding.pass_headers):
        if item.lower() not in FORWARDING_HEADERS:
            errors.append(
                FieldError(
                    f"$.boundary.forwarding.pass_headers[{i}]",
                    f"{item!r} is not one of {', '.join(FORWARDING_HEADERS)}",
                )
            )

    header_owner: dict[str, str] = {}
    cookie_owner: dict[str, str] = {}
    for name, system in config.systems.items():
        at = f"$.systems.{name}.owns"
        for kind, names, owners in (
            ("headers", system.owns.headers, header_owner),
            ("cookies", system.owns.cookies, cookie_owner),
        ):
            for i, item in enumerate(names):
                if kind == "headers" and not ownable(item, f"{at}.headers[{i}]"):
                    continue
                first = owners.setdefault(item.lower(), name)
                if first != name:
                    errors.append(FieldError(f"{at}.{kind}[{i}]", f"also owned by {first!r}"))
    origin: dict[str, str] = {}
    seen: dict[tuple[str, str], int] = {}
    for i, ident in enumerate(consent.identities):
        at = f"$.boundary.consent.identities[{i}]"
        for end in (ident.from_system, ident.to_system):
            if end not in config.systems:
                errors.append(FieldError(at, f"unknown system {end!r}"))
        if ident.from_system == ident.to_system:
            errors.append(FieldError(at, "from_system and to_system are the same system"))
        header = ident.header.lower()
        if not ownable(ident.header, f"{at}.header"):
            continue
        owner = header_owner.get(header, ident.from_system)
        if owner != ident.from_system:
            errors.append(FieldError(f"{at}.header", f"owned by {owner!r}, not by from_system"))
        first = origin.setdefault(header, ident.from_system)
        if first != ident.from_system:
            errors.append(FieldError(f"{at}.header", f"already an identity of {first!r}"))
        j = seen.setdefault((header, ident.to_system), i)
        if j != i:
            errors.append(FieldError(at, f"same header and to_system as identities[{j}]"))
    return errors


def _check_match(match: Match, at: str) -> list[FieldError]:
    errors: list[FieldError] = []
    kinds = [k for k in ("prefix", "exact", "regex") if getattr(match, k) is not None]
    if len(kinds) > 1:
        errors.append(FieldError(at, f"at most one of prefix/exact/regex (got {', '.join(kinds)})"))
    for kind in ("prefix", "exact"):
        value = getattr(match, kind)
        if value is not None and not value.startswith("/"):
            errors.append(FieldError(f"{at}.{kind}", "must start with '/'"))
    if match.regex is not None:
        errors.extend(_check_regex(match.regex, f"{at}.regex"))
    for j, header in enumerate(match.headers):
        hat = f"{at}.headers[{j}]"
        given = [
            k for k in ("exact", "prefix", "regex", "present") if getattr(header, k) is not None
        ]
        if len(given) != 1:
            errors.append(FieldError(hat, "exactly one of exact/prefix/regex/present"))
        if header.regex is not None:
            errors.extend(_check_regex(header.regex, f"{hat}.regex"))
    return errors


def _check_regex(pattern: str, at: str) -> list[FieldError]:
    try:
        re.compile(pattern)
    except re.error as exc:
        return [FieldError(at, f"invalid regular expression: {exc}")]
    return []


def _endpoint_problem(endpoint: str) -> str | None:
    try:
        url = URL(endpoint)
    except ValueError as exc:
        return f"not a URL: {exc}"
    if url.scheme not in ("http", "https"):
        return "endpoint must be http://host:port or https://host:port"
    if not url.host or url.explicit_port is None:
        return "endpoint must name a host and a port, e.g. http://127.0.0.1:9001"
    if url.path not in ("", "/") or url.query_string or url.fragment or url.user:
        return "endpoint must be only scheme://host:port, without path, query or userinfo"
    return None


# -- line numbers -----------------------------------------------------------------------

_PATH_PART: Final = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _located(
    errors: list[FieldError], root: yaml.Node | None, overridden: dict[str, str]
) -> list[FieldError]:
    """Attach the YAML line to each error, or name the env variable the value came from."""
    out = []
    for e in errors:
        var = next((v for p, v in overridden.items() if e.path.startswith(p)), None)
        if var is not None:
            out.append(FieldError(e.path, f"{e.message} (from environment variable {var})"))
        elif e.line is None and root is not None:
            out.append(FieldError(e.path, e.message, _line_of(root, e.path)))
        else:
            out.append(e)
    return out


def _line_of(root: yaml.Node, path: str) -> int | None:
    """Best line for ``$.a.b[2].c`` in the composed YAML: the deepest node that exists."""
    node: yaml.Node = root
    line = None
    for key, index in _parts(path):
        nxt: yaml.Node | None = None
        if key is not None and isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == key:
                    nxt, line = v, k.start_mark.line + 1
                    break
        elif index is not None and isinstance(node, yaml.SequenceNode) and index < len(node.value):
            nxt = node.value[index]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        node = nxt
    return line


def _parts(path: str) -> Iterator[tuple[str | None, int | None]]:
    for m in _PATH_PART.finditer(path):
        yield (m.group(1), int(m.group(2)) if m.group(2) is not None else None)


def _missing(module: str) -> bool:
    """Whether an optional dependency (an extra) is not installed."""
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # its parent package is absent
        return True
