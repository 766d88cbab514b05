"""The boundary: owned headers and cookies, underscore names, consent, Set-Cookie filtering."""

from __future__ import annotations

import base64
import hmac
import itertools
import json
import time
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import boundary as boundary_module
from proxy import cli
from proxy import config as cfg
from proxy.boundary import (
    KINDS,
    Boundary,
    ConsentResult,
    Stripped,
    cookie_key,
    decode_token,
    make_token,
    verify_token,
)

KEY = "test-consent-key-0123456789"
NOW = 1_700_000_000.0
SYSTEMS: dict[str, Any] = {
    "tiktok": {"kind": "social", "owns": {"cookies": ["tt_session"], "headers": ["x-tt-user"]}},
    "tokopedia": {
        "kind": "commerce",
        "owns": {"cookies": ["_SID_Tokopedia_"], "headers": ["authorization"]},
    },
}
IDENTITY = {
    "header": "x-social-user-id",
    "from_system": "tiktok",
    "to_system": "tokopedia",
    "scope": "checkout",
}


def make_config(
    *,
    underscore: str = "reject",
    key: str | None = KEY,
    identities: list[dict[str, str]] | None = None,
    systems: dict[str, Any] | None = None,
) -> cfg.Config:
    consent: dict[str, Any] = {"identities": [IDENTITY] if identities is None else identities}
    if key is not None:
        consent["key"] = key
    data = {
        "systems": SYSTEMS if systems is None else systems,
        "boundary": {"underscore_headers": underscore, "consent": consent},
    }
    return cfg.parse(yaml.safe_dump(data, sort_keys=False))


def boundary(**kwargs: Any) -> Boundary:
    return Boundary(make_config(**kwargs), clock=lambda: NOW)


def headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def token(
    user: str = "u-42",
    *,
    key: str = KEY,
    from_system: str = "tiktok",
    to_system: str = "tokopedia",
    scopes: tuple[str, ...] = ("checkout",),
    ttl: float = 600,
    now: float = NOW,
) -> str:
    return make_token(key, user, from_system, to_system, scopes, ttl, now=now)


# -- owned headers ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x-tt-user", "X-TT-User", "X-TT-USER", "x-Tt-uSeR"])
def test_header_owned_by_other_system_is_stripped_in_any_case(name: str) -> None:
    h = headers(("Accept", "*/*"), (name, "tt-1"), (name, "tt-2"), ("Authorization", "Bearer t"))
    got = boundary().scrub(h, "tokopedia")
    assert list(h.items()) == [("Accept", "*/*"), ("Authorization", "Bearer t")]
    assert got == Stripped(headers=2)
    assert got.counts() == (("headers", 2),)


def test_header_owned_by_destination_is_kept() -> None:
    h = headers(("X-TT-User", "tt-1"), ("authorization", "Bearer t"))
    got = boundary().scrub(h, "tiktok")
    assert list(h.items()) == [("X-TT-User", "tt-1")]
    assert got.headers == 1


def test_neutral_headers_are_untouched_and_in_order() -> None:
    pairs = [("Accept", "a"), ("X-Forwarded-For", "1.2.3.4"), ("accept", "b"), ("Via", "1.1 x")]
    h = headers(*pairs)
    got = boundary().scrub(h, "tokopedia")
    assert list(h.items()) == pairs
    assert got == Stripped()
    assert got.counts() == ()


def test_unknown_system_gets_nothing_owned() -> None:
    h = headers(
        ("x-tt-user", "1"),
        ("Authorization", "b"),
        ("x-social-user-id", "u-42"),
        ("Cookie", "a=1; tt_session=2; _SID_Tokopedia_=3"),
        ("Accept", "*/*"),
    )
    got = boundary().scrub(h, "somebody-else")
    assert list(h.items()) == [("Accept", "*/*"), ("Cookie", "a=1")]
    assert (got.headers, got.cookies, got.identities) == (2, 2, 1)


def test_a_name_owned_by_two_systems_is_foreign_to_both() -> None:
    # Config validation rejects this; the Boundary itself still fails closed.
    systems = {
        "a": {"kind": "social", "owns": {"headers": ["x-shared"], "cookies": ["c"]}},
        "b": {"kind": "commerce", "owns": {"headers": ["X-Shared"], "cookies": ["C"]}},
    }
    config = msgspec_config(systems)
    b = Boundary(config)
    for system in ("a", "b"):
        h = headers(("x-shared", "1"), ("Cookie", "c=1; d=2"))
        b.scrub(h, system)
        assert list(h.items()) == [("Cookie", "d=2")]


def msgspec_config(systems: dict[str, Any]) -> cfg.Config:
    return msgspec.convert({"systems": systems}, cfg.Config)


# -- cookies ---------------------------------------------------------------------------


def test_cookie_rewrite_keeps_neutral_and_own_cookies_in_order() -> None:
    cookie = 'a=1; tt_session=abc; _SID_Tokopedia_=s; b="xyz"; lang=id'
    h = headers(("Cookie", cookie))
    got = boundary().scrub(h, "tokopedia")
    assert h.getall("Cookie") == ['a=1; _SID_Tokopedia_=s; b="xyz"; lang=id']
    assert got == Stripped(cookies=1)

    h = headers(("Cookie", cookie))
    got = boundary().scrub(h, "tiktok")
    assert h.getall("Cookie") == ['a=1; tt_session=abc; b="xyz"; lang=id']
    assert got == Stripped(cookies=1)


def test_a_quoted_value_with_a_blank_is_malformed() -> None:
    """``b="x y=z"``: a parser splitting at blanks reads a cookie ``y``."""
    h = headers(("Cookie", 'a=1; b="x y=z"; lang=id'))
    assert boundary().scrub(h, "tokopedia") == Stripped(malformed_cookies=1)
    assert h.getall("Cookie") == ["a=1; lang=id"]


@pytest.mark.parametrize(
    "pair",
    [
        "tt_session=x",
        "TT_SESSION=x",
        "Tt_Session=x",
        " tt_session =x",
        "tt%5Fsession=x",  # percent-decoded by PHP and others
        "%54T_session=x",
        "tt.session=x",  # PHP reads '.' and ' ' as '_'
        "tt session=x",
        "tt_session[a]=x",  # PHP array syntax
        "tt_session",  # nameless cookie, read as a name by several servers
        "tt_session=",
    ],
)
def test_foreign_cookie_spellings_are_stripped(pair: str) -> None:
    """Each is dropped: as the owned cookie, or as a pair that is not strict."""
    h = headers(("Cookie", f"a=1; {pair}; b=2"))
    got = boundary().scrub(h, "tokopedia")
    assert h.getall("Cookie") == ["a=1; b=2"]
    assert got.cookies + got.malformed_cookies == 1


def test_cookie_header_removed_when_nothing_is_left() -> None:
    h = headers(("Accept", "*/*"), ("Cookie", "tt_session=1; TT_SESSION=2"))
    got = boundary().scrub(h, "tokopedia")
    assert "Cookie" not in h
    assert list(h.items()) == [("Accept", "*/*")]
    assert got.cookies == 2


def test_two_cookie_headers_are_merged() -> None:
    h = headers(("Cookie", "a=1; tt_session=2"), ("X-Other", "o"), ("cookie", "b=3"))
    got = boundary().scrub(h, "tokopedia")
    assert h.getall("Cookie") == ["a=1; b=3"]
    assert h["X-Other"] == "o"
    assert got.cookies == 1


def test_two_cookie_headers_are_merged_even_when_nothing_is_stripped() -> None:
    h = headers(("Cookie", "a=1"), ("Cookie", "b=2;c=3"))
    assert boundary().scrub(h, "tokopedia") == Stripped()
    assert h.getall("Cookie") == ["a=1; b=2; c=3"]


def test_cookie_header_untouched_byte_for_byte_when_nothing_is_stripped() -> None:
    plain = 'a=1; b=2; d==4; e="q"; f='
    h = headers(("Cookie", plain))
    assert boundary().scrub(h, "tokopedia") == Stripped()
    assert h.getall("Cookie") == [plain]


def test_odd_separators_are_rebuilt_into_the_one_spelling() -> None:
    h = headers(("Cookie", "a=1;tt_session=2;\tb=x=y ;;c"))
    got = boundary().scrub(h, "tokopedia")
    assert h.getall("Cookie") == ["a=1; b=x=y"]
    assert got == Stripped(cookies=1, malformed_cookies=1)  # "c": a bare value


def test_cookie_key() -> None:
    assert cookie_key("_SID_Tokopedia_") == "_sid_tokopedia_"
    assert cookie_key(" A.b c[d]") == "a_b_c"
    assert cookie_key("%5Bx") == "[x"
    assert cookie_key("") == ""


# -- underscore header names -----------------------------------------------------------


def test_underscore_header_rejected_by_default() -> None:
    b = boundary()
    problem = b.check_names(CIMultiDictProxy(headers(("Accept", "a"), ("X_TT_User", "1"))))
    assert problem is not None
    assert problem[0] == "underscore_header"
    assert "X_TT_User" in problem[1]
    assert b.check_names({"Accept": "a", "X-TT-User": "1"}) is None


def test_underscore_rejection_message_is_bounded() -> None:
    problem = boundary().check_names({"x_" + "a" * 500: "1"})
    assert problem is not None
    assert len(problem[1]) < 200


def test_underscore_header_dropped_in_drop_mode() -> None:
    b = boundary(underscore="drop")
    h = headers(("Accept", "a"), ("X_TT_User", "1"), ("x_tt_user", "2"), ("Other_One", "3"))
    assert b.check_names(h) is None
    got = b.scrub(h, "tokopedia")
    assert list(h.items()) == [("Accept", "a")]
    assert got == Stripped(underscore=3)
    assert got.counts() == (("underscore", 3),)


def test_scrub_drops_underscore_headers_in_reject_mode_too() -> None:
    h = headers(("X_TT_User", "1"))
    assert boundary().scrub(h, "tokopedia").underscore == 1
    assert not h


# -- consent ---------------------------------------------------------------------------


def consent_request(tok: str | None, user: str = "u-42") -> CIMultiDict[str]:
    h = headers(("Accept", "*/*"), ("X-Social-User-Id", user))
    if tok is not None:
        h["X-Jalur-Consent"] = tok
    return h


def test_consent_valid_forwards_the_identity() -> None:
    h = consent_request(token())
    got = boundary().scrub(h, "tokopedia")
    assert list(h.items()) == [("Accept", "*/*"), ("X-Social-User-Id", "u-42")]
    assert got == Stripped(consent="valid")


@pytest.mark.parametrize(
    ("tok", "result"),
    [
        (None, "missing"),
        (token(key="another-key-of-some-length"), "invalid"),  # forged
        (token(ttl=600, now=NOW - 601), "expired"),
        (token(ttl=1, now=NOW - 1), "expired"),  # exp == now is expired
        (token(scopes=("feed", "ads")), "mismatch"),  # wrong scope
        (token(from_system="tokopedia", to_system="tiktok"), "mismatch"),  # wrong direction
        (token(to_system="somewhere"), "mismatch"),
        (token("u-43"), "mismatch"),  # another user's consent
        ("", "invalid"),
        ("garbage", "invalid"),
        ("a.b.c", "invalid"),
        (token() + "x", "invalid"),
        (token()[:-1], "invalid"),
        (token().replace(".", ".="), "invalid"),
        ("x" * 5000 + "." + "y", "invalid"),
    ],
)
def test_consent_not_valid_strips_the_identity(tok: str | None, result: ConsentResult) -> None:
    h = consent_request(tok)
    got = boundary().scrub(h, "tokopedia")
    assert list(h.items()) == [("Accept", "*/*")]
    assert got == Stripped(identities=1, consent=result)


def test_consent_payload_tampering_is_invalid() -> None:
    payload_b64, _, signature = token().partition(".")
    payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
    payload["scopes"].append("everything")
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    h = consent_request(f"{forged}.{signature}")
    assert boundary().scrub(h, "tokopedia").consent == "invalid"
    assert "X-Social-User-Id" not in h


@pytest.mark.parametrize(
    "payload",
    [
        b"[]",
        b"not json",
        b'{"sub": 1, "from": "tiktok", "to": "tokopedia", "scopes": ["checkout"], "exp": 2e9}',
        b'{"sub": "u-42", "from": "tiktok", "to": "tokopedia", "scopes": "checkout", "exp": 2e9}',
        b'{"sub": "u-42", "from": "tiktok", "to": "tokopedia", "scopes": ["checkout"]}',
        b'{"sub": "u-42", "from": "tiktok", "to": "tokopedia", "scopes": ["x"], "exp": true}',
    ],
)
def test_consent_signed_but_malformed_payload_is_invalid(payload: bytes) -> None:
    payload_b64 = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    mac = hmac.digest(KEY.encode(), payload_b64.encode(), "sha256")
    signature = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    assert decode_token(KEY, f"{payload_b64}.{signature}") is None
    assert boundary().scrub(consent_request(f"{payload_b64}.{signature}"), "tokopedia").consent == (
        "invalid"
    )


def test_consent_without_key_never_forwards_the_identity() -> None:
    b = boundary(key=None)
    h = consent_request(token())
    assert b.scrub(h, "tokopedia") == Stripped(identities=1, consent="invalid")
    assert list(h.items()) == [("Accept", "*/*")]
    h = consent_request(None)
    assert b.scrub(h, "tokopedia") == Stripped(identities=1, consent="missing")


def test_consent_key_must_be_long_enough() -> None:
    with pytest.raises(cfg.ConfigError, match=r"\$\.boundary\.consent\.key"):
        make_config(key="short")


def test_two_consent_headers_are_invalid() -> None:
    h = consent_request(token())
    h.add("x-jalur-consent", token())
    assert boundary().scrub(h, "tokopedia").consent == "invalid"
    assert "X-Social-User-Id" not in h


def test_two_identity_values_are_a_mismatch() -> None:
    h = consent_request(token())
    h.add("x-social-user-id", "u-43")
    got = boundary().scrub(h, "tokopedia")
    assert got == Stripped(identities=2, consent="mismatch")
    assert "X-Social-User-Id" not in h


def test_consent_uses_the_clock() -> None:
    b = Boundary(make_config(), clock=lambda: NOW + 599)
    assert b.scrub(consent_request(token(ttl=600)), "tokopedia").consent == "valid"
    b = Boundary(make_config(), clock=lambda: NOW + 600)
    assert b.scrub(consent_request(token(ttl=600)), "tokopedia").consent == "expired"


def test_verified_tokens_are_cached_but_expiry_is_checked_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [NOW]
    b = Boundary(make_config(), clock=lambda: now[0])
    tok = token(ttl=10)
    assert b.scrub(consent_request(tok), "tokopedia").consent == "valid"
    assert b.scrub(consent_request(tok), "tokopedia").consent == "valid"
    assert b.scrub(consent_request(tok, user="u-43"), "tokopedia").consent == "mismatch"
    now[0] = NOW + 10
    assert b.scrub(consent_request(tok), "tokopedia").consent == "expired"
    # Only correctly signed tokens are remembered, and never more than the cache holds.
    monkeypatch.setattr(boundary_module, "TOKEN_CACHE_SIZE", 3)
    b = Boundary(make_config(), clock=lambda: NOW)
    b.scrub(consent_request(token(key="another-key-of-some-length")), "tokopedia")
    assert len(b._tokens) == 0
    for i in range(10):
        assert b.scrub(consent_request(token(f"u-{i}"), f"u-{i}"), "tokopedia").consent == "valid"
        assert 1 <= len(b._tokens) <= 3


@pytest.mark.parametrize("system", ["tiktok", "tokopedia", "somebody-else"])
@pytest.mark.parametrize("identity", [True, False])
def test_consent_header_is_never_forwarded(system: str, identity: bool) -> None:
    h = headers(("Accept", "*/*"), ("X-JALUR-CONSENT", token()), ("x-jalur-consent", "x"))
    if identity:
        h["X-Social-User-Id"] = "u-42"
    boundary().scrub(h, system)
    assert "x-jalur-consent" not in h


def test_consent_header_name_is_configurable() -> None:
    data = {
        "systems": SYSTEMS,
        "boundary": {"consent": {"key": KEY, "header": "X-Consent", "identities": [IDENTITY]}},
    }
    b = Boundary(cfg.parse(yaml.safe_dump(data)))
    h = headers(("x-social-user-id", "u-42"), ("x-consent", token(now=time.time())))
    assert b.scrub(h, "tokopedia").consent == "valid"
    assert list(h.items()) == [("x-social-user-id", "u-42")]


def test_identity_reaches_its_owner_without_consent() -> None:
    h = consent_request(None)
    got = boundary().scrub(h, "tiktok")
    assert got == Stripped()
    assert h["X-Social-User-Id"] == "u-42"


def test_identity_never_reaches_a_third_system() -> None:
    systems = {**SYSTEMS, "bank": {"kind": "commerce"}}
    b = Boundary(make_config(systems=systems), clock=lambda: NOW)
    h = consent_request(token(to_system="bank"))
    got = b.scrub(h, "bank")
    assert got == Stripped(identities=1)
    assert "X-Social-User-Id" not in h


def test_no_identity_header_means_no_consent_result() -> None:
    h = headers(("Accept", "*/*"), ("x-jalur-consent", token()))
    assert boundary().scrub(h, "tokopedia") == Stripped()


def test_identity_header_owned_by_from_system_is_still_gated_by_consent() -> None:
    systems = {
        "tiktok": {
            "kind": "social",
            "owns": {"cookies": ["tt_session"], "headers": ["x-tt-user", "x-social-user-id"]},
        },
        "tokopedia": SYSTEMS["tokopedia"],
    }
    b = Boundary(make_config(systems=systems), clock=lambda: NOW)
    h = consent_request(token())
    assert b.scrub(h, "tokopedia") == Stripped(consent="valid")
    assert h["x-social-user-id"] == "u-42"
    h = consent_request(None)
    assert b.scrub(h, "tokopedia") == Stripped(identities=1, consent="missing")


def test_verify_token() -> None:
    tok = token()
    args: dict[str, Any] = {"user": "u-42", "from_system": "tiktok", "to_system": "tokopedia"}
    assert verify_token(KEY, tok, scope="checkout", now=NOW, **args) == "valid"
    assert verify_token(KEY.encode(), tok, scope="checkout", now=NOW, **args) == "valid"
    assert verify_token(KEY, tok, scope="feed", now=NOW, **args) == "mismatch"
    assert verify_token(KEY, tok, scope="checkout", now=NOW + 600, **args) == "expired"
    assert verify_token("wrong-key-wrong-key", tok, scope="checkout", now=NOW, **args) == "invalid"
    claims = decode_token(KEY, tok)
    assert claims is not None
    assert (claims.sub, claims.from_system, claims.to_system) == ("u-42", "tiktok", "tokopedia")
    assert claims.scopes == frozenset({"checkout"})
    assert claims.exp == NOW + 600


@pytest.mark.parametrize(
    ("key", "scopes", "ttl"), [("", ("a",), 1), (KEY, (), 1), (KEY, ("a",), 0), (KEY, ("a",), -5)]
)
def test_make_token_refuses_nonsense(key: str, scopes: tuple[str, ...], ttl: float) -> None:
    with pytest.raises(ValueError, match=r"."):
        make_token(key, "u", "tiktok", "tokopedia", scopes, ttl)


def test_token_has_no_padding_and_is_header_safe() -> None:
    tok = token("user/with+odd=chars ü")
    assert "=" not in tok
    assert set(tok) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


# -- Set-Cookie ------------------------------------------------------------------------


def test_set_cookie_of_another_system_is_dropped() -> None:
    h = headers(
        ("Content-Type", "application/json"),
        ("Set-Cookie", "tt_session=evil; Path=/; HttpOnly; Secure"),
        ("Set-Cookie", "_SID_Tokopedia_=s; Path=/; Secure; SameSite=Lax"),
        ("Set-Cookie", "  TT_Session = evil2 ;Path=/"),
        ("set-cookie", "lang=id; Max-Age=3600"),
        ("Set-Cookie", "tt_session"),
        ("Set-Cookie", "tt%5Fsession=x; Domain=.example.com"),
    )
    dropped = boundary().filter_response(h, "tokopedia")
    assert dropped == 4
    assert h.getall("Set-Cookie") == [
        "_SID_Tokopedia_=s; Path=/; Secure; SameSite=Lax",
        "lang=id; Max-Age=3600",
    ]
    assert h["Content-Type"] == "application/json"


def test_set_cookie_social_cannot_set_commerce_session() -> None:
    h = headers(
        ("Set-Cookie", "_sid_tokopedia_=x; Expires=Wed, 21 Oct 2015 07:28:00 GMT"),
        ("Set-Cookie", "tt_session=own; Path=/"),
    )
    assert boundary().filter_response(h, "tiktok") == 1
    assert h.getall("Set-Cookie") == ["tt_session=own; Path=/"]


def test_set_cookie_untouched_when_nothing_is_foreign() -> None:
    h = headers(("Set-Cookie", "a=1"), ("X", "y"), ("Set-Cookie", "b=2; Path=/"))
    before = list(h.items())
    assert boundary().filter_response(h, "tokopedia") == 0
    assert list(h.items()) == before
    assert boundary().filter_response(headers(("X", "y")), "tokopedia") == 0


# -- CLI -------------------------------------------------------------------------------


def test_cli_consent_token_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["consent-token", "--key", KEY, "--user", "u-42", "--from", "tiktok"]
    argv += ["--to", "tokopedia", "--scope", "checkout", "--scope", "profile", "--ttl", "60"]
    assert cli.main(argv) == 0
    tok = capsys.readouterr().out.strip()
    for scope in ("checkout", "profile"):
        result = verify_token(
            KEY, tok, user="u-42", from_system="tiktok", to_system="tokopedia", scope=scope
        )
        assert result == "valid"
    h = consent_request(tok)
    assert Boundary(make_config()).scrub(h, "tokopedia").consent == "valid"


def test_cli_consent_token_key_from_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JALUR_BOUNDARY__CONSENT__KEY", KEY)
    argv = ["consent-token", "--user", "u-1", "--from", "tiktok", "--to", "tokopedia"]
    assert cli.main([*argv, "--scope", "checkout"]) == 0
    tok = capsys.readouterr().out.strip()
    result = verify_token(
        KEY, tok, user="u-1", from_system="tiktok", to_system="tokopedia", scope="checkout"
    )
    assert result == "valid"


def test_cli_consent_token_without_key_fails(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JALUR_BOUNDARY__CONSENT__KEY", raising=False)
    argv = ["consent-token", "--user", "u", "--from", "tiktok", "--to", "tokopedia"]
    assert cli.main([*argv, "--scope", "checkout"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "JALUR_BOUNDARY__CONSENT__KEY" in captured.err


# -- config validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("systems", "identities", "path"),
    [
        (
            {**SYSTEMS, "other": {"kind": "commerce", "owns": {"cookies": ["TT_SESSION"]}}},
            [],
            "$.systems.other.owns.cookies[0]",
        ),
        (
            {**SYSTEMS, "other": {"kind": "commerce", "owns": {"headers": ["X-TT-User"]}}},
            [],
            "$.systems.other.owns.headers[0]",
        ),
        (
            {"s": {"kind": "social", "owns": {"headers": ["x_user"]}}},
            [],
            "$.systems.s.owns.headers[0]",
        ),
        ({"s": {"kind": "social", "owns": {"headers": ["Cookie"]}}}, [], "$.systems.s.owns"),
        ({"s": {"kind": "social", "owns": {"cookies": ["a;b"]}}}, [], "$.systems.s.owns"),
        (SYSTEMS, [{**IDENTITY, "to_system": "nowhere"}], "$.boundary.consent.identities[0]"),
        (SYSTEMS, [{**IDENTITY, "to_system": "tiktok"}], "$.boundary.consent.identities[0]"),
        (
            SYSTEMS,
            [{**IDENTITY, "header": "Authorization"}],
            "$.boundary.consent.identities[0].header",
        ),
        (SYSTEMS, [IDENTITY, IDENTITY], "$.boundary.consent.identities[1]"),
        (
            SYSTEMS,
            [IDENTITY, {**IDENTITY, "from_system": "tokopedia", "to_system": "tiktok"}],
            "$.boundary.consent.identities[1].header",
        ),
    ],
)
def test_config_rejects_ambiguous_ownership(
    systems: dict[str, Any], identities: list[dict[str, str]], path: str
) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        make_config(systems=systems, identities=identities)
    assert any(e.path.startswith(path) for e in info.value.errors), info.value.errors


def test_config_accepts_the_design_systems() -> None:
    config = make_config()
    assert config.boundary.consent.identities[0].scope == "checkout"
    assert KINDS == (
        "headers",
        "cookies",
        "identities",
        "underscore",
        "header_names",
        "malformed_cookies",
        "forwarding",
    )


# -- properties ------------------------------------------------------------------------

TIKTOK_HEADERS = ("x-tt-user", "x-social-user-id")
OWNED_COOKIES = ("tt_session", "_SID_Tokopedia_")


def case_variants(name: str) -> st.SearchStrategy[str]:
    flips = st.lists(st.booleans(), min_size=len(name), max_size=len(name))
    return flips.map(
        lambda fs: "".join(c.swapcase() if f else c for c, f in zip(name, fs, strict=True))
    )


NEUTRAL_HEADER = st.from_regex(r"\Ax-[a-z0-9]{1,10}(-[a-z0-9]{1,6})?\Z").filter(
    lambda n: n not in TIKTOK_HEADERS and n != "x-jalur-consent"
)
HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
COOKIE_NAME = st.from_regex(r"\A[A-Za-z0-9!#&'*+^`|~-]{1,12}\Z").filter(
    lambda n: n.lower() not in {c.lower() for c in OWNED_COOKIES}
)
COOKIE_VALUE = st.from_regex(r"\A[A-Za-z0-9!#$%&'()*+./:<=>?@^_`{|}~-]{0,12}\Z")

header_entry = st.one_of(
    st.tuples(NEUTRAL_HEADER, HEADER_VALUE),
    st.tuples(st.sampled_from(TIKTOK_HEADERS).flatmap(case_variants), HEADER_VALUE),
    st.tuples(case_variants("authorization"), HEADER_VALUE),
)
cookie_entry = st.one_of(
    st.tuples(COOKIE_NAME, COOKIE_VALUE),
    st.tuples(st.sampled_from(OWNED_COOKIES).flatmap(case_variants), COOKIE_VALUE),
)


def split_into_headers(pairs: list[str], cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(pairs), *(c % (len(pairs) + 1) for c in cuts)})
    return ["; ".join(pairs[a:b]) for a, b in itertools.pairwise(bounds) if b > a]


@given(
    entries=st.lists(header_entry, max_size=12),
    cookies=st.lists(cookie_entry, max_size=10),
    cuts=st.lists(st.integers(min_value=0, max_value=20), max_size=2),
)
def test_property_nothing_of_tiktok_reaches_tokopedia(
    entries: list[tuple[str, str]], cookies: list[tuple[str, str]], cuts: list[int]
) -> None:
    pairs = [f"{n}={v}" for n, v in cookies]
    h: CIMultiDict[str] = CIMultiDict(entries)
    for value in split_into_headers(pairs, cuts):
        h.add("Cookie", value)
    b = boundary()
    b.scrub(h, "tokopedia")

    names = [n.lower() for n in h]
    assert not set(names) & set(TIKTOK_HEADERS)
    expected = [(n, v) for n, v in entries if n.lower() not in TIKTOK_HEADERS]
    assert [(n, v) for n, v in h.items() if n.lower() != "cookie"] == expected

    kept = [p for p, (n, _) in zip(pairs, cookies, strict=True) if n.lower() != "tt_session"]
    if kept:
        assert h.getall("Cookie") == ["; ".join(kept)]
    else:
        assert "Cookie" not in h

    # Scrubbing is idempotent.
    again = h.copy()
    assert b.scrub(again, "tokopedia") == Stripped()
    assert list(again.items()) == list(h.items())


@given(
    entries=st.lists(header_entry, max_size=12),
    cookies=st.lists(cookie_entry, max_size=10),
)
def test_property_nothing_of_tokopedia_reaches_tiktok(
    entries: list[tuple[str, str]], cookies: list[tuple[str, str]]
) -> None:
    h: CIMultiDict[str] = CIMultiDict(entries)
    if cookies:
        h.add("Cookie", "; ".join(f"{n}={v}" for n, v in cookies))
    got = boundary().scrub(h, "tiktok")
    assert "authorization" not in h
    kept = [f"{n}={v}" for n, v in cookies if n.lower() != "_sid_tokopedia_"]
    assert h.getall("Cookie", []) == (["; ".join(kept)] if kept else [])
    assert got.cookies == len(cookies) - len(kept)
    assert got.headers == sum(1 for n, _ in entries if n.lower() == "authorization")


@given(cookies=st.lists(st.tuples(cookie_entry, st.sampled_from(["", "; Path=/", " ;Secure"]))))
def test_property_set_cookie_filter(cookies: list[tuple[tuple[str, str], str]]) -> None:
    values = [f"{n}={v}{attrs}" for (n, v), attrs in cookies]
    h: CIMultiDict[str] = CIMultiDict(("Set-Cookie", v) for v in values)
    dropped = boundary().filter_response(h, "tokopedia")
    kept = [v for v, ((n, _), _) in zip(values, cookies, strict=True) if n.lower() != "tt_session"]
    assert h.getall("Set-Cookie", []) == kept
    assert dropped == len(values) - len(kept)


# -- strict spelling (issue #18) -------------------------------------------------------------


@pytest.mark.parametrize("sep", [" ", ",", "\t", ", ", " ,", ";,"])
def test_a_pair_a_lenient_parser_splits_is_dropped_as_malformed(sep: str) -> None:
    h = headers(("Cookie", f"a=1{sep}_SID_Tokopedia_=S; b=2"))
    got = boundary().scrub(h, "tiktok")
    assert "_SID_Tokopedia_" not in h.get("Cookie", "")
    assert h.getall("Cookie") == ["b=2"] or h.getall("Cookie") == ["a=1; b=2"]
    assert got.malformed_cookies + got.cookies >= 1


@pytest.mark.parametrize(
    "name", ["X-Shop.User", "X-TT.User", "x-social.user-id", "X+Y", "X~Y", "X!Y", "X'Y"]
)
def test_header_names_outside_the_safe_set(name: str) -> None:
    assert boundary().check_names({name: "1", "Accept": "a"}) is not None
    b = boundary(underscore="drop")
    drop = Boundary(
        cfg.parse(yaml.safe_dump({"systems": SYSTEMS, "boundary": {"header_names": "drop"}}))
    )
    assert drop.check_names({name: "1"}) is None
    h = headers(("Accept", "a"), (name, "1"))
    assert drop.scrub(h, "tokopedia") == Stripped(header_names=1)
    assert list(h.items()) == [("Accept", "a")]
    assert b.check_names({"X-Ok-1": "1"}) is None


def test_forwarding_headers_removed_unless_passed() -> None:
    names = ["Forwarded", "X-Real-IP", "True-Client-IP", "X-Original-URL", "X-Rewrite-URL"]
    names += ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"]
    h = headers(*((n, "v") for n in names), ("Accept", "a"))
    assert boundary().scrub(h, "tiktok") == Stripped(forwarding=len(names))
    assert list(h.items()) == [("Accept", "a")]
    passing = Boundary(
        cfg.parse(
            yaml.safe_dump(
                {"systems": SYSTEMS, "boundary": {"forwarding": {"pass_headers": ["x-real-ip"]}}}
            )
        )
    )
    h = headers(*((n, "v") for n in names))
    assert passing.scrub(h, "tiktok") == Stripped(forwarding=len(names) - 1)
    assert list(h.keys()) == ["X-Real-IP"]


@pytest.mark.parametrize(
    ("line", "stored"),
    [
        ("a=1; Path=/", ("a", "1")),
        ("=_SID_Tokopedia_=x", ("", "_SID_Tokopedia_=x")),
        ("bare", ("", "bare")),
        ("  a = 1 ;x", ("a", "1")),
        ("a=1\x01", None),
        ("=", None),
        ("tt_x=1 _SID_Tokopedia_=x", ("tt_x", "1 _SID_Tokopedia_=x")),
    ],
)
def test_browser_cookie(line: str, stored: tuple[str, str] | None) -> None:
    assert boundary_module.browser_cookie(line) == stored
