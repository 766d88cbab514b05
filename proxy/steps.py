"""The request path, as one declared order of steps over one ``Exchange``.

``STEPS`` is the whole policy order: reading it tells what a request must pass before any
upstream sees a byte of it. Each step takes the ``Exchange`` and returns None (go on,
having filled in some fields) or the answer that ends the request. A step that must wait
(for the body, the store, a rate-limit bucket in Redis) returns an awaitable instead, and
only when it has something to wait for: a feature that is off costs one call and nothing
allocated. What comes after the steps (sending, retrying, relaying) is ``forward.py``'s.

Order, and why:
1. ``framing``: only HTTP/1.0 and 1.1, only the chunked transfer coding (a peer behind us
   may read anything else differently).
2. ``canonical_path``: one reading of Host and the target, the one routed and forwarded.
3. ``names``: header names every back end reads the same way.
4. ``route`` -> 404; ``split`` picks the cluster (sticky key, live weights).
5. ``variants`` and ``guard``: the compliance rules, before any byte is read or sent.
6. ``body_limit`` (by Content-Length, before 100 Continue), ``rate_limit``, ``idempotency``
   (may read the bounded body, may answer from the store), ``buffer_body``.
7. ``admit``: circuit breaker and endpoint; ``headers``, ``shadow`` (copied before the
   boundary's scrub, which is per target system), ``scrub``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from . import errors, paths
from . import idempotency as idem
from .answers import block, body_failed, error_response, refuse_body, reject, unavailable
from .boundary import NOTHING
from .clientbody import ClientBody
from .exchange import Answer, Exchange
from .gate import check as gate_check
from .headers import upstream_headers
from .ratelimit import STORE_ERROR, Limiter

Step = Callable[[Exchange], Answer | Awaitable[Answer | None] | None]

# Request-line versions served (RFC 9112); anything else is 505 before routing.
_SERVED_VERSIONS: Final = frozenset({(1, 0), (1, 1)})


def framing(ex: Exchange) -> Answer | None:
    if ex.request.version not in _SERVED_VERSIONS:
        # llhttp takes "HTTP/2.0" and "HTTP/0.9"-style lines; a back end may not.
        return reject(ex, 505, "only HTTP/1.0 and HTTP/1.1 are served", "version")
    coding = ex.headers.get("Transfer-Encoding")
    if coding is not None and coding.lower() != "chunked":
        # llhttp reads "identity, chunked" as chunked; a peer may not. Only the one coding
        # HTTP/1.1 defines for requests is accepted (Envoy and NGINX: 501).
        message = "unsupported Transfer-Encoding; only chunked is accepted"
        return reject(ex, 501, message, "transfer_encoding")
    return None


def canonical_path(ex: Exchange) -> Answer | None:
    headers = ex.headers
    try:
        ex.host_name = paths.canonical_host(headers.getall("Host", []))
        target = ex.target = paths.canonicalize(ex.request.raw_path, headers.get("Host"))
    except paths.PathError as exc:
        return reject(ex, 400, f"invalid request: {exc}", exc.reason)
    ex.upstream_target = f"{target.path}?{target.query}" if target.query else target.path
    return None


def names(ex: Exchange) -> Answer | None:
    problem = ex.state.boundary.check_names(ex.headers)
    if problem is not None:
        return reject(ex, 400, problem[1], problem[0])
    return None


def route(ex: Exchange) -> Answer | None:
    state = ex.state
    assert ex.target is not None
    matched = state.router.match(ex.method, ex.host_name, ex.target.path, ex.headers)
    if matched is None:
        ex.flags = "NR"
        return reject(ex, 404, "no route matches this request", "no_route")
    ex.route = matched
    ex.policy = state.policies[matched.name]
    state.bound.routes[matched.name].enter()  # left by the driver, whatever happens next
    return None


def split(ex: Exchange) -> Answer | None:
    matched = ex.route
    assert matched is not None
    splitter = ex.state.splitters[matched.name]
    name = splitter.single
    if name is None:
        key: str | None = None
        if matched.sticky_header is not None:
            key = ex.headers.get(matched.sticky_header)
        elif matched.sticky_cookie is not None:
            key = ex.request.cookies.get(matched.sticky_cookie)
        name = splitter.choose(key)
    ex.cluster = ex.state.clusters[name]
    return None


def variants(ex: Exchange) -> Answer | None:
    assert ex.route is not None
    assert ex.cluster is not None
    variant = ex.state.variants.check(ex.request.raw_path, ex.route, ex.cluster.kind)
    if variant is not None:
        return block(ex, 400, variant, "this path could be read as a transaction path")
    return None


def guard(ex: Exchange) -> Answer | None:
    matched, cluster = ex.route, ex.cluster
    assert matched is not None
    assert cluster is not None
    refused = ex.state.guard.check(matched.name, cluster.name, ex.services.clock())
    if refused is not None:
        message = f"cluster {cluster.name} may not serve {matched.category} requests now"
        return block(ex, 503, refused, message)
    return None


def body_limit(ex: Exchange) -> Answer | None:
    assert ex.route is not None
    limit = ex.route.spec.max_body_bytes
    if limit is None:
        limit = ex.state.config.listen.max_body_bytes
    ex.limit = limit
    length = ex.request.content_length
    if length is not None and length > limit:
        # Before any upstream connection, before 100 Continue: the body is never read.
        too_large = f"request body of {length} bytes is over this route's limit of {limit}"
        return refuse_body(ex, errors.BodyTooLarge(too_large))
    return None


def rate_limit(ex: Exchange) -> Awaitable[Answer | None] | None:
    assert ex.policy is not None
    limiter = ex.policy.limiter
    return None if limiter is None else _rate_limited(ex, limiter)


async def _rate_limited(ex: Exchange, limiter: Limiter) -> Answer | None:
    """None when the route's buckets had a token for this request; else 429 with
    ``Retry-After`` and the ``RateLimit`` fields, counted per route and bucket."""
    assert ex.route is not None
    request = ex.request
    refusal = await limiter.check(ex.headers.getall, request.cookies.get, request.remote)
    if refusal is None:
        return None
    ex.state.bound.routes[ex.route.name].rate_limited(refusal.reason)
    if refusal is STORE_ERROR:  # logged by the limiter, once per outage
        return None
    ex.flags = "RL"
    ex.status = 429
    ex.reason = "rate_limited"
    resp = error_response(
        429,
        f"rate limit of this route ({refusal.reason}) exceeded; retry later",
        ex.request_id,
        reason=f"{refusal.reason}_rate_limited",
    )
    resp.headers.update(refusal.headers())
    return resp


def idempotency(ex: Exchange) -> Awaitable[Answer | None] | None:
    assert ex.route is not None
    gate = ex.state.idempotency.get(ex.route.name)
    if gate is None or ex.method not in idem.NON_IDEMPOTENT:
        return None
    ex.gate = gate
    return gate_check(ex, gate)


def buffer_body(ex: Exchange) -> Awaitable[Answer | None] | None:
    request = ex.request
    if ex.body is not None or not request.body_exists:
        return None
    assert ex.route is not None
    ex.body = ClientBody(request, ex.limit, ex.state.config.listen.body_idle_timeout)
    buffered = ex.route.spec.buffer_body_bytes
    if buffered is None:
        buffered = ex.state.config.listen.buffer_body_bytes
    length = request.content_length
    if buffered and (length is None or length <= buffered):
        # NGINX's proxy_request_buffering for bounded bodies: read it all before an
        # upstream connection is taken, so slow uploads hold no upstream resource.
        return _buffer(ex, buffered)
    return None


async def _buffer(ex: Exchange, size: int) -> Answer | None:
    assert ex.body is not None
    try:
        await ex.body.buffer(size)
    except Exception:
        return body_failed(ex)
    return None


def admit(ex: Exchange) -> Answer | None:
    cluster = ex.cluster
    assert cluster is not None
    cm = ex.state.bound.clusters[cluster.name]
    if not cluster.admit():
        return unavailable(
            ex, cm, errors.Overflow(f"cluster {cluster.name} is at its request limit")
        )
    ex.admitted = cluster
    if cluster.hashed:
        ex.hash_key = _hash_key(ex)
    host = cluster.choose(ex.hash_key)
    if host is None:
        return unavailable(
            ex, cm, errors.NoHealthyUpstream(f"no healthy endpoint in cluster {cluster.name}")
        )
    ex.host = host
    ex.endpoint = host.endpoint
    return None


def _hash_key(ex: Exchange) -> str | None:
    """The request's key for ``lb_policy: hash`` (None: absent, any endpoint will do)."""
    cluster = ex.cluster
    assert cluster is not None
    if cluster.hash_header is not None:
        return ex.headers.get(cluster.hash_header)
    if cluster.hash_cookie is not None:
        return ex.request.cookies.get(cluster.hash_cookie)
    return None


def headers(ex: Exchange) -> Answer | None:
    request = ex.request
    ex.out_headers = upstream_headers(
        ex.headers,
        request.remote or "",
        request.scheme,
        ex.request_id,
        ex.state.boundary.trusted_hops,
    )
    return None


def shadow(ex: Exchange) -> Answer | None:
    assert ex.route is not None
    assert ex.out_headers is not None
    plan = ex.state.shadows.get(ex.route.name)
    if plan is None:
        return None
    request = ex.request
    if plan.wants(ex.method, request.content_length, request.body_exists):
        ex.copy = plan.copy(
            ex.state.boundary, ex.route.name, ex.method, ex.upstream_target, ex.out_headers
        )
    return None


def scrub(ex: Exchange) -> Answer | None:
    cluster, out = ex.cluster, ex.out_headers
    assert cluster is not None
    assert out is not None
    stripped = ex.state.boundary.scrub(out, cluster.system)
    if stripped is not NOTHING:  # something was removed or judged
        metrics = ex.services.metrics
        for kind, n in stripped.counts():
            metrics.stripped(cluster.system, kind, n)
        if stripped.consent is not None:
            metrics.consent(stripped.consent)
        ex.consent = stripped.consent
    return None


# The request path. Every request passes these in this order until one answers.
STEPS: Final[tuple[Step, ...]] = (
    framing,
    canonical_path,
    names,
    route,
    split,
    variants,
    guard,
    body_limit,
    rate_limit,
    idempotency,
    buffer_body,
    admit,
    headers,
    shadow,
    scrub,
)
