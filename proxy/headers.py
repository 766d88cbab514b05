"""Which header fields cross the proxy, in each direction.

Invariant: hop-by-hop fields (RFC 9110 §7.6.1) and every field named in ``Connection`` are
never forwarded, in either direction; ``Host`` and ``Idempotency-Key`` cannot be removed
that way. What the boundary between the two companies removes on top of this is
``boundary.py``'s job (``scrub``, ``filter_response``).
"""

from __future__ import annotations

from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones every proxy strips.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Fields a ``Connection`` header may not remove (RFC 9110 lets it name any): the proxy routed
# on Host and retries a POST only because the upstream sees its Idempotency-Key.
_NOT_NOMINABLE: Final = frozenset({"host", "idempotency-key"})
VIA: Final = "1.1 jalur"


def connection_named(values: list[str] | tuple[()]) -> frozenset[str]:
    """Hop-by-hop fields plus every field named by any of the ``Connection`` header
    ``values`` (a field may be repeated: RFC 9110 §5.3 makes the lines one list)."""
    named = {t.strip().lower() for v in values for t in v.split(",")} - {""}
    return HOP_BY_HOP | (named - _NOT_NOMINABLE) if named else HOP_BY_HOP


def upstream_headers(
    incoming: CIMultiDictProxy[str],
    peer: str,
    scheme: str,
    request_id: str,
    trusted_hops: int = 0,
) -> CIMultiDict[str]:
    """The request's headers as forwarded (before the boundary's ``scrub``): hop-by-hop
    fields removed, X-Forwarded-* and Via set. Of a client's X-Forwarded-For only the last
    ``trusted_hops`` entries are kept (Envoy's ``xff_num_trusted_hops``)."""
    nominated = incoming.getall("Connection", ())
    drop = connection_named(nominated) if nominated else HOP_BY_HOP
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in drop:
            out.add(name, value)
    out.popall("Expect", None)  # Jalur answers 100-continue itself
    xff = incoming.getall("X-Forwarded-For", ()) if trusted_hops else ()
    if xff:
        hops = [h.strip() for line in xff for h in line.split(",")][-trusted_hops:]
        out["X-Forwarded-For"] = ", ".join([*hops, peer])
    else:
        out["X-Forwarded-For"] = peer
    out["X-Forwarded-Proto"] = scheme
    host = incoming.get("Host")
    if host is not None:
        out["X-Forwarded-Host"] = host
    else:
        out.popall("X-Forwarded-Host", None)  # never the client's own claim
    via = incoming.get("Via")
    out["Via"] = f"{via}, {VIA}" if via else VIA
    out["X-Request-Id"] = request_id
    return out


def response_headers(
    up: list[tuple[str, str]], request_id: str, out: CIMultiDict[str]
) -> CIMultiDict[str]:
    """The upstream's response header fields minus hop-by-hop ones, added to ``out``."""
    kept: list[tuple[str, str]] = []
    lowered: list[str] = []
    nominated: list[str] = []
    for name, value in up:
        low = name.lower()
        if low in HOP_BY_HOP:
            if low == "connection":
                nominated.append(value)
            continue
        kept.append((name, value))
        lowered.append(low)
    if nominated:  # rare: a back end naming fields in Connection
        drop = connection_named(nominated)
        kept = [pair for pair, low in zip(kept, lowered, strict=True) if low not in drop]
    out.extend(kept)
    out["x-request-id"] = request_id
    return out
