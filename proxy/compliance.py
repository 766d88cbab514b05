"""Compliance: a transaction category never reaches a social system after its deadline.

Permendag 31/2023 lets a social platform (``kind: social``) promote goods but not process
payment transactions. Jalur enforces that in four layers, each failing closed:

1. :func:`static_violations` (run by ``config.parse``, so by ``jalur check`` and every load
   and reload): a route whose ``category`` is one of ``compliance.transaction_categories``
   may name only clusters of a ``kind: commerce`` system. The one exception is a cluster
   listed in ``compliance.legacy_clusters`` (it must belong to a social system): it may be
   named while ``compliance.transition_until`` is set and still in the future; after that
   (or with no deadline at all) only with split weight 0. An earlier non-transaction route
   to a social cluster that can match a transaction route's paths (e.g. a catch-all ``/``
   placed first) is rejected too: it would carry that route's traffic to the social system.
2. :class:`Guard` (per request, after the route is chosen): every (route, cluster) pair has
   an ``allowed_until`` epoch computed at config load -- ``inf`` for commerce clusters and
   non-transaction routes, the deadline for a legacy cluster inside its window, ``-inf``
   otherwise -- so a running proxy stops using a legacy cluster at the deadline to the
   second, without a reload. A pair not in the table (unknown route or cluster) is refused.
   The caller (``forward``) answers 503 when the chosen cluster is refused: it never
   falls back to another cluster, so a stale split shows up as counted, audited 503s
   rather than as traffic silently moved. :meth:`Guard.compliant_targets` lists what is
   still allowed (for the admin view).
3. :class:`VariantCheck` (per request, when the chosen route goes to a social system or no
   route matched): the raw target and the canonical path that is forwarded are read the
   ways a back end might read them (case-folded, ``;params`` stripped, percent-decoded once
   more, NFKC, trailing dots and spaces trimmed, backslashes as slashes, cut at a decoded
   ``?``/``#``/NUL, dot segments resolved or not, non-ASCII letters whose Java or Turkish
   case mapping is an ASCII letter read as that letter: the dotless and dotted i, U+0131 and
   U+0130, the long s, the Kelvin sign); a numeric segment is read as the number
   ``Long.parseLong`` or ``strconv`` would return (``+1``, ``01``, Arabic-Indic one U+0661
   are ``1``); a route that names a resource
   (exact or regex) also takes that resource with a format suffix (``/api/cart.json``) or
   with trailing segments (``/api/orders/1/items``), as suffix-pattern and path-info
   routing do. If any reading matches a transaction route's path (prefix, exact or regex,
   case-insensitively), the caller answers 400. The
   check is path-only on purpose: a social back end does not care which Host or method a
   legacy payment handler was reached through. A plain lower-case path has one reading,
   itself, and costs one regex match.
4. :class:`AuditLog`: one JSON line per transaction-category request and per blocked
   request, written by a thread from a bounded queue. A record is never lost silently:
   with ``on_overflow: drop`` every dropped record is counted (``AuditLog.dropped``) and
   the log itself gets a ``"decision": "dropped"`` line with the count. The lines form a
   hash chain sealed per segment under ``audit.key`` (:mod:`proxy.audit`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import queue
import re
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import IO, Any, Final

from . import audit as chain
from . import overlap
from .config import Audit, Config, FieldError, Match
from .config import Route as RouteSpec
from .paths import MAX_TARGET_BYTES, PathError, canonicalize
from .router import Route, Router

__all__ = [
    "AMBIGUOUS_VARIANT",
    "AUDIT_FIELDS",
    "SOCIAL_AFTER_DEADLINE",
    "SOCIAL_NOT_ALLOWED",
    "TRANSACTION_VARIANT",
    "UNKNOWN_CLUSTER",
    "AuditLog",
    "Guard",
    "VariantCheck",
    "readings",
    "static_violations",
]

log = logging.getLogger("jalur.compliance")

# Reason slugs (bounded metric label values of jalur_compliance_blocked_total{reason}).
SOCIAL_AFTER_DEADLINE: Final = "social-after-deadline"
SOCIAL_NOT_ALLOWED: Final = "social-not-allowed"
UNKNOWN_CLUSTER: Final = "unknown-cluster"
TRANSACTION_VARIANT: Final = "transaction-variant"
# The target has so many ambiguous spellings (or is so long) that reading all of them would
# cost more than a request is worth; refused rather than half-checked.
AMBIGUOUS_VARIANT: Final = "ambiguous-variant"


# -- static check -------------------------------------------------------------------------


def static_violations(config: Config, now: datetime | None = None) -> list[FieldError]:
    """Every way ``config`` could send a transaction category to a social system at ``now``.

    ``now`` defaults to the current UTC time; a naive ``now`` is taken as UTC. Names that
    do not resolve (unknown cluster or system) are skipped here: ``config`` reports them.
    A ``transition_until`` without a UTC offset (also reported by ``config``) opens no
    window."""
    comp = config.compliance
    tx = frozenset(comp.transaction_categories)
    legacy = frozenset(comp.legacy_clusters)
    until = comp.transition_until
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    window_open = until is not None and until.tzinfo is not None and now < until
    errors: list[FieldError] = []

    for i, name in enumerate(comp.legacy_clusters):
        kind = _kind_of(config, name)
        if kind is not None and kind != "social":
            system = config.clusters[name].system
            errors.append(
                FieldError(
                    f"$.compliance.legacy_clusters[{i}]",
                    f"cluster {name!r} belongs to {kind} system {system!r}; only clusters of "
                    "a social system can be legacy clusters",
                )
            )

    for i, route in enumerate(config.routes):
        if route.category not in tx:
            continue
        for at, name, weight in _targets_of(route, i):
            if _kind_of(config, name) != "social":
                continue  # commerce, or unresolved (reported by config)
            system = config.clusters[name].system
            who = (
                f"route {route.name!r} (category {route.category!r}) sends to cluster "
                f"{name!r} of social system {system!r}"
            )
            if name not in legacy:
                errors.append(
                    FieldError(
                        at,
                        f"{who}; category {route.category!r} may only be served by a commerce "
                        "system (a social cluster may carry it only as one of "
                        "compliance.legacy_clusters, until compliance.transition_until)",
                    )
                )
            elif window_open or weight == 0:
                continue
            elif until is None or until.tzinfo is None:
                errors.append(
                    FieldError(
                        at,
                        f"{who}, a legacy cluster, but compliance.transition_until is not set, "
                        "so there is no transition window; give it weight 0 or remove it",
                    )
                )
            else:
                errors.append(
                    FieldError(
                        at,
                        f"{who}, a legacy cluster whose transition window ended at "
                        f"{until.isoformat()} (compliance.transition_until); give it weight 0 "
                        "or remove it",
                    )
                )

    errors.extend(_shadowing(config, tx))
    return errors


def _kind_of(config: Config, cluster: str) -> str | None:
    spec = config.clusters.get(cluster)
    if spec is None:
        return None
    system = config.systems.get(spec.system)
    return system.kind if system is not None else None


def _targets_of(route: RouteSpec, i: int) -> Iterator[tuple[str, str, int | None]]:
    """(field path, cluster, split weight or None for ``to``) of each target of a route."""
    if route.to is not None:
        yield f"$.routes[{i}].to", route.to, None
    for j, target in enumerate(route.split or ()):
        yield f"$.routes[{i}].split[{j}].cluster", target.cluster, target.weight
    if route.shadow is not None:
        # A shadow copy is a request like any other: the same systems rule applies.
        yield f"$.routes[{i}].shadow.cluster", route.shadow.cluster, None


def _shadowing(config: Config, tx: frozenset[str]) -> list[FieldError]:
    """Earlier non-transaction routes to a social cluster that take a transaction route's
    paths (first match wins), whatever their matcher kind (host, prefix, exact, regex).
    Prefix/exact overlap is decided exactly, regex overlap by sampling both languages
    (``overlap``: a refusal is always right, a regex overlap outside the samples is left
    to :class:`VariantCheck` at run time). Header matchers are ignored (a header does not
    make a payment path safe to send to a social system)."""
    errors: list[FieldError] = []
    social: list[tuple[int, RouteSpec, str]] = []  # earlier routes with a social target
    for i, route in enumerate(config.routes):
        if route.category in tx:
            if _path_kind(route.match) is None and route.match.host is None:
                continue  # every path and host: told apart by method/headers only
            for j, earlier, system in social:
                if _overlap(earlier.match, route.match):
                    errors.append(
                        FieldError(
                            f"$.routes[{j}].match",
                            f"route {earlier.name!r} (category {earlier.category!r}, to social "
                            f"system {system!r}) comes before transaction route {route.name!r} "
                            f"($.routes[{i}], category {route.category!r}) and can match the "
                            "same requests, which would then reach the social system; put the "
                            "transaction route first or narrow this match",
                        )
                    )
            continue
        for _, name, weight in _targets_of(route, i):
            if weight != 0 and _kind_of(config, name) == "social":
                social.append((i, route, config.clusters[name].system))
                break
    return errors


def _path_kind(m: Match) -> str | None:
    if m.exact is not None:
        return "exact"
    if m.regex is not None:
        return "regex"
    if m.prefix is not None and m.prefix != "/":
        return "prefix"
    return None  # every path


def _overlap(earlier: Match, later: Match) -> bool:
    if not _hosts_overlap(earlier.host, later.host):
        return False
    if (
        earlier.methods is not None
        and later.methods is not None
        and not set(earlier.methods) & set(later.methods)
    ):
        return False
    if _path_kind(earlier) is None or _path_kind(later) is None:
        return True  # one takes every path: any path of the other is shared
    return overlap.overlap(_paths(earlier), _paths(later))


def _paths(m: Match) -> overlap.PathMatcher:
    return overlap.PathMatcher(m.exact, m.prefix, m.regex, m.case_sensitive)


def _hosts_overlap(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return True
    a, b = a.lower().removesuffix("."), b.lower().removesuffix(".")
    # "*.shop.test" takes every host ending in ".shop.test" (as the router does).
    a_suffix = a[1:] if a.startswith("*.") else None
    b_suffix = b[1:] if b.startswith("*.") else None
    if a_suffix is not None and b_suffix is not None:
        return a_suffix.endswith(b_suffix) or b_suffix.endswith(a_suffix)
    if a_suffix is not None:
        return b.endswith(a_suffix)
    if b_suffix is not None:
        return a.endswith(b_suffix)
    return a == b


# -- runtime guard ------------------------------------------------------------------------


class Guard:
    """Which cluster each route may use at a given time; built once per config load.

    ``check`` is one dict lookup and one float compare. A legacy cluster is allowed while
    ``now < deadline`` (strictly: at the deadline second it is already refused)."""

    __slots__ = ("_routes", "_table", "deadline", "transaction_categories")

    def __init__(self, config: Config, router: Router) -> None:
        comp = config.compliance
        self.transaction_categories: frozenset[str] = frozenset(comp.transaction_categories)
        until = comp.transition_until
        self.deadline: float | None = (
            until.timestamp() if until is not None and until.tzinfo is not None else None
        )
        legacy = frozenset(comp.legacy_clusters)
        self._table: dict[tuple[str, str], tuple[float, str]] = {}
        # route -> (every target, the earliest allowed_until, (cluster, allowed_until)...)
        self._routes: dict[str, tuple[tuple[str, ...], float, tuple[tuple[str, float], ...]]] = {}
        for route in router.routes:
            pairs: list[tuple[str, float]] = []
            for target in route.targets:
                entry = self._entry(config, legacy, route.category, target.cluster)
                self._table[(route.name, target.cluster)] = entry
                pairs.append((target.cluster, entry[0]))
            if route.spec.shadow is not None:  # checked per copy, never a route target
                shadow = route.spec.shadow.cluster
                self._table[(route.name, shadow)] = self._entry(
                    config, legacy, route.category, shadow
                )
            self._routes[route.name] = (
                tuple(c for c, _ in pairs),
                min((u for _, u in pairs), default=-math.inf),
                tuple(pairs),
            )

    def _entry(
        self, config: Config, legacy: frozenset[str], category: str, cluster: str
    ) -> tuple[float, str]:
        if category not in self.transaction_categories:
            return math.inf, ""
        kind = _kind_of(config, cluster)
        if kind == "commerce":
            return math.inf, ""
        if kind == "social" and cluster in legacy and self.deadline is not None:
            return self.deadline, SOCIAL_AFTER_DEADLINE
        return -math.inf, SOCIAL_NOT_ALLOWED

    def check(self, route_name: str, cluster: str, now: float) -> str | None:
        """None when ``route_name`` may send to ``cluster`` at ``now`` (epoch seconds),
        else the reason slug."""
        entry = self._table.get((route_name, cluster))
        if entry is None:
            return UNKNOWN_CLUSTER
        if now < entry[0]:
            return None
        return entry[1]

    def allowed_until(self, route_name: str, cluster: str) -> float:
        """Epoch seconds until which the pair is allowed (``-inf``: never, ``inf``: always)."""
        entry = self._table.get((route_name, cluster))
        return -math.inf if entry is None else entry[0]

    def compliant_targets(self, route_name: str, now: float) -> tuple[str, ...]:
        """The route's clusters (config order, weight-0 ones included) allowed at ``now``;
        empty for an unknown route or when none is, which the caller answers with 503."""
        info = self._routes.get(route_name)
        if info is None:
            return ()
        every, earliest, pairs = info
        if now < earliest:
            return every
        return tuple(c for c, until in pairs if now < until)


# -- variant check ------------------------------------------------------------------------

# Most readings a target may have before it is refused as ambiguous. Each step can double
# them (or triple, for the decoding ones); ordinary paths have one to four.
MAX_READINGS: Final = 256

# Verdicts remembered per VariantCheck, for paths up to this length (memory <= ~2 MiB).
_CACHE_SIZE: Final = 4096
_CACHED_PATH_LENGTH: Final = 512

_SAFE: Final = "[a-z0-9_~!$&'()*+,=:@-]+"
# A target whose every reading is itself: lower case, no escapes, no ';', no empty, dot or
# dot-ended segment, no query or a query we ignore.
_PLAIN: Final = re.compile(f"(?:/{_SAFE}(?:\\.{_SAFE})*)+/?|/").fullmatch
_ABSOLUTE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
_ESCAPES: Final = re.compile("(?:%[0-9A-Fa-f]{2})+")
_SLASHES: Final = re.compile(r"/{2,}")
_CUT: Final = re.compile("[?#\x00]")


# A segment that some stack parses as a number: blanks, a sign, leading zeros, any Unicode
# decimal digits (Java's Long.parseLong takes Character.digit, Python's int() takes \d),
# then anything (JavaScript's parseInt and PHP's (int) read the leading digits only).
# Only the first 64 digits are read: int() refuses over 4300, and no id is that long.
_NUMBER: Final = re.compile(r"(?<=/)\s*([+-]?\d{1,64})[^/]*")
# A reading none of whose segments is spelled other than its number: the common case.
_ODD_NUMBER: Final = re.compile(r"/(?:\s|[+-]\d|0\d|\d+[^\d/])").search
# A resource route (exact or regex) also takes a format suffix and trailing segments.
_RESOURCE_TAIL: Final = r"(?:\.[^/]*)?(?:/.*)?"


def _ascii_folds() -> dict[int, str]:
    """Non-ASCII characters (Java's ``char`` range) whose upper- or lower-case mapping is an
    ASCII letter (U+0131 -> I, U+0130 -> i, long s U+017F -> S, Kelvin sign U+212A -> k):
    ``equalsIgnoreCase`` and Turkish-locale case mapping read them as that letter."""
    table: dict[int, str] = {}
    for code in range(0x80, 0x10000):
        char = chr(code)
        upper = char.upper()  # one char, as Character.toUpperCase ("ß" -> "SS" is not)
        for mapped in (char.lower()[:1], upper if len(upper) == 1 else ""):
            if mapped.isascii() and mapped.isalpha():
                table[code] = mapped.lower()
                break
    return table


_ASCII_FOLDS: Final = _ascii_folds()


def _canonical_number(m: re.Match[str]) -> str:
    # Without its sign: a back end routes "/orders/-1" to its orders handler all the same.
    return str(abs(int(m.group(1))))


def _numbers(reading: str) -> str:
    """``reading`` with each segment that starts as a number read as that number, when
    some segment is spelled other than its number (a sign, a leading zero or blank,
    non-ASCII digits, a tail after the digits)."""
    if reading.isascii() and _ODD_NUMBER(reading) is None:
        return reading
    return _NUMBER.sub(_canonical_number, reading)


def _decode_run(m: re.Match[str]) -> str:
    return bytes.fromhex(m.group().replace("%", "")).decode("utf-8", "replace")


def _decode(s: str) -> str:
    """``urllib.parse.unquote(s, errors="replace")``, several times faster on long runs."""
    return _ESCAPES.sub(_decode_run, s)


def _nfkc(s: str) -> str:
    return unicodedata.normalize("NFKC", s)


def _strip_params(s: str) -> str:
    return "/".join(seg.split(";", 1)[0] for seg in s.split("/"))


def _trim(s: str) -> str:
    return "/".join(seg if seg in (".", "..") else seg.rstrip(". ") for seg in s.split("/"))


def _dot_ended(s: str) -> bool:
    return "./" in s or " /" in s or s.endswith((".", " "))


def _backslash(s: str) -> tuple[str, ...]:
    return (s.replace("\\", "/"),)


def _cut(s: str) -> tuple[str, ...]:
    m = _CUT.search(s)
    return (s,) if m is None else (s[: m.start()],)


def _decodes(s: str) -> tuple[str, ...]:
    """Decoded once (every back end) and, when that leaves escapes, twice (some)."""
    once = _decode(s)
    return (once, _decode(once)) if "%" in once else (once,)


def _compat(s: str) -> tuple[str, ...]:
    """NFKC (fullwidth and compatibility forms), then decoded once more when a fullwidth
    percent sign became '%'."""
    folded = _nfkc(s)
    return (folded, _decode(folded)) if "%" in folded else (folded,)


def _params(s: str) -> tuple[str, ...]:
    return (_strip_params(s),)


def _trimmed(s: str) -> tuple[str, ...]:
    return (_trim(s),)


# Each step is applied to every reading so far *and* skipped, so the readings are every
# subset of the steps in this order. A step whose trigger is absent adds nothing.
_STEPS: Final[tuple[tuple[Callable[[str], bool], Callable[[str], tuple[str, ...]]], ...]] = (
    (lambda s: ";" in s, _params),  # Tomcat/Spring strip ';...' before decoding
    (lambda s: "%" in s, _decodes),
    (lambda s: not s.isascii(), _compat),
    (lambda s: "\\" in s, _backslash),  # IIS, Windows file servers
    (lambda s: "?" in s or "#" in s or "\x00" in s, _cut),  # decoded; NUL ends C strings
    (lambda s: ";" in s, _params),  # after decoding ('%3B')
    (_dot_ended, _trimmed),  # Windows: "payment. " is "payment"
)


def _resolve(path: str) -> str:
    """Merge slashes and resolve dot segments leniently ('..' at the root stays there)."""
    segments = path.split("/")
    kept: list[str] = []
    for seg in segments:
        if seg in ("", "."):
            continue
        if seg == "..":
            if kept:
                kept.pop()
            continue
        kept.append(seg)
    if not kept:
        return "/"
    trailing = "/" if segments[-1] in ("", ".", "..") else ""
    return "/" + "/".join(kept) + trailing


def readings(raw_target: str, *, unresolved: bool = False) -> set[str] | None:
    """Every plausible back-end reading of ``raw_target``'s path, lower-cased, slashes
    merged and dot segments resolved; None when there are more than :data:`MAX_READINGS`.

    ``unresolved`` adds each reading with its dot segments left in place, for a path that
    is forwarded as is (the canonical path): a back end may route on
    ``/api/payment/../feed`` before it resolves the dots that decoding or NFKC produced."""
    path = raw_target
    absolute = _ABSOLUTE.match(path)
    if absolute is not None:
        path = path[absolute.end() :]
    path = path.split("#", 1)[0].split("?", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    variants = {path}
    for trigger, step in _STEPS:
        new = [out for v in variants if trigger(v) for out in step(v)]
        if new:
            variants.update(new)
            if len(variants) > MAX_READINGS:
                return None
    out: set[str] = set()
    for v in variants:
        lows = (v.lower(),) if v.isascii() else (v.lower(), v.translate(_ASCII_FOLDS).lower())
        for low in lows:
            if not low.startswith("/"):
                low = "/" + low
            out.add(_resolve(low))
            if unresolved:
                out.add(_SLASHES.sub("/", low))
    return out


class VariantCheck:
    """Refuses a request bound for a social system whose path some back end could read as
    a transaction route's path. Built once per config load."""

    __slots__ = ("_cached", "_literal", "_regexes", "_tx")

    def __init__(self, config: Config, router: Router) -> None:
        self._tx = frozenset(config.compliance.transaction_categories)
        literals: list[str] = []
        regexes: list[Callable[[str], re.Match[str] | None]] = []
        for route in router.routes:
            if route.category not in self._tx:
                continue
            m = route.spec.match
            if m.exact is not None:
                # The resource, with a format suffix, a trailing slash or more segments.
                exact = re.escape(m.exact.lower().rstrip("/"))
                literals.append(f"(?:{exact}(?:\\.[^/]*)?(?:/|\\Z))")
            elif m.regex is not None:
                rx = re.compile(m.regex, re.IGNORECASE)
                # A regex that takes "/" takes everything: it cannot tell a variant apart.
                if rx.fullmatch("/") is None:
                    regexes.append(_resource_regex(m.regex).fullmatch)
            elif m.prefix is not None and m.prefix != "/":
                prefix = m.prefix.lower()
                if prefix.endswith("/"):  # '/api/merchant/' also takes '/api/merchant(.json)'
                    literals.append(f"(?:{re.escape(prefix[:-1])}(?:\\.[^/]*)?(?:/|\\Z))")
                else:
                    literals.append(f"(?:{re.escape(prefix)})")
            # No path matcher, or prefix "/": told apart by host/method/headers, not path.
        self._literal = re.compile("|".join(literals)).match if literals else None
        self._regexes = tuple(regexes)
        # Popular paths (a trending hashtag) repeat: remember the verdict on short ones.
        self._cached = functools.lru_cache(maxsize=_CACHE_SIZE)(self._slow)

    def check(
        self, raw_target: str, chosen_route: Route | None, chosen_system_kind: str
    ) -> str | None:
        """None, or a reason slug (the caller answers 400) when the request would go to a
        social system (or matched no route) and a reading of its path is a transaction
        route's path. Never raises."""
        if chosen_route is not None and (
            chosen_system_kind == "commerce" or chosen_route.category in self._tx
        ):
            return None  # commerce takes anything; a transaction route is the Guard's
        if self._literal is None and not self._regexes:
            return None
        if len(raw_target) > MAX_TARGET_BYTES:
            return AMBIGUOUS_VARIANT
        path = raw_target.partition("?")[0]  # the query is never part of a reading
        low = path.lower()
        if _PLAIN(low):  # its only reading is itself
            return TRANSACTION_VARIANT if self._hit(low) else None
        if len(path) <= _CACHED_PATH_LENGTH:
            return self._cached(path)
        return self._slow(path)

    def _slow(self, path: str) -> str | None:
        # What is forwarded is the canonical path: read that as is, and the raw one.
        try:
            canonical: str | None = canonicalize(path).path
        except PathError:
            canonical = None  # refused by the caller anyway; the raw readings decide
        if canonical == path:
            found = readings(path, unresolved=True)
        else:
            found = readings(path)
            if canonical is not None and found is not None:
                more = readings(canonical, unresolved=True)
                found = None if more is None else found | more
        if found is None:
            return AMBIGUOUS_VARIANT
        for reading in found:
            if self._hit(reading):
                return TRANSACTION_VARIANT
        return None

    def _hit(self, reading: str) -> bool:
        number = _numbers(reading)
        return self._match(reading) or (number != reading and self._match(number))

    def _match(self, reading: str) -> bool:
        if self._literal is not None and self._literal(reading) is not None:
            return True
        return any(fullmatch(reading) is not None for fullmatch in self._regexes)


def _resource_regex(regex: str) -> re.Pattern[str]:
    """A transaction route's regex that also takes a format suffix and trailing segments
    (the regex alone when it cannot be wrapped, e.g. it starts with global flags)."""
    try:
        return re.compile(f"(?:{regex}){_RESOURCE_TAIL}", re.IGNORECASE | re.DOTALL)
    except re.error:
        return re.compile(regex, re.IGNORECASE)


# -- audit log ----------------------------------------------------------------------------

AUDIT_FIELDS: Final = (
    "time",
    "request_id",
    "route",
    "category",
    "cluster",
    "system",
    "status",
    "duration",
    "decision",
    "reason",
)

# Set by the chain only (:mod:`proxy.audit`).
_CHAIN_FIELDS: Final = frozenset({"chain", "seq", "prev"})
# Bytes a file keeps free for its seal (a seal line is about 330 bytes), so that a rotated
# file, seal included, stays within ``max_bytes``.
_SEAL_ROOM: Final = 512

_Item = tuple[float, Mapping[str, Any]]


class _Stop:
    """Queued by ``close``: everything before it is written, then the writer ends."""


_STOP: Final = _Stop()


_rfc3339: Final = chain.rfc3339


class AuditLog:
    """JSON lines, one per transaction-category request and per blocked request.

    ``record`` only puts the entry on a bounded queue (``audit.queue_size``); a writer
    thread encodes (orjson), writes, flushes at least every ``audit.flush_interval``
    seconds and rotates at ``audit.max_bytes`` keeping ``audit.backups`` files
    (``path.1`` newest ... ``path.N``), like ``logging.handlers.RotatingFileHandler``.
    ``path: "-"`` writes to stderr (no rotation).

    When the queue is full: ``on_overflow: drop`` counts the record in ``dropped`` and
    returns at once, and the writer then logs the count as a ``"decision": "dropped"`` line
    (so a gap is visible in the log itself); ``on_overflow: block`` (the default) makes the
    caller -- the event loop -- wait for the writer, trading latency for completeness: a
    stalled disk then stalls the proxy rather than losing an audit record. Records that
    cannot be written (an ``OSError`` such as a full disk) are counted in ``failed`` and
    logged. ``close`` writes everything queued, then joins the thread.

    Chaining (:mod:`proxy.audit`) happens in the writer thread too: the first line a start
    writes is a ``start`` record linked to the file's last line, each rotation writes a
    ``seal`` as the old file's last line and a ``segment`` record as the new file's first,
    and ``close`` ends with a ``seal``. ``key`` signs the seals (None: seals without a MAC,
    which ``jalur audit verify`` refuses). ``chained=False`` writes plain lines (only to
    measure what chaining costs).
    """

    def __init__(self, cfg: Audit, key: str | None = None, *, chained: bool = True) -> None:
        self.cfg = cfg
        self._chain = chain.Chain(key.encode() if key else None, enabled=chained)
        self._after: tuple[str | None, int | None, str] | None = None
        self.dropped = 0  # records refused because the queue was full (or after close)
        self.failed = 0  # records the writer could not write
        self.written = 0
        self._queue: queue.Queue[_Item | _Stop] = queue.Queue(cfg.queue_size)
        self._drop = cfg.on_overflow == "drop"
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stream: IO[bytes] | None = None
        self._size = 0
        self._reported = 0  # drops already written to the log
        self._failing = False

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        """Open the file (in the caller, so a bad path fails loudly) and start the writer."""
        with self._lock:
            if self._thread is not None:
                return
            if self.cfg.path != "-":
                self._after = chain.last_line(self.cfg.path)
                self._open()
            if self._chain.key is None and self._chain.enabled:
                log.warning(
                    "audit log %s: no audit.key (%s): segments are sealed without a MAC and "
                    "`jalur audit verify` will not accept them",
                    self.cfg.path,
                    chain.KEY_ENV,
                )
            self._thread = threading.Thread(target=self._run, name="jalur-audit", daemon=True)
            self._thread.start()

    def record(self, entry: Mapping[str, Any]) -> None:
        """Queue one record; ``time`` is stamped now unless ``entry`` has one. The caller
        must not mutate ``entry`` afterwards."""
        if self._closed:
            with self._lock:
                self.dropped += 1
            log.error("audit record after close: dropped (%d so far)", self.dropped)
            return
        item = (time.time(), entry)
        if not self._drop:
            self._queue.put(item)
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def close(self) -> None:
        """Write every queued record, flush, and stop the writer. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.start()  # records queued before a start() are written too
        self._queue.put(_STOP)  # blocks until the writer makes room
        assert self._thread is not None
        self._thread.join()

    # -- writer thread --

    def _run(self) -> None:
        interval = self.cfg.flush_interval
        last_flush = time.monotonic()
        if self._chain.enabled:
            self._append(self._chain.start(self._after), rotate=False)
        dirty = True
        while True:
            item: _Item | _Stop | None
            try:
                if dirty:
                    wait = max(0.0, last_flush + interval - time.monotonic())
                    item = self._queue.get(timeout=wait)
                else:
                    item = self._queue.get()
            except queue.Empty:
                item = None  # time to flush
            if isinstance(item, _Stop):
                break
            if item is not None:
                self._write_record(*item)
                dirty = True
            if self.dropped != self._reported:
                self._report_drops()
                dirty = True
            if dirty and time.monotonic() - last_flush >= interval:
                self._flush()
                last_flush = time.monotonic()
                dirty = False
        while True:  # a producer blocked in put() while close() ran
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, _Stop):
                self._write_record(*item)
        self._report_drops()
        if self._chain.enabled:
            self._append(self._chain.seal(), rotate=False)
            # An anchor outside the trail (the process log): whoever later removes the
            # newest sealed segments whole cannot make this line disappear too.
            log.info(
                "audit trail %s sealed: chain %s, seq %d, last hash %s",
                self.cfg.path,
                self._chain.id,
                self._chain.seq,
                self._chain.prev,
            )
        self._flush()
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _write_record(self, stamp: float, entry: Mapping[str, Any]) -> None:
        try:
            self._encode_and_write(stamp, entry)
        except Exception:  # the writer must outlive any bad record, or producers wedge
            self.failed += 1
            log.exception("audit record not written")

    def _encode_and_write(self, stamp: float, entry: Mapping[str, Any]) -> None:
        out: dict[str, Any] = {"time": _rfc3339(stamp)}
        for key in AUDIT_FIELDS[1:]:
            out[key] = entry.get(key)
        for key, value in entry.items():
            if key not in _CHAIN_FIELDS:  # a record cannot forge its own link
                out[key] = value  # extra fields, and an explicit "time"
        try:
            written = self._append(out)
        except (TypeError, ValueError) as exc:  # e.g. a circular structure
            self.failed += 1
            log.error("audit record not encodable (%s): %r", exc, out.get("request_id"))
            return
        if written:
            self.written += 1
        else:
            self.failed += 1

    def _append(self, out: dict[str, Any], *, rotate: bool = True) -> bool:
        """Link ``out`` into the chain and write it; rotates first (seal, new file,
        ``segment``) when the line would take the file past ``max_bytes``."""
        line = self._chain.line(out)
        if (
            rotate
            and self.cfg.path != "-"
            and self._size > 0
            and self._size + len(line) + 1 + _SEAL_ROOM > self.cfg.max_bytes
        ):
            try:
                self._rotate()
            except OSError as exc:
                log.error("audit log %s: cannot rotate: %s", self.cfg.path, exc)
                self._close_stream()
                return False
            line = self._chain.line(out)
        if not self._emit(line + b"\n"):
            return False
        self._chain.advance(line)
        return True

    def _report_drops(self) -> None:
        dropped = self.dropped
        count = dropped - self._reported
        if count <= 0:
            return
        self._reported = dropped
        log.warning("audit queue full: %d records dropped (%d in total)", count, dropped)
        notice: dict[str, Any] = {"time": _rfc3339(time.time())}
        notice.update(dict.fromkeys(AUDIT_FIELDS[1:]))
        notice.update(decision="dropped", reason="audit-queue-full", count=count)
        self._append(notice)

    def _emit(self, line: bytes) -> bool:
        try:
            if self.cfg.path == "-":
                sys.stderr.write(line.decode())
            else:
                if self._stream is None:
                    self._open()
                assert self._stream is not None
                self._write(line)
                self._size += len(line)
        except (OSError, ValueError) as exc:  # ValueError: stderr closed under us
            if not self._failing:
                log.error("audit log %s: cannot write: %s", self.cfg.path, exc)
            self._failing = True
            self._close_stream()
            return False
        if self._failing:
            log.warning("audit log %s: writing again (%d records lost)", self.cfg.path, self.failed)
            self._failing = False
        return True

    def _write(self, line: bytes) -> None:
        """The one place bytes go to the file (a test subclass may hold it)."""
        assert self._stream is not None
        self._stream.write(line)

    def _flush(self) -> None:
        try:
            if self.cfg.path == "-":
                sys.stderr.flush()
            elif self._stream is not None:
                self._stream.flush()
        except OSError as exc:
            log.error("audit log %s: cannot flush: %s", self.cfg.path, exc)
            self._close_stream()

    def _open(self) -> None:
        self._stream = open(self.cfg.path, "ab")  # noqa: SIM115
        self._size = os.fstat(self._stream.fileno()).st_size

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()

    def _rotate(self) -> None:
        """Seal the file (when chained), move it aside, open a new one that begins with a
        ``segment`` record. The seal may take the old file a line past ``max_bytes``."""
        path = self.cfg.path
        if self._chain.enabled:
            self._append(self._chain.seal(), rotate=False)
        assert self._stream is not None
        self._stream.close()
        self._stream = None
        backups = self.cfg.backups
        if backups > 0:
            for i in range(backups - 1, 0, -1):
                src = f"{path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{path}.{i + 1}")
            os.replace(path, f"{path}.1")
        else:
            open(path, "wb").close()  # no backups: start the file over
        self._open()
        if self._chain.enabled:
            self._append(self._chain.segment(), rotate=False)
