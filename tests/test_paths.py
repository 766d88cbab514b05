"""Tests for proxy.paths: the one canonical path per request."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import paths
from proxy.paths import MAX_TARGET_BYTES, PathError, Target, canonicalize

ALL_REASONS = frozenset(
    {
        "too-long",
        "fragment",
        "asterisk-form",
        "not-origin-form",
        "userinfo",
        "bad-authority",
        "authority-mismatch",
        "control-char",
        "backslash",
        "space",
        "non-ascii",
        "invalid-char",
        "bad-escape",
        "encoded-slash",
        "encoded-backslash",
        "double-encoding",
        "invalid-utf8",
        "dot-segment-above-root",
        "path-parameter",
    }
)

SHOP = "shop.example"

# (raw_target, host, expected_path, expected_query)
ACCEPTED: list[tuple[str, str | None, str, str]] = [
    # plain paths
    ("/", None, "/", ""),
    ("/a/b", None, "/a/b", ""),
    ("/api/v1/pay-ment_x.json~", None, "/api/v1/pay-ment_x.json~", ""),
    ("/a:b@c!$&'()*+,=", None, "/a:b@c!$&'()*+,=", ""),
    ("/a/.hidden", None, "/a/.hidden", ""),
    ("/.well-known/x", None, "/.well-known/x", ""),
    ("/a/.../b", None, "/a/.../b", ""),
    ("/a/..b/c.", None, "/a/..b/c.", ""),
    # query preserved verbatim
    ("/a/b?x=1&y=2", None, "/a/b", "x=1&y=2"),
    ("/a?q=%2F%2e%2E;\\|<>{}", None, "/a", "q=%2F%2e%2E;\\|<>{}"),
    ("/a?%zz%", None, "/a", "%zz%"),
    ("/a?b?c", None, "/a", "b?c"),
    ("/a?", None, "/a", ""),
    ("/a/./b?x=/../y", None, "/a/b", "x=/../y"),
    ("/a?q=caf\u00e9", None, "/a", "q=caf\u00e9"),
    # unreserved escapes decoded, others kept and uppercased
    ("/%41%42c", None, "/ABc", ""),
    ("/%7E%7euser", None, "/~~user", ""),
    ("/%2D%2e%5F%30", None, "/-._0", ""),
    ("/a%3ab", None, "/a%3Ab", ""),
    ("/a%3Ab", None, "/a%3Ab", ""),
    ("/a%20b", None, "/a%20b", ""),
    ("/a%3fb%23c%40", None, "/a%3Fb%23c%40", ""),
    ("/a%22%3c%7c", None, "/a%22%3C%7C", ""),
    # %25 not followed by two hex digits is kept
    ("/%25", None, "/%25", ""),
    ("/a%25zz", None, "/a%25zz", ""),
    ("/100%25/off", None, "/100%25/off", ""),
    ("/%25%2e", None, "/%25.", ""),
    # valid multi-byte UTF-8 kept encoded (uppercased)
    ("/%E2%82%AC", None, "/%E2%82%AC", ""),
    ("/caf%c3%a9", None, "/caf%C3%A9", ""),
    ("/%f0%9f%98%80", None, "/%F0%9F%98%80", ""),
    # full-width look-alikes are NOT '/' or '.': kept as they are
    ("/a%EF%BC%8Fb", None, "/a%EF%BC%8Fb", ""),
    ("/%EF%BC%8E%EF%BC%8E/a", None, "/%EF%BC%8E%EF%BC%8E/a", ""),
    ("/a/%ef%bc%8e/b", None, "/a/%EF%BC%8E/b", ""),
    # dot segments
    ("/a/./b", None, "/a/b", ""),
    ("/a/../b", None, "/b", ""),
    ("/a/b/..", None, "/a/", ""),
    ("/a/b/.", None, "/a/b/", ""),
    ("/a/.", None, "/a/", ""),
    ("/.", None, "/", ""),
    ("/a/..", None, "/", ""),
    ("/a/b/../../c", None, "/c", ""),
    ("/a/%2e%2e/b", None, "/b", ""),
    ("/a/b/%2E./c", None, "/a/c", ""),
    ("/a/b/.%2e/c", None, "/a/c", ""),
    ("/a/%2e/b", None, "/a/b", ""),
    ("/a/b/%2E%2E", None, "/a/", ""),
    # merged slashes (merged before dot segments are resolved)
    ("//a", None, "/a", ""),
    ("/a//b", None, "/a/b", ""),
    ("/a///b//", None, "/a/b/", ""),
    ("//", None, "/", ""),
    ("/a//../b", None, "/b", ""),
    ("//evil.example/x", None, "/evil.example/x", ""),
    # trailing slash preserved
    ("/a/b/", None, "/a/b/", ""),
    ("/a/b/?x", None, "/a/b/", "x"),
    # absolute-form
    ("http://shop.example/a?x", SHOP, "/a", "x"),
    ("http://shop.example/a?x", None, "/a", "x"),
    ("HTTP://Shop.Example/a", SHOP, "/a", ""),
    ("http://shop.example/a", "SHOP.example", "/a", ""),
    ("http://shop.example:80/a", SHOP, "/a", ""),
    ("http://shop.example/a", "shop.example:80", "/a", ""),
    ("http://shop.example:/a", SHOP, "/a", ""),
    ("https://shop.example:443/a", SHOP, "/a", ""),
    ("hTTpS://shop.example/a", "shop.example:443", "/a", ""),
    ("http://shop.example:8080/a", "shop.example:8080", "/a", ""),
    ("http://shop.example", SHOP, "/", ""),
    ("http://shop.example?x=1", SHOP, "/", "x=1"),
    ("http://shop.example/a/../b//c", SHOP, "/b/c", ""),
    ("http://[::1]:8080/a", "[::1]:8080", "/a", ""),
    ("http://127.0.0.1/a", "127.0.0.1:80", "/a", ""),
    # Host is irrelevant for origin-form
    ("/a", "other.example", "/a", ""),
    # length bound is inclusive
    ("/" + "a" * (MAX_TARGET_BYTES - 1), None, "/" + "a" * (MAX_TARGET_BYTES - 1), ""),
]

# (raw_target, host, expected_reason)
REJECTED: list[tuple[str, str | None, str]] = [
    # too long
    ("/" + "a" * MAX_TARGET_BYTES, None, "too-long"),
    ("/" + "%41" * 3000, None, "too-long"),
    ("/?" + "\u00e9" * 5000, None, "too-long"),  # 5000 chars but 10002 bytes
    # fragment
    ("/a#b", None, "fragment"),
    ("/a?x#b", None, "fragment"),
    ("/#", None, "fragment"),
    # query
    ("/a?x=1\x00", None, "control-char"),
    ("/a?x=1\r\nX-Evil: 1", None, "control-char"),
    ("/a?x\x7f", None, "control-char"),
    ("/a?x y", None, "space"),
    # target forms
    ("*", None, "asterisk-form"),
    ("*?x", None, "asterisk-form"),
    ("", None, "not-origin-form"),
    ("?x=1", None, "not-origin-form"),
    ("a/b", None, "not-origin-form"),
    ("ftp://shop.example/a", None, "not-origin-form"),
    ("http:/a", None, "not-origin-form"),
    ("shop.example:80", None, "not-origin-form"),
    # absolute-form authority
    ("http://user@shop.example/a", SHOP, "userinfo"),
    ("http://user:pw@shop.example/a", None, "userinfo"),
    ("http://shop.example\\@evil.example/", SHOP, "userinfo"),
    ("http:///a", None, "bad-authority"),
    ("http://shop.example:99999/a", None, "bad-authority"),
    ("http://shop.example:8x/a", None, "bad-authority"),
    ("http://shop example/a", None, "bad-authority"),
    ("http://evil.example/pay", SHOP, "authority-mismatch"),
    ("http://shop.example:443/a", SHOP, "authority-mismatch"),
    ("https://shop.example/a", "shop.example:80", "authority-mismatch"),
    ("http://shop.example:8080/a", SHOP, "authority-mismatch"),
    ("http://shop.example/a", "shop.example:8080", "authority-mismatch"),
    ("http://shop.example/a", "", "authority-mismatch"),
    ("http://shop.example./a", SHOP, "authority-mismatch"),
    # raw bytes that cannot appear in a path
    ("/a\x00b", None, "control-char"),
    ("/a\tb", None, "control-char"),
    ("/a\r\nb", None, "control-char"),
    ("/a\x7fb", None, "control-char"),
    ("/a\\b", None, "backslash"),
    ("/a\\..\\b", None, "backslash"),
    ("/a b", None, "space"),
    ("/caf\u00e9", None, "non-ascii"),
    ("/a\uff0fb", None, "non-ascii"),  # raw FULLWIDTH SOLIDUS
    ("/a|b", None, "invalid-char"),
    ("/a<b>", None, "invalid-char"),
    ('/a"b', None, "invalid-char"),
    ("/a[0]", None, "invalid-char"),
    # malformed escapes
    ("/a%", None, "bad-escape"),
    ("/a%G1", None, "bad-escape"),
    ("/a%4", None, "bad-escape"),
    ("/a%4/b", None, "bad-escape"),
    ("/a%%41", None, "bad-escape"),
    # encoded slash / backslash, both cases
    ("/a%2Fb", None, "encoded-slash"),
    ("/a%2fb", None, "encoded-slash"),
    ("/..%2F..%2Fetc", None, "encoded-slash"),
    ("/a%5Cb", None, "encoded-backslash"),
    ("/a%5cb", None, "encoded-backslash"),
    # encoded control bytes
    ("/a%00b", None, "control-char"),
    ("/a%0Ab", None, "control-char"),
    ("/a%0d%0a", None, "control-char"),
    ("/a%1f", None, "control-char"),
    ("/a%7F", None, "control-char"),
    ("/a%7f", None, "control-char"),
    # double encoding, also when assembled from decoded unreserved escapes
    ("/a%252Fb", None, "double-encoding"),
    ("/%252e%252e/a", None, "double-encoding"),
    ("/a%2525", None, "double-encoding"),
    ("/a%25%32%46", None, "double-encoding"),
    ("/a%25ab", None, "double-encoding"),
    # invalid UTF-8
    ("/%FF", None, "invalid-utf8"),
    ("/%80", None, "invalid-utf8"),
    ("/%C0%AE", None, "invalid-utf8"),  # overlong '.'
    ("/%C0%AF", None, "invalid-utf8"),  # overlong '/'
    ("/%c0%ae%c0%ae/a", None, "invalid-utf8"),
    ("/%E0%80%AE", None, "invalid-utf8"),  # 3-byte overlong '.'
    ("/%E0%80%AF", None, "invalid-utf8"),  # 3-byte overlong '/'
    ("/%F0%80%80%AF", None, "invalid-utf8"),  # 4-byte overlong '/'
    ("/%ED%A0%80", None, "invalid-utf8"),  # UTF-16 surrogate U+D800
    ("/%F4%90%80%80", None, "invalid-utf8"),  # above U+10FFFF
    ("/%E2%82", None, "invalid-utf8"),  # truncated
    ("/%C3", None, "invalid-utf8"),  # truncated at end
    ("/%E2a%82%AC", None, "invalid-utf8"),  # interrupted by a raw character
    ("/%E2%41%82%AC", None, "invalid-utf8"),  # interrupted by a decoded escape
    # climbing above the root
    ("/..", None, "dot-segment-above-root"),
    ("/../a", None, "dot-segment-above-root"),
    ("/a/../..", None, "dot-segment-above-root"),
    ("/%2e%2e/", None, "dot-segment-above-root"),
    ("/%2E./etc/passwd", None, "dot-segment-above-root"),
    ("/.%2e", None, "dot-segment-above-root"),
    ("/a/..//../b", None, "dot-segment-above-root"),
    ("/a//..//..", None, "dot-segment-above-root"),
    ("http://shop.example/../a", SHOP, "dot-segment-above-root"),
    # path parameters
    ("/a;b", None, "path-parameter"),
    ("/api/pay;x/ment", None, "path-parameter"),
    ("/a;", None, "path-parameter"),
    ("/a%3Bb", None, "path-parameter"),
    ("/a%3bb", None, "path-parameter"),
    ("/..;/admin", None, "path-parameter"),
    # precedence: the earlier rule wins
    ("/a;b/%2F", None, "encoded-slash"),
    ("/../%252F", None, "double-encoding"),
    ("/a b#c", None, "fragment"),
]


@pytest.mark.parametrize(("raw_target", "host", "expected_path", "expected_query"), ACCEPTED)
def test_accepted_targets_canonicalize_to_expected_path_and_query(
    raw_target: str, host: str | None, expected_path: str, expected_query: str
) -> None:
    assert canonicalize(raw_target, host) == Target(expected_path, expected_query)


@pytest.mark.parametrize(("raw_target", "host", "expected_reason"), REJECTED)
def test_rejected_targets_raise_path_error_with_expected_reason(
    raw_target: str, host: str | None, expected_reason: str
) -> None:
    assert expected_reason in ALL_REASONS
    with pytest.raises(PathError) as excinfo:
        canonicalize(raw_target, host)
    assert excinfo.value.reason == expected_reason


def test_case_tables_are_large_and_cover_every_reason() -> None:
    assert len(ACCEPTED) + len(REJECTED) >= 60
    assert {reason for _, _, reason in REJECTED} == ALL_REASONS


@pytest.mark.parametrize(
    "encoded",
    [b"\xc0\xae", b"\xc0\xaf", b"\xe0\x80\xae", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf"],
)
def test_python_strict_utf8_decoder_rejects_overlongs_and_surrogates(encoded: bytes) -> None:
    with pytest.raises(UnicodeDecodeError):
        encoded.decode("utf-8")


def test_path_error_is_value_error_with_reason_and_human_message() -> None:
    with pytest.raises(ValueError, match="encoded slash") as excinfo:
        canonicalize("/a%2Fb")
    error = excinfo.value
    assert isinstance(error, PathError)
    assert error.reason == "encoded-slash"
    assert str(error) != error.reason


def test_path_error_message_does_not_echo_the_whole_target() -> None:
    secret = "/" + "s" * 100 + "%2F"
    with pytest.raises(PathError) as excinfo:
        canonicalize(secret)
    assert "s" * 100 not in str(excinfo.value)


def test_target_is_frozen_and_slotted() -> None:
    target = canonicalize("/a?b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.path = "/other"  # type: ignore[misc]
    assert not hasattr(target, "__dict__")


@pytest.mark.parametrize("raw_target", ["/", "/a/b", "/api/v1/orders/42?page=2&x", "/a/b/"])
def test_plain_targets_take_the_fast_path(raw_target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_path(path: str) -> str:
        raise AssertionError(f"slow path taken for {path!r}")

    monkeypatch.setattr(paths, "_canonical_path", slow_path)
    path, _, query = raw_target.partition("?")
    assert canonicalize(raw_target) == Target(path, query)


# Property tests -------------------------------------------------------------------------

_SAFE_TOKENS = [
    "/", "/", "/", "a", "b", "Z", "0", "-", "_", "~", ".", "..", ":", "@", "!", "$", "&",
    "'", "(", ")", "*", "+", ",", "=", "%2e", "%2E", "%41", "%7e", "%3a", "%3A", "%20",
    "%25", "%E2%82%AC", "%c3%a9", "%EF%BC%8F", "%ef%bc%8e",
]  # fmt: skip
_RISKY_TOKENS = [
    "%2F", "%5c", ";", "%3B", "%C0%AE", "%E2%82", "%", "%4", "\\", " ", "|", "?", "#", "\u00e9",
    "\x00", "%00", "%2525",
]  # fmt: skip
_UNRESERVED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~")


def _outcome(raw_target: str) -> Target | str:
    """The Target, or the PathError reason."""
    try:
        return canonicalize(raw_target)
    except PathError as error:
        return error.reason


_targets = st.one_of(
    st.lists(st.sampled_from(_SAFE_TOKENS * 4 + _RISKY_TOKENS), max_size=30).map(
        lambda tokens: "/" + "".join(tokens)
    ),
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=40).map(lambda s: "/" + s),
)


@settings(max_examples=500, deadline=None, database=None)
@given(raw_target=_targets)
def test_accepted_result_is_idempotent_rooted_and_free_of_dot_and_empty_segments(
    raw_target: str,
) -> None:
    result = _outcome(raw_target)
    if isinstance(result, str):
        assert result in ALL_REASONS
        return
    path = result.path
    assert path.startswith("/")
    assert "//" not in path
    assert "/./" not in path
    assert "/../" not in path
    segments = path.split("/")
    assert "." not in segments
    assert ".." not in segments
    assert canonicalize(path) == Target(path, "")
    assert canonicalize(path + "?" + result.query) == result


@settings(max_examples=300, deadline=None, database=None)
@given(
    pieces=st.lists(
        st.tuples(st.sampled_from(_SAFE_TOKENS), st.sampled_from(["keep", "upper", "lower"])),
        max_size=30,
    )
)
def test_percent_encoding_unreserved_characters_does_not_change_the_outcome(
    pieces: list[tuple[str, str]],
) -> None:
    plain = "/" + "".join(token for token, _ in pieces)
    encoded_parts = ["/"]
    for token, how in pieces:
        if len(token) == 1 and token in _UNRESERVED and how != "keep":
            escape = f"%{ord(token):02X}"
            encoded_parts.append(escape if how == "upper" else escape.lower())
        else:
            encoded_parts.append(token)
    encoded = "".join(encoded_parts)

    assert _outcome(encoded) == _outcome(plain)
