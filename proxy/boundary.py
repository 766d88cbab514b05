"""The boundary: which headers and cookies may cross into a system, consent, ``Set-Cookie``.

Permendag 31/2023: user data may not flow between the social and the commerce company's
systems without the user's consent. The app front end sends both companies' cookies and
identity headers on every request; ``Boundary`` strips what the destination must not see.

Invariants (for a request forwarded to system ``S`` after ``Boundary.scrub(headers, S)``):

- No header owned (``systems.*.owns.headers``) by a system other than ``S`` remains, in any
  letter case. A name owned by two systems is foreign to both (fail closed).
- No cookie owned (``systems.*.owns.cookies``) by a system other than ``S`` remains. Cookie
  names are compared by ``cookie_key``: case-insensitively, percent-decoded, with the
  mangling PHP applies (``.`` and space read as ``_``, ``name[x]`` read as ``name``), so a
  spelling some back end would read as an owned cookie counts as that cookie. Kept pairs keep
  their order and bytes; several ``Cookie`` headers become one; no empty ``Cookie`` is sent.
- A ``Cookie`` header is parsed strictly (RFC 6265 section 4.2.1: ``name=value`` pairs
  separated by ``;``, a name of token characters other than ``.``, ``%`` and ``$``, a value
  of cookie-octets, optionally quoted) and rebuilt from the pairs that pass, joined by
  ``"; "``. A pair a lenient parser could split or fold differently (``a=1 b=2``,
  ``a=1,b=2``, ``a[b=1``, ``a.b=1``, a bare ``value``) is dropped and counted
  (``malformed_cookies``). A request whose cookies need no change is forwarded untouched.
- No header whose name has a character other than ``[A-Za-z0-9-]`` remains: ``X_TT_User``
  is read as ``x-tt-user`` by some servers (NGINX ignores them by default), and PHP reads
  ``X-Shop.User`` as ``HTTP_X_SHOP_USER``. ``check_names`` rejects such a request up front
  when ``boundary.underscore_headers`` (for ``_``) or ``boundary.header_names`` (for the
  rest) is ``reject``; ``scrub`` drops them in every mode, so a caller that skips
  ``check_names`` still cannot leak through them.
- The forwarding and routing-override headers (``config.FORWARDING_HEADERS``: ``Forwarded``,
  ``X-Real-IP``, ``True-Client-IP``, ``X-Original-URL``, ``X-Rewrite-URL``, the method
  overrides) are removed unless ``boundary.forwarding.pass_headers`` names them.
- A cross-system identity header (``boundary.consent.identities``) reaches its
  ``to_system`` only with a valid consent token for exactly that user, direction and scope;
  it never reaches a third system; its ``from_system`` (its owner) always gets it. Without
  ``consent.key`` it never crosses.
- The consent header itself is never forwarded upstream, to any system.
- ``baggage`` and ``tracestate`` (W3C trace context a client may fill with user data) reach
  a system only if ``tracing.propagate`` lists them for it; counted as ``headers``.
- ``filter_response`` reads each ``Set-Cookie`` line as a browser stores it (RFC 6265bis
  section 5.6: the pair before the first ``;``, split at the first ``=``, a pair without
  ``=`` being a nameless cookie, blanks trimmed) and removes the line when that cookie is
  owned by another system (``cookie_key``), nameless, or not a strict pair as above
  (``tt_x=1 _SID_Tokopedia_=x`` would come back as a ``Cookie`` a lenient server splits).
- An unknown system name is treated as owning nothing: everything owned is stripped.

Everything is decided in ``Boundary.__init__``; per request the work is set lookups.

Consent token: ``b64url(payload) + "." + b64url(HMAC-SHA256(key, b64url(payload)))``,
base64url without padding, the payload being JSON
``{"sub": user, "from": system, "to": system, "scopes": [...], "exp": epoch_seconds}``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple
from urllib.parse import unquote

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from .config import FORWARDING_HEADERS, TRACE_CONTEXT_FIELDS, Config, CrossIdentity

__all__ = [
    "CONSENT_RESULTS",
    "KINDS",
    "Boundary",
    "ConsentClaims",
    "ConsentResult",
    "Stripped",
    "cookie_key",
    "decode_token",
    "make_token",
    "verify_token",
]

ConsentResult = Literal["valid", "missing", "invalid", "expired", "mismatch"]
# Label values, for pre-binding metric children.
CONSENT_RESULTS: Final[tuple[ConsentResult, ...]] = (
    "valid",
    "missing",
    "invalid",
    "expired",
    "mismatch",
)
KINDS: Final = (
    "headers",
    "cookies",
    "identities",
    "underscore",
    "header_names",
    "malformed_cookies",
    "forwarding",
)
# Longest consent token looked at; anything longer is ``invalid`` without further work.
MAX_TOKEN_LENGTH: Final = 4096
# Verified tokens remembered per Boundary (an app resends one token for its whole TTL);
# only correctly signed tokens get in, and the cache is emptied when full.
TOKEN_CACHE_SIZE: Final = 4096

_B64URL: Final = re.compile(r"[A-Za-z0-9_-]+").fullmatch
# What PHP does to a cookie name before it is a key of $_COOKIE.
_NAME_MANGLE: Final = str.maketrans({" ": "_", ".": "_"})
# A lower-cased cookie name without these is its own key (the fast, common case).
_NEEDS_CANONICAL: Final = re.compile(r"[%\[. \t]").search
# One cookie pair every stack reads alike (RFC 6265 section 4.1.1): a token name without
# the characters some stack folds or decodes ("." and "%": PHP; "$": RFC 2109 attributes),
# "=", a value of cookie-octets (no blank, '"', ",", ";" or "\\"), optionally quoted.
_COOKIE_PAIR: Final = re.compile(
    r"([A-Za-z0-9!#&'*+^_`|~-]+)=(\"?)[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*\2"
).fullmatch
# A whole Cookie header of strict pairs (see _COOKIE_PAIR) joined by "; ".
_STRICT_COOKIES: Final = re.compile(
    r"(?:{pair})(?:; (?:{pair}))*".format(
        pair=r"[A-Za-z0-9!#&'*+^_`|~-]+=(?:[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"
        r'|"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")'
    )
).fullmatch
# Characters that make a browser ignore a whole Set-Cookie line (RFC 6265bis 5.6 step 1).
_CONTROL: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f]").search


class Stripped(NamedTuple):
    """What ``scrub`` removed from one request, per kind, and the consent decision
    (``None`` when the request carried no identity header gated by consent).

    A NamedTuple: built per request, and a tuple is several times cheaper to build than a
    frozen dataclass."""

    headers: int = 0
    cookies: int = 0
    identities: int = 0
    underscore: int = 0
    header_names: int = 0
    malformed_cookies: int = 0
    forwarding: int = 0
    consent: ConsentResult | None = None

    def counts(self) -> tuple[tuple[str, int], ...]:
        """``(kind, n)`` for each kind with ``n > 0``, kinds as in ``KINDS``."""
        counts = (
            self.headers,
            self.cookies,
            self.identities,
            self.underscore,
            self.header_names,
            self.malformed_cookies,
            self.forwarding,
        )
        return tuple((kind, n) for kind, n in zip(KINDS, counts, strict=True) if n)


# What ``scrub`` returns when it removed and judged nothing (compared by identity).
NOTHING: Final = Stripped()


def _safe_names(joined: str) -> bool:
    """Whether header names joined into one string use only ``[A-Za-z0-9-]`` (isalnum is
    Unicode: isascii first; two C calls, cheaper than a regex scan)."""
    return joined.isascii() and (joined.replace("-", "").isalnum() or not joined)


def browser_cookie(set_cookie: str) -> tuple[str, str] | None:
    """The (name, value) a browser stores for one ``Set-Cookie`` line (RFC 6265bis section
    5.6, before attributes), or None when it stores nothing (a control character, or an
    empty name and value). A nameless cookie has name ``""``."""
    if _CONTROL(set_cookie) is not None:
        return None
    pair = set_cookie.partition(";")[0]
    name, eq, value = pair.partition("=")
    if not eq:
        name, value = "", name
    name, value = name.strip(" \t"), value.strip(" \t")
    if not name and not value:
        return None
    return name, value


def cookie_key(name: str) -> str:
    """The form of a cookie name that ownership is decided on.

    Back ends disagree on cookie names: some compare case-insensitively, PHP percent-decodes
    names, reads ``.`` and space as ``_`` and ``a[b]`` as an array under ``a``. A name that
    any of them would read as an owned cookie is that cookie."""
    key = name.lower()
    if _NEEDS_CANONICAL(key) is None:
        return key
    key = key.strip(" \t")
    if "%" in key:
        key = unquote(key, errors="replace")
    key = key.strip(" \t").lower()
    bracket = key.find("[")
    if bracket > 0:
        key = key[:bracket]
    return key.translate(_NAME_MANGLE)


# -- consent tokens ------------------------------------------------------------------


class ConsentClaims(NamedTuple):
    sub: str
    from_system: str
    to_system: str
    scopes: frozenset[str]
    exp: float


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else key


def _signature(key: bytes, payload_b64: str) -> str:
    return _b64e(hmac.digest(key, payload_b64.encode("ascii"), "sha256"))


def make_token(
    key: str | bytes,
    user: str,
    from_system: str,
    to_system: str,
    scopes: Iterable[str],
    ttl_seconds: float,
    now: float | None = None,
) -> str:
    """A consent token: ``user`` lets ``to_system`` receive their ``from_system`` identity
    for ``scopes`` until ``now + ttl_seconds`` (rounded up to a whole second)."""
    scope_list = list(dict.fromkeys(scopes))
    if not _key_bytes(key):
        raise ValueError("consent key is empty")
    if not scope_list:
        raise ValueError("a consent token needs at least one scope")
    if not ttl_seconds > 0:
        raise ValueError("ttl_seconds must be positive")
    issued = time.time() if now is None else now
    payload = {
        "sub": user,
        "from": from_system,
        "to": to_system,
        "scopes": scope_list,
        "exp": math.ceil(issued + ttl_seconds),
    }
    payload_b64 = _b64e(orjson.dumps(payload))
    return f"{payload_b64}.{_signature(_key_bytes(key), payload_b64)}"


def decode_token(key: str | bytes, token: str) -> ConsentClaims | None:
    """The claims of a token whose signature and shape are valid, else ``None``.
    Expiry is not checked here."""
    if len(token) > MAX_TOKEN_LENGTH:
        return None
    payload_b64, dot, signature = token.partition(".")
    if not dot or not _B64URL(payload_b64) or not _B64URL(signature):
        return None
    # Compare encoded signatures: one canonical spelling, no decode of attacker bytes first.
    if not hmac.compare_digest(signature, _signature(_key_bytes(key), payload_b64)):
        return None
    try:
        raw = base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4))
        data = orjson.loads(raw)
    except (binascii.Error, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    sub, src, dst = data.get("sub"), data.get("from"), data.get("to")
    scopes, exp = data.get("scopes"), data.get("exp")
    if not (isinstance(sub, str) and isinstance(src, str) and isinstance(dst, str)):
        return None
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        return None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return ConsentClaims(sub, src, dst, frozenset(scopes), float(exp))


def _judge(
    claims: ConsentClaims, user: str, from_system: str, to_system: str, scope: str, now: float
) -> ConsentResult:
    if claims.exp <= now:
        return "expired"
    if (
        claims.from_system != from_system
        or claims.to_system != to_system
        or scope not in claims.scopes
        or claims.sub != user
    ):
        return "mismatch"
    return "valid"


def verify_token(
    key: str | bytes,
    token: str,
    *,
    user: str,
    from_system: str,
    to_system: str,
    scope: str,
    now: float | None = None,
) -> ConsentResult:
    """``valid`` if ``token`` lets ``to_system`` receive ``user``'s ``from_system`` identity
    for ``scope`` at ``now``; otherwise why not (``invalid``, ``expired``, ``mismatch``)."""
    claims = decode_token(key, token)
    if claims is None:
        return "invalid"
    now = time.time() if now is None else now
    return _judge(claims, user, from_system, to_system, scope, now)


# -- the boundary --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rules:
    """Everything ``scrub``/``filter_response`` need for one destination system."""

    headers: tuple[str, ...]  # owned by another system, or forwarding: always stripped
    identities: tuple[str, ...]  # another pair's identity headers: always stripped
    gated: tuple[CrossIdentity, ...]  # identities this system may get with consent
    cookies: frozenset[str]  # cookie_key of cookies owned by another system
    # Every header name ``scrub`` removes, lower-cased, to the slot it is counted in
    # (``_REMOVED``, ``_FORWARDING``, ``_IDENTITY``; ``_CONSENT``: read, then removed):
    # one dict lookup per header instead of one ``popall`` per rule.
    plan: Mapping[str, int]


# Slots of ``_Rules.plan``.
_REMOVED: Final = 0
_FORWARDING: Final = 1
_IDENTITY: Final = 2
_CONSENT: Final = 3


class Boundary:
    """The per-system header and cookie rules of one ``Config``; immutable once built
    (apart from a bounded cache of verified consent tokens)."""

    __slots__ = (
        "_clock",
        "_consent_header",
        "_forwarding",
        "_key",
        "_rules",
        "_tokens",
        "_unknown",
        "names_reject",
        "trusted_hops",
        "underscore_reject",
    )

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        spec = config.boundary
        self.underscore_reject: Final = spec.underscore_headers == "reject"
        self.names_reject: Final = spec.header_names == "reject"
        self.trusted_hops: Final = spec.forwarding.xff_num_trusted_hops
        passed = {h.lower() for h in spec.forwarding.pass_headers}
        self._forwarding: Final = tuple(h for h in FORWARDING_HEADERS if h not in passed)
        self._consent_header: Final = spec.consent.header.lower()
        key = spec.consent.key
        self._key: Final = key.encode("utf-8") if key else None
        self._clock: Final = clock
        self._tokens: Final[dict[str, ConsentClaims]] = {}

        header_owners: dict[str, set[str]] = {}
        cookie_owners: dict[str, set[str]] = {}
        for name, system in config.systems.items():
            for header in system.owns.headers:
                header_owners.setdefault(header.lower(), set()).add(name)
            for cookie in system.owns.cookies:
                cookie_owners.setdefault(cookie_key(cookie), set()).add(name)
        identities = [
            CrossIdentity(
                header=i.header.lower(),
                from_system=i.from_system,
                to_system=i.to_system,
                scope=i.scope,
            )
            for i in spec.consent.identities
        ]

        propagate = config.tracing.propagate

        def rules(system: str | None) -> _Rules:
            gated = tuple(i for i in identities if i.to_system == system)
            gated_names = {i.header for i in gated}
            own = {i.header for i in identities if i.from_system == system}
            crossing = {i.header for i in identities} - gated_names - own
            foreign = {h for h, owners in header_owners.items() if owners - {system}}
            # Trace context a client sent may carry user data (baggage: "user=..."): like
            # identity, dropped toward a system unless tracing.propagate lists it for it.
            foreign.update(set(TRACE_CONTEXT_FIELDS) - set(propagate.get(system or "", ())))
            headers = tuple(sorted(foreign - gated_names - crossing))
            plan = dict.fromkeys(crossing, _IDENTITY)  # later kinds win, as in ``scrub``
            plan.update(dict.fromkeys(self._forwarding, _FORWARDING))
            plan.update(dict.fromkeys(headers, _REMOVED))
            plan[self._consent_header] = _CONSENT
            return _Rules(
                headers=headers,
                identities=tuple(sorted(crossing)),
                gated=gated,
                cookies=frozenset(k for k, owners in cookie_owners.items() if owners - {system}),
                plan=plan,
            )

        self._rules: Final = {name: rules(name) for name in config.systems}
        self._unknown: Final = rules(None)

    # -- requests ----------------------------------------------------------------------

    def check_names(
        self, headers: Mapping[str, str] | CIMultiDictProxy[str]
    ) -> tuple[str, str] | None:
        """``(reason, message)`` to answer 400 with for a request with a header name outside
        ``[A-Za-z0-9-]`` whose kind is in ``reject`` mode; ``None`` when it may proceed."""
        if _safe_names("".join(headers.keys())):
            return None
        for name in headers:
            if _safe_names(name):
                continue
            shown = name if len(name) <= 64 else name[:64] + "..."
            if "_" in name and self.underscore_reject:
                return "underscore_header", f"header name {shown!r} contains '_'; use '-'"
            if self.names_reject and not _safe_names(name.replace("_", "")):
                return "header_name", (
                    f"header name {shown!r} has a character other than letters, digits and '-'"
                )
        return None

    def scrub(self, headers: CIMultiDict[str], system: str) -> Stripped:
        """Remove from the outgoing request headers what ``system`` must not see."""
        rules = self._rules.get(system, self._unknown)
        plan = rules.plan
        safe = _safe_names("".join(headers.keys()))  # the common case: no name to judge
        tokens: list[str] = []
        kept: list[tuple[str, str]] | None = None  # made at the first removal
        removed = forwarding = identities = underscore = unsafe = 0
        for i, (name, value) in enumerate(headers.items()):
            slot = plan.get(name.lower())
            if slot is None and (safe or _safe_names(name)):
                if kept is not None:
                    kept.append((name, value))
                continue
            if kept is None:
                kept = list(headers.items())[:i]
            if slot == _CONSENT:
                tokens.append(value)
            elif not (safe or _safe_names(name)):
                if "_" in name:
                    underscore += 1
                else:
                    unsafe += 1
            elif slot == _REMOVED:
                removed += 1
            elif slot == _FORWARDING:
                forwarding += 1
            else:
                identities += 1
        if kept is not None:
            headers.clear()
            headers.extend(kept)

        consent: ConsentResult | None = None
        if rules.gated:
            claims: ConsentClaims | ConsentResult | None = None
            for ident in rules.gated:
                values = headers.getall(ident.header, ())
                if not values:
                    continue
                if claims is None:
                    claims = self._claims(tokens)
                if isinstance(claims, str):
                    result = claims
                elif len(values) != 1:
                    result = "mismatch"
                else:
                    result = _judge(
                        claims,
                        values[0],
                        ident.from_system,
                        ident.to_system,
                        ident.scope,
                        self._clock(),
                    )
                if result != "valid":
                    identities += len(headers.popall(ident.header))
                if consent is None or consent == "valid":
                    consent = result

        cookies, malformed = self._scrub_cookies(headers, rules.cookies)
        if not (removed or cookies or identities or underscore or unsafe or consent) and not (
            malformed or forwarding
        ):
            return NOTHING
        return Stripped(
            removed, cookies, identities, underscore, unsafe, malformed, forwarding, consent
        )

    def _claims(self, tokens: list[str] | tuple[()]) -> ConsentClaims | ConsentResult:
        if not tokens:
            return "missing"
        if len(tokens) != 1 or self._key is None:
            return "invalid"
        token = tokens[0]
        claims = self._tokens.get(token)
        if claims is None:
            claims = decode_token(self._key, token)
            if claims is None:
                return "invalid"
            if len(self._tokens) >= TOKEN_CACHE_SIZE:
                self._tokens.clear()
            self._tokens[token] = claims
        return claims

    @staticmethod
    def _scrub_cookies(headers: CIMultiDict[str], foreign: frozenset[str]) -> tuple[int, int]:
        """Rebuild the ``Cookie`` header from its strict pairs not owned by another system;
        (owned pairs dropped, malformed pairs dropped)."""
        values = headers.getall("Cookie", ())
        if not values:
            return 0, 0
        if len(values) == 1 and _STRICT_COOKIES(values[0]) is not None:
            # Already in the one spelling (the common case): only ownership to decide, and
            # a strict pair holds no "; " and no "=" in its name.
            pairs = values[0].split("; ")
            kept = [p for p in pairs if p.partition("=")[0].lower() not in foreign]
            if len(kept) == len(pairs):
                return 0, 0
            headers.popall("Cookie")
            if kept:
                headers["Cookie"] = "; ".join(kept)
            return len(pairs) - len(kept), 0
        kept = []
        dropped = malformed = 0
        for value in values:
            for raw in value.split(";"):
                pair = raw.strip(" \t")
                if not pair:
                    continue
                match = _COOKIE_PAIR(pair)
                if match is None:
                    malformed += 1
                elif match.group(1).lower() in foreign:
                    dropped += 1
                else:
                    kept.append(pair)
        rebuilt = "; ".join(kept)
        if len(values) == 1 and rebuilt == values[0]:
            return 0, 0  # untouched, byte for byte
        headers.popall("Cookie")
        if kept:
            headers["Cookie"] = rebuilt
        return dropped, malformed

    # -- responses ---------------------------------------------------------------------

    def filter_response(self, headers: CIMultiDict[str], system: str) -> int:
        """Drop each ``Set-Cookie`` in ``system``'s response that sets a cookie owned by
        another system; the number dropped."""
        values = headers.getall("Set-Cookie", ())
        if not values:
            return 0
        foreign = self._rules.get(system, self._unknown).cookies
        kept = [v for v in values if _stored_safely(v, foreign)]
        if len(kept) == len(values):
            return 0
        headers.popall("Set-Cookie")
        for value in kept:
            headers.add("Set-Cookie", value)
        return len(values) - len(kept)


def _stored_safely(set_cookie: str, foreign: frozenset[str]) -> bool:
    """Whether the cookie a browser stores for this ``Set-Cookie`` line is a named strict
    pair (see ``_COOKIE_PAIR``) that no other system owns."""
    stored = browser_cookie(set_cookie)
    if stored is None or not stored[0]:
        return False  # ignored by browsers, maybe not by an app's HTTP client; nameless
    name, value = stored
    if _COOKIE_PAIR(f"{name}={value}") is None:
        return False
    return cookie_key(name) not in foreign
