"""Canonical form of a request path.

The proxy decides exactly ONE canonical path per request. That path is used for route
matching AND is what gets forwarded upstream: never route on one spelling and send another.
Anything that cannot be reduced to a single unambiguous path is rejected with
:class:`PathError`, whose ``reason`` is a short stable slug suitable as a metric label.

References: RFC 3986 sections 5.2.4 and 6.2.2, and Envoy's ``normalize_path``,
``merge_slashes`` and ``path_with_escaped_slashes_action: REJECT_REQUEST``.

Rules, applied in this order (when a target has several faults, the reason reported is
the one of the first rule that fails; within one rule, the leftmost fault):

0. A raw target longer than :data:`MAX_TARGET_BYTES` bytes is rejected ("too-long").
1. Any ``#`` is rejected ("fragment"): clients never send a fragment. The query is split
   off at the first ``?`` and returned unchanged, but it may not contain control bytes
   ("control-char") or a raw space ("space").
2. ``*`` is rejected ("asterisk-form"; the caller handles ``OPTIONS *`` itself).
   Absolute-form (``http://`` / ``https://``, scheme case-insensitive) has its authority
   checked: userinfo is rejected ("userinfo"), a malformed authority is rejected
   ("bad-authority"), and when ``host`` is given the authority must equal it
   (case-insensitive, the scheme's default port equals no port) or the target is rejected
   ("authority-mismatch"). Anything else that does not start with ``/`` (including the
   empty target) is rejected ("not-origin-form").
3. Raw characters in the path: control bytes ("control-char"), backslash ("backslash"),
   space ("space"), non-ASCII ("non-ascii"), and the printable ASCII characters RFC 3986
   never allows in a path, ``" < > [ ] ^ ` { | }`` ("invalid-char"). Clients must
   percent-encode these.
4. Percent-escapes: ``%`` without two hex digits ("bad-escape"); ``%2F`` ("encoded-slash");
   ``%5C`` ("encoded-backslash"); escapes of control bytes ("control-char"). Escapes of
   unreserved characters (ALPHA / DIGIT / ``-._~``) are decoded; all other escapes are kept
   with UPPERCASE hex. After that, ``%25`` followed by two hex digits is rejected
   ("double-encoding"), and escaped bytes >= 0x80 must decode as strict UTF-8: no invalid
   sequences, overlongs, surrogates or code points above U+10FFFF ("invalid-utf8").
   Full-width look-alikes such as ``%EF%BC%8F`` (U+FF0F FULLWIDTH SOLIDUS) and ``%EF%BC%8E``
   (U+FF0E FULLWIDTH FULL STOP) are valid UTF-8 and are kept, still encoded; they are NOT
   treated as ``/`` or ``.``. A back end that applies Unicode compatibility normalisation
   (NFKC) could read them as such; a variant check for that is a separate, later change.
5. Repeated slashes are merged and dot segments are resolved, on the decoded form (so
   ``%2e%2e`` is ``..``). Slashes are merged first, i.e. an empty segment never absorbs a
   ``..`` (``/a//../b`` is ``/b``, as nginx and Tomcat read it). A ``..`` that would climb
   above the root is rejected ("dot-segment-above-root"), never clamped. A trailing slash
   is preserved, and a final ``.`` or ``..`` segment leaves one (``/a/.`` is ``/a/``).
6. Path parameters, raw ``;`` or ``%3B``, are rejected ("path-parameter"): back ends such
   as Tomcat or Spring strip ``;...`` and would read ``/api/pay;x/ment`` differently.
7. The result is never empty; the shortest canonical path is ``/``.

The canonical path contains only RFC 3986 ``pchar`` characters other than ``;``, plus ``/``,
and ``%XX`` escapes with uppercase hex, and :func:`canonicalize` is idempotent on it.
The caller must forward ``Target.path`` byte for byte (e.g. to yarl with ``encoded=True``)
so that no later layer re-normalises it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_to_bytes

__all__ = ["MAX_TARGET_BYTES", "PathError", "Target", "canonical_host", "canonicalize"]

# Upper bound on the raw request-target, in bytes. It bounds the work (regex scans,
# splitting, UTF-8 decoding) and memory spent per request on attacker-controlled input
# before anything is routed, and it keeps pathological targets out of logs and of back
# ends whose own limits may be lower. 8 KiB matches the common request-line limits of
# nginx, Envoy and aiohttp.
MAX_TARGET_BYTES: Final[int] = 8192

_MESSAGES: Final[dict[str, str]] = {
    "too-long": f"request target longer than {MAX_TARGET_BYTES} bytes",
    "fragment": "request target contains a '#' fragment",
    "asterisk-form": "asterisk-form request target '*'",
    "not-origin-form": "request target is neither origin-form nor http(s) absolute-form",
    "userinfo": "absolute-form request target contains userinfo",
    "bad-authority": "absolute-form request target has a malformed authority",
    "authority-mismatch": "absolute-form authority does not match the Host header",
    "control-char": "control character in request target",
    "backslash": "raw backslash in path",
    "space": "raw space in request target",
    "non-ascii": "raw non-ASCII character in path (must be percent-encoded)",
    "invalid-char": "character not allowed in a path (must be percent-encoded)",
    "bad-escape": "malformed percent-escape in path",
    "encoded-slash": "percent-encoded slash in path",
    "encoded-backslash": "percent-encoded backslash in path",
    "double-encoding": "double percent-encoding in path",
    "invalid-utf8": "percent-encoded bytes in path are not valid UTF-8",
    "dot-segment-above-root": "'..' segment climbs above the root",
    "path-parameter": "';' path parameter in path",
    "invalid-host": "invalid Host header (RFC 9112 section 3.2: a host and an optional port)",
    "several-hosts": "more than one Host header",
}


class PathError(ValueError):
    """A request target that cannot be made unambiguous.

    ``.reason`` is a short stable machine-readable slug (used as a metric label);
    ``str(exc)`` is a human message. The message never echoes more than one offending
    character or escape of the (attacker-controlled) target.
    """

    reason: str

    def __init__(self, reason: str, detail: str | None = None) -> None:
        message = _MESSAGES.get(reason, reason)
        super().__init__(message if detail is None else f"{message}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Target:
    """Canonical form of a request target."""

    path: str
    """Canonical path: starts with ``/``, percent-encoded ASCII form."""
    query: str
    """Raw query string without the ``?``, unchanged (``""`` when absent)."""


# Character classes (inside [...]) ---------------------------------------------------------
_UNRESERVED: Final = "A-Za-z0-9\\-._~"
_SUB_DELIMS_NO_SEMI: Final = "!$&'()*+,="  # RFC 3986 sub-delims minus ';' (rule 6)
_PCHAR: Final = _UNRESERVED + _SUB_DELIMS_NO_SEMI + ":@"
_PCHAR_NO_DOT: Final = "A-Za-z0-9\\-_~" + _SUB_DELIMS_NO_SEMI + ":@"

# Fast path: a whole target of non-empty segments made of plain pchars, none starting
# with '.', so there is no '%', no '//', no '/.', no ';', plus an optional clean query.
# Segment characters exclude '/', so matching is linear (no backtracking).
_SEGMENT: Final = f"[{_PCHAR_NO_DOT}][{_PCHAR}]*"
_FAST_PATH: Final = f"/(?:{_SEGMENT}(?:/{_SEGMENT})*/?)?"
_FAST_TARGET_RE: Final = re.compile(f"{_FAST_PATH}(?:\\?[^\\x00-\\x20\\x7f#]*)?")
_FAST_PATH_RE: Final = re.compile(_FAST_PATH)

# Rule 1: forbidden in the query.
_QUERY_BAD_RE: Final = re.compile("[\\x00-\\x20\\x7f]")
# Rule 3: any raw path character other than pchar, '/', '%' and ';' (';' is rule 6).
_RAW_BAD_RE: Final = re.compile(f"[^{_PCHAR}/%;]")
# Rule 4.
_BAD_ESCAPE_RE: Final = re.compile("%(?![0-9A-Fa-f]{2})")
_ESCAPE_RE: Final = re.compile("%([0-9A-Fa-f]{2})")
_DOUBLE_ENCODING_RE: Final = re.compile("%25[0-9A-Fa-f]{2}")
_HIGH_ESCAPE_RE: Final = re.compile("%[89A-F][0-9A-F]")  # runs after hex is uppercased
# Rule 2: absolute-form, and host[:port] in an authority or a Host header.
_ABSOLUTE_RE: Final = re.compile("(https?)://([^/]*)(.*)", re.IGNORECASE | re.DOTALL)
_HOST_PORT_RE: Final = re.compile(
    f"(\\[[0-9A-Fa-f:.]+\\]|[{_UNRESERVED}{_SUB_DELIMS_NO_SEMI};]+)(?::([0-9]*))?"
)
_DEFAULT_PORTS: Final[dict[str, int]] = {"http": 80, "https": 443}
# A Host already in its canonical spelling (lower case, no trailing dot), port optional.
_PLAIN_HOST_RE: Final = re.compile("([a-z0-9-]+(?:\\.[a-z0-9-]+)*)(?::[0-9]{1,5})?")
# Any valid Host (RFC 9112 section 3.2, RFC 3986 section 3.2.2): an IP literal or a name of
# unreserved characters (no userinfo, path, query, escape or sub-delimiter a lenient server
# could cut at), an optional port.
_HOST_RE: Final = re.compile(f"(\\[[0-9A-Fa-f:.]+\\]|[{_UNRESERVED}]+)(?::([0-9]{{0,5}}))?")


def _build_escape_tables() -> tuple[dict[str, str], dict[str, str]]:
    """Map every two-hex-digit spelling (any case) to its replacement or rejection reason."""
    accept: dict[str, str] = {}
    reject: dict[str, str] = {}
    digits = "0123456789abcdefABCDEF"
    unreserved = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
    for hi in digits:
        for lo in digits:
            key = hi + lo
            value = int(key, 16)
            if value == 0x2F:
                reject[key] = "encoded-slash"
            elif value == 0x5C:
                reject[key] = "encoded-backslash"
            elif value < 0x20 or value == 0x7F:
                reject[key] = "control-char"
            elif chr(value) in unreserved:
                accept[key] = chr(value)
            else:
                accept[key] = "%" + key.upper()
    return accept, reject


_ESCAPE_ACCEPT, _ESCAPE_REJECT = _build_escape_tables()


def _replace_escape(match: re.Match[str]) -> str:
    key = match.group(1)
    replacement = _ESCAPE_ACCEPT.get(key)
    if replacement is None:
        raise PathError(_ESCAPE_REJECT[key], f"%{key}")
    return replacement


def _raw_char_reason(char: str) -> str:
    code = ord(char)
    if code < 0x20 or code == 0x7F:
        return "control-char"
    if char == "\\":
        return "backslash"
    if char == " ":
        return "space"
    if code > 0x7F:
        return "non-ascii"
    return "invalid-char"


def _byte_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _parse_host_port(value: str, scheme: str) -> tuple[str, int] | None:
    match = _HOST_PORT_RE.fullmatch(value)
    if match is None:
        return None
    port_text = match.group(2)
    port = int(port_text) if port_text else _DEFAULT_PORTS[scheme]
    if port > 65535:
        return None
    return match.group(1).lower(), port


def canonical_host(values: list[str]) -> str:
    """The one spelling of a request's Host that routes are matched on: lower case, without
    its port and without one trailing dot (``PAY.shop.EXAMPLE.:443`` is
    ``pay.shop.example``); ``""`` when the request has none. ``values`` are the request's
    Host header lines. Raises :class:`PathError` for several Host lines or an invalid one
    (userinfo, a path, a second trailing dot, an empty label, a port over 65535)."""
    if not values:
        return ""
    if len(values) != 1:
        raise PathError("several-hosts")
    value = values[0]
    if not value:
        return ""  # a target without an authority (RFC 9112 section 3.2)
    plain = _PLAIN_HOST_RE.fullmatch(value)
    if plain is not None and (value.find(":") == -1 or int(value.rpartition(":")[2]) <= 65535):
        return plain.group(1)
    match = _HOST_RE.fullmatch(value)
    if match is None or (match.group(2) and int(match.group(2)) > 65535):
        raise PathError("invalid-host")
    host = match.group(1).lower()
    if host.endswith(".") and not host.startswith("["):
        host = host[:-1]
    if not host.startswith("[") and (not host or "" in host.split(".")):
        raise PathError("invalid-host")  # "", "a..b", ".a", "a.." (two trailing dots)
    return host


def _check_authority(scheme: str, authority: str, host: str | None) -> None:
    if "@" in authority:
        raise PathError("userinfo")
    parsed = _parse_host_port(authority, scheme)
    if parsed is None:
        raise PathError("bad-authority")
    if host is not None and _parse_host_port(host, scheme) != parsed:
        raise PathError("authority-mismatch")


def _resolve_segments(path: str) -> str:
    """Merge repeated slashes, then resolve '.' and '..' (RFC 3986 5.2.4, but strict)."""
    segments = path.split("/")  # path starts with '/', so segments[0] == ""
    kept: list[str] = []
    for segment in segments:
        if segment in ("", "."):
            continue
        if segment == "..":
            if not kept:
                raise PathError("dot-segment-above-root")
            kept.pop()
        else:
            kept.append(segment)
    if not kept:
        return "/"
    trailing = "/" if segments[-1] in ("", ".", "..") else ""
    return "/" + "/".join(kept) + trailing


def _canonical_path(path: str) -> str:
    """Canonicalise a path that starts with '/' (rules 3 to 7)."""
    if _FAST_PATH_RE.fullmatch(path):
        return path
    bad = _RAW_BAD_RE.search(path)
    if bad is not None:
        char = bad.group()
        raise PathError(_raw_char_reason(char), repr(char))
    if "%" in path:
        bad = _BAD_ESCAPE_RE.search(path)
        if bad is not None:
            raise PathError("bad-escape", repr(path[bad.start() : bad.start() + 3]))
        path = _ESCAPE_RE.sub(_replace_escape, path)
        # Checked on the decoded form: "%25%34%31" becomes "%2541" here.
        if _DOUBLE_ENCODING_RE.search(path):
            raise PathError("double-encoding")
        if _HIGH_ESCAPE_RE.search(path):
            # Raw characters are ASCII by now, so this validates exactly the escaped
            # bytes, and an ASCII character inside a multi-byte sequence breaks it.
            # Python's strict decoder rejects overlongs, surrogates and > U+10FFFF.
            try:
                unquote_to_bytes(path).decode("utf-8")
            except UnicodeDecodeError:
                raise PathError("invalid-utf8") from None
    if "//" in path or "/." in path:
        path = _resolve_segments(path)
    if ";" in path or "%3B" in path:
        raise PathError("path-parameter")
    return path


def canonicalize(raw_target: str, host: str | None = None) -> Target:
    """Return the one canonical path (and the untouched query) of a request target.

    ``raw_target`` is the request-target exactly as on the request line; ``host`` is the
    Host header value (may include a port), checked against an absolute-form authority.
    Raises :class:`PathError` if the target cannot be made unambiguous.
    """
    length = len(raw_target)
    # A UTF-8 character is at most 4 bytes, so only long non-ASCII targets need encoding.
    if length > MAX_TARGET_BYTES or (
        length > MAX_TARGET_BYTES // 4
        and not raw_target.isascii()
        and _byte_length(raw_target) > MAX_TARGET_BYTES
    ):
        raise PathError("too-long")
    if _FAST_TARGET_RE.fullmatch(raw_target):
        path, _, query = raw_target.partition("?")
        return Target(path, query)

    if "#" in raw_target:
        raise PathError("fragment")
    path, _, query = raw_target.partition("?")
    bad = _QUERY_BAD_RE.search(query)
    if bad is not None:
        raise PathError("space" if bad.group() == " " else "control-char", "in query")
    if path == "*":
        raise PathError("asterisk-form")
    if not path.startswith("/"):
        absolute = _ABSOLUTE_RE.fullmatch(path)
        if absolute is None:
            raise PathError("not-origin-form")
        scheme, authority, path = absolute.groups()
        _check_authority(scheme.lower(), authority, host)
        if not path:
            path = "/"
    return Target(_canonical_path(path), query)
