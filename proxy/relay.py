"""The upstream's answer, streamed to the client; WebSocket upgrades joined as a byte tunnel.

Invariants:
- The answer's head goes out with its first body bytes (one write for a small answer) but
  never waits for a slow body.
- An upstream failure after the head went out cuts the client connection: a half-sent body
  is never followed by an error page.
- A keyed answer's last chunk is held back until its outcome is stored, so a client that
  has the whole answer and repeats at once is replayed, never told 409.
"""

from __future__ import annotations

from multidict import CIMultiDict

from . import errors, tunnel
from .answers import block, body_refused, failure_response, reject
from .exchange import Answer, Exchange
from .gate import capture_rest, settle
from .h1transport import MAX_HEAD_BYTES, H1Transport
from .headers import response_headers
from .listener import HTTP11, Response
from .upstream import ClusterRuntime, UpstreamResponse


async def relay(ex: Exchange, upr: UpstreamResponse) -> Answer:
    request, cluster, state = ex.request, ex.cluster, ex.state
    assert cluster is not None
    headers = response_headers(upr.header_items(), ex.request_id, CIMultiDict())
    # The head goes out with the first body bytes (one write), or alone below when the
    # upstream has sent none yet, so a slow body never delays the head.
    resp = request.stream(upr.status, headers, reason=upr.reason)
    copy = ex.copy
    digest = copy.digest if copy is not None else None
    dropped = state.boundary.filter_response(headers, cluster.system)
    if dropped:
        ex.services.metrics.stripped(cluster.system, "set_cookie", dropped)
    ticket = ex.ticket
    if ticket is not None:  # stored as the client sees it: after the boundary's filter
        ticket.headers = [(str(k), v) for k, v in headers.items()]
        ticket.answered = True
    ex.status = upr.status
    try:
        if not upr.body_ready():
            resp.send_head()
    except ConnectionError:
        ex.flags = "DC"
        if ticket is not None:
            await capture_rest(upr, ticket)
        upr.close()
        return resp
    held = b""
    try:
        while chunk := await upr.read_chunk():
            ex.bytes_out += len(chunk)
            if digest is not None:
                digest.update(chunk)
            if ticket is not None:
                ticket.capture(chunk)
                chunk, held = held, chunk
                if not chunk:
                    continue
            try:
                await resp.write(chunk)
            except ConnectionError:
                if ticket is not None:  # the answer is still the key's outcome: keep it
                    await capture_rest(upr, ticket)
                raise
        if ticket is not None:
            ticket.complete = True
            await settle(ex)
            if held:
                await resp.write(held)
    except errors.ProxyError as exc:
        # The head is out: the only honest signal left is to cut the connection.
        _failed_mid_answer(ex, cluster, exc)
        upr.close()
        resp.abort()
        return resp
    except ConnectionError:
        ex.flags = "DC"
        upr.close()  # the client went away; drop the upstream connection too
        return resp
    upr.release()
    body = ex.body
    if body is not None and body.refused is not None:
        # The whole response arrived before the upload was cut: it stands, but the
        # connection does not carry another request (lingering as after a refusal).
        body_refused(ex, body.refused)
        resp.force_close()
    return resp


def _failed_mid_answer(ex: Exchange, cluster: ClusterRuntime, exc: errors.ProxyError) -> None:
    body = ex.body
    if body is not None and body.refused is not None:
        # The upload (still streaming beside the response) went over a body limit.
        ex.services.metrics.rejected(body.refused.kind)
        ex.flags = body.refused.flag
    elif body is not None and body.client_failed:
        ex.flags = "DC"  # the client's upload broke off: not the upstream's fault
    else:
        # The error's own flag (UT for a body that stopped coming, UPE, UC), except a
        # connect-class UF: after the head arrived that can only be a lost exchange.
        ex.flags = "UC" if exc.flag == errors.UpstreamError.flag else exc.flag
        ex.state.bound.clusters[cluster.name].error(exc.kind)


def is_websocket(ex: Exchange) -> bool:
    upgrade = ex.headers.get("Upgrade")
    return upgrade is not None and upgrade.lower() == "websocket"


def _not_a_handshake(ex: Exchange) -> str | None:
    """Why the request cannot be switched as it came (None: it can). The upstream is asked
    with ``GET``, HTTP/1.1, ``Connection: Upgrade`` and no body, so anything else would be
    a different request from the one routed and audited (RFC 6455 4.1, RFC 9110 7.8)."""
    request = ex.request
    if request.body_exists:
        # Transfer-Encoding is hop-by-hop, so the tunnel's own check never sees it.
        return "an upgrade request with a body"
    if request.method != "GET":
        return "a WebSocket upgrade must be a GET request"
    if request.version < HTTP11:
        return "an upgrade needs HTTP/1.1"
    tokens = (t.strip().lower() for v in ex.headers.getall("Connection", ()) for t in v.split(","))
    if "upgrade" not in tokens:
        # The listener then parsed what followed as HTTP requests: they are not tunnel bytes.
        return "an upgrade request without Connection: Upgrade"
    return None


async def websocket(ex: Exchange) -> Answer:
    """Ask the endpoint to switch protocols with the client's own handshake fields; after
    its validated ``101``, hand the client's socket over (``Request.detach``) and join the
    two connections as a byte tunnel (``tunnel.splice``, docs/websocket.md). A refusal is
    relayed like any answer; the connection then closes (the upgrade was not performed)."""
    cluster, endpoint, headers = ex.cluster, ex.endpoint, ex.out_headers
    assert cluster is not None
    assert endpoint is not None
    assert headers is not None
    request, request_id = ex.request, ex.request_id
    refused = _not_a_handshake(ex)
    if refused is not None:
        return reject(ex, 400, refused, "upgrade_refused")
    route = ex.route
    assert route is not None
    if route.category in ex.state.transaction_categories:
        # A tunnel is opaque: what a client sent inside it would reach the commerce system
        # past the audit, the idempotency gate and the rate limits (Envoy, too, upgrades
        # only routes that enable it). Refused and audited like any compliance decision.
        message = f"no WebSocket upgrade on {route.category} routes"
        return block(ex, 400, "upgrade_refused", message)
    items = [*headers.items(), *(("Upgrade", v) for v in ex.headers.getall("Upgrade"))]
    transport = cluster.transport
    ctx, name = transport.tls_for(endpoint) if isinstance(transport, H1Transport) else (None, None)
    timeouts = cluster.spec.timeouts
    try:
        up = await tunnel.open_upgrade(
            endpoint,
            ctx,
            name,
            ex.upstream_target,
            items,
            connect_timeout=timeouts.connect,
            head_timeout=timeouts.response_headers,
            max_head_bytes=MAX_HEAD_BYTES,
        )
    except errors.BadRequest as exc:
        return reject(ex, 400, exc.message, exc.reason)
    except errors.ProxyError as exc:
        ex.flags = exc.flag
        ex.state.bound.clusters[cluster.name].error(exc.kind)
        return failure_response(exc, request_id, f"{cluster.name}/{endpoint.url}")
    out = response_headers(up.headers, request_id, CIMultiDict())
    dropped = ex.state.boundary.filter_response(out, cluster.system)
    if dropped:
        ex.services.metrics.stripped(cluster.system, "set_cookie", dropped)
    ex.status = up.status
    if not up.upgraded:  # refused (403, 404, a redirect): relayed as it came
        out.popall("Content-Length", None)
        ex.bytes_out += len(up.body)
        return Response(up.status, up.body, out, reason=up.reason)
    if request.sent_ahead:
        # RFC 6455 4.1: a client waits for the 101 before sending. Bytes sent with the
        # handshake were never frames; tunnelled, they would reach this cluster unrouted
        # (an HTTP request pipelined behind the upgrade: a payment to a social cluster).
        up.close()
        return reject(ex, 400, "bytes sent before the upgrade was answered", "upgrade_refused")
    out["Upgrade"] = next(v for k, v in up.headers if k.lower() == "upgrade")
    out["Connection"] = "Upgrade"
    switched = request.stream(101, out, reason=up.reason)
    try:
        switched.send_head()
        client, leftover = request.detach()
    except ConnectionError:
        ex.flags = "DC"
        up.close()
        return switched
    limits = cluster.spec.upgrade
    try:
        result = await tunnel.splice(
            client, leftover, up, idle_timeout=limits.idle_timeout, max_bytes=limits.max_bytes
        )
    finally:
        request.tunnel_ended()  # counted against listen.max_connections until now
    ex.bytes_out += result.upstream_bytes
    if result.flag != "-":
        ex.flags = result.flag
    return switched
