"""Compliance: static check, runtime guard, variant-deny check and audit log."""

from __future__ import annotations

import hashlib
import io
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import compliance
from proxy import config as cfg
from proxy.compliance import (
    AMBIGUOUS_VARIANT,
    AUDIT_FIELDS,
    SOCIAL_AFTER_DEADLINE,
    SOCIAL_NOT_ALLOWED,
    TRANSACTION_VARIANT,
    UNKNOWN_CLUSTER,
    AuditLog,
    Guard,
    VariantCheck,
    readings,
    static_violations,
)
from proxy.paths import PathError, canonicalize
from proxy.router import Router

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "config" / "demo.yaml"
BAD = ROOT / "config" / "bad-payment-to-social.yaml"

WIB = timezone(timedelta(hours=7))
DEADLINE = datetime(2024, 4, 1, tzinfo=WIB)
BEFORE = DEADLINE - timedelta(days=30)
AFTER = DEADLINE + timedelta(seconds=1)

SYSTEMS: dict[str, Any] = {"tiktok": {"kind": "social"}, "tokopedia": {"kind": "commerce"}}
CLUSTERS: dict[str, Any] = {
    "feed": {"system": "tiktok", "endpoints": ["http://127.0.0.1:9001"]},
    "shop-legacy": {"system": "tiktok", "endpoints": ["http://127.0.0.1:9002"]},
    "pay": {"system": "tokopedia", "endpoints": ["http://127.0.0.1:9003"]},
}
FEED: dict[str, Any] = {
    "name": "feed",
    "match": {"prefix": "/api/feed"},
    "category": "promotion",
    "to": "feed",
}


def payment(*split: tuple[str, int], to: str | None = None) -> dict[str, Any]:
    route: dict[str, Any] = {
        "name": "payment",
        "match": {"prefix": "/api/payment"},
        "category": "payment",
    }
    if to is not None:
        route["to"] = to
    else:
        route["split"] = [{"cluster": c, "weight": w} for c, w in split]
    return route


def document(routes: list[dict[str, Any]], compliance: dict[str, Any] | None = None) -> str:
    data: dict[str, Any] = {"systems": SYSTEMS, "clusters": CLUSTERS, "routes": routes}
    if compliance is not None:
        data["compliance"] = compliance
    return yaml.safe_dump(data, sort_keys=False)


def window(until: str | None = "2024-04-01T00:00:00+07:00") -> dict[str, Any]:
    comp: dict[str, Any] = {"legacy_clusters": ["shop-legacy"]}
    if until is not None:
        comp["transition_until"] = until
    return comp


def errors_of(text: str, now: datetime | None = None) -> list[cfg.FieldError]:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(text, now=now)
    return info.value.errors


def unchecked(text: str) -> cfg.Config:
    """Decode without any validation: what the runtime layers must survive on their own."""
    return msgspec.convert(yaml.safe_load(text), cfg.Config)


# -- static check ---------------------------------------------------------------------------


def test_demo_config_passes() -> None:
    config = cfg.load(DEMO)
    assert static_violations(config) == []
    assert static_violations(config, now=datetime(2030, 1, 1, tzinfo=UTC)) == []


def test_bad_config_fails_with_exact_field_paths_and_clear_messages() -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(BAD)
    errors = {e.path: e for e in info.value.errors}
    assert set(errors) == {"$.routes[1].split[0].cluster", "$.routes[2].to"}
    legacy = errors["$.routes[1].split[0].cluster"]
    for word in ("'payment'", "'shop-legacy'", "'tiktok'", "2024-04-01T00:00:00+07:00"):
        assert word in legacy.message
    assert "transition window ended" in legacy.message
    assert legacy.line == 26
    social = errors["$.routes[2].to"]
    for word in ("'profile'", "'user-data'", "'feed'", "'tiktok'", "commerce"):
        assert word in social.message
    assert social.line == 32


def test_bad_config_before_its_deadline_still_fails_on_the_non_legacy_route() -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(BAD, now=BEFORE)
    assert [e.path for e in info.value.errors] == ["$.routes[2].to"]


@pytest.mark.parametrize(
    ("until", "now", "ok"),
    [
        ("2024-04-01T00:00:00+07:00", BEFORE, True),
        ("2024-04-01T00:00:00+07:00", DEADLINE - timedelta(microseconds=1), True),
        ("2024-04-01T00:00:00+07:00", DEADLINE, False),  # at the deadline it is over
        ("2024-04-01T00:00:00+07:00", AFTER, False),
        # A naive ``now`` is UTC: 2024-03-31T17:00 UTC is the WIB deadline.
        ("2024-04-01T00:00:00+07:00", datetime(2024, 3, 31, 16, 59, 59), True),
        ("2024-04-01T00:00:00+07:00", datetime(2024, 3, 31, 17, 0, 0), False),
        ("2024-03-31T17:00:00Z", datetime(2024, 3, 31, 23, 0, tzinfo=WIB), True),
    ],
)
def test_transition_window_is_judged_at_now(until: str, now: datetime, ok: bool) -> None:
    text = document([FEED, payment(("shop-legacy", 13), ("pay", 87))], window(until))
    if ok:
        cfg.parse(text, now=now)
    else:
        assert [e.path for e in errors_of(text, now)] == ["$.routes[1].split[0].cluster"]


def test_now_defaults_to_the_current_time() -> None:
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    routes = [payment(("shop-legacy", 1), ("pay", 1))]
    cfg.parse(document(routes, window(future)))
    assert [e.path for e in errors_of(document(routes, window(past)))] == [
        "$.routes[0].split[0].cluster"
    ]


def test_weight_zero_legacy_cluster_is_allowed_after_the_deadline() -> None:
    cfg.parse(document([payment(("shop-legacy", 0), ("pay", 100))], window()), now=AFTER)


def test_legacy_cluster_in_to_after_the_deadline() -> None:
    (error,) = errors_of(document([payment(to="shop-legacy")], window()), AFTER)
    assert error.path == "$.routes[0].to"
    assert "2024-04-01T00:00:00+07:00" in error.message


def test_legacy_cluster_without_a_deadline_has_no_window() -> None:
    routes = [payment(("shop-legacy", 13), ("pay", 87))]
    (error,) = errors_of(document(routes, window(None)), BEFORE)
    assert error.path == "$.routes[0].split[0].cluster"
    assert "transition_until is not set" in error.message
    cfg.parse(document([payment(("shop-legacy", 0), ("pay", 1))], window(None)), now=BEFORE)


def test_non_legacy_social_cluster_is_refused_always_even_at_weight_zero() -> None:
    routes = [payment(("feed", 0), ("pay", 1))]
    (error,) = errors_of(document(routes, window()), BEFORE)
    assert error.path == "$.routes[0].split[0].cluster"
    assert "may only be served by a commerce system" in error.message


def test_no_compliance_block_means_defaults_and_no_window() -> None:
    orders = {"name": "orders", "match": {"prefix": "/o"}, "category": "user-data", "to": "feed"}
    merchant = {"name": "m", "match": {"prefix": "/m"}, "category": "merchant", "to": "feed"}
    promo = {"name": "promo", "match": {"prefix": "/p"}, "category": "promotion", "to": "feed"}
    text = document([orders, merchant, promo, payment(to="shop-legacy")])
    paths = [e.path for e in errors_of(text, BEFORE)]
    assert paths == ["$.routes[0].to", "$.routes[1].to", "$.routes[3].to"]


def test_transaction_categories_are_configurable() -> None:
    orders = {"name": "orders", "match": {"prefix": "/o"}, "category": "user-data", "to": "feed"}
    cfg.parse(document([orders], {"transaction_categories": ["payment"]}))
    loyalty = {"name": "loyalty", "match": {"prefix": "/l"}, "category": "loyalty", "to": "feed"}
    (error,) = errors_of(document([loyalty], {"transaction_categories": ["loyalty"]}))
    assert error.path == "$.routes[0].to"


def test_unknown_legacy_cluster() -> None:
    comp = {"legacy_clusters": ["pay", "ghost"], "transition_until": "2024-04-01T00:00:00Z"}
    errors = errors_of(document([FEED], comp), BEFORE)
    found = {e.path: e.message for e in errors}
    assert found["$.compliance.legacy_clusters[1]"] == "unknown cluster 'ghost'"


def test_legacy_cluster_of_a_commerce_system() -> None:
    comp = {"legacy_clusters": ["shop-legacy", "pay"], "transition_until": "2024-04-01T00:00:00Z"}
    (error,) = errors_of(document([FEED], comp), BEFORE)
    assert error.path == "$.compliance.legacy_clusters[1]"
    assert "commerce system 'tokopedia'" in error.message


def test_deadline_without_offset_is_an_error_and_opens_no_window() -> None:
    text = document([payment(("shop-legacy", 1), ("pay", 1))], window("2030-01-01T00:00:00"))
    paths = {e.path for e in errors_of(text, BEFORE)}
    assert paths == {"$.compliance.transition_until", "$.routes[0].split[0].cluster"}


def test_errors_are_all_reported_together_with_reference_errors() -> None:
    routes = [payment(("shop-legacy", 1), ("nowhere", 1)), {**FEED, "to": "ghost"}]
    paths = [e.path for e in errors_of(document(routes, window()), AFTER)]
    assert sorted(paths) == [
        "$.routes[0].split[0].cluster",
        "$.routes[0].split[1].cluster",
        "$.routes[1].to",
    ]


def social_route(name: str, match: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "match": match, "category": "promotion", "to": "feed"}


@pytest.mark.parametrize(
    ("earlier", "shadowed"),
    [
        ({}, True),
        ({"prefix": "/"}, True),
        ({"prefix": "/api"}, True),
        ({"prefix": "/API", "case_sensitive": False}, True),
        ({"prefix": "/API"}, False),  # both case-sensitive: no request matches both
        ({"exact": "/api/payment/x"}, True),
        ({"prefix": "/api/payment/status"}, True),
        ({"exact": "/api/pay"}, False),
        ({"prefix": "/api/feed"}, False),
        ({"prefix": "/", "methods": ["GET"]}, False),  # payment is POST only
        ({"prefix": "/", "methods": ["GET", "POST"]}, True),
        ({"prefix": "/", "host": "feed.example"}, False),
        ({"prefix": "/", "host": "*.example"}, True),
        ({"prefix": "/", "headers": [{"name": "x-canary", "exact": "1"}]}, True),
        # Regex matchers, decided by sampling both languages (issue #19):
        ({"regex": "/api/.*"}, True),
        ({"regex": "/api/pay.*"}, True),
        ({"regex": "/api/p[a-z]+(/.*)?"}, True),
        ({"regex": "/API/PAY.*", "case_sensitive": False}, True),
        ({"regex": "/API/PAY.*"}, False),  # case-sensitive: no request matches both
        ({"regex": "/api/(feed|live)/.*"}, False),
        ({"regex": "/api/(?!pay).*"}, False),  # the lookahead excludes every payment path
        ({"regex": "/.*", "host": "feed.example"}, False),
        ({"regex": "/.*", "methods": ["GET"]}, False),
        ({"host": "pay.example"}, True),  # a host matcher alone takes every path
        ({"host": "*.example", "exact": "/api/payment"}, True),
    ],
)
def test_an_earlier_social_route_must_not_shadow_a_transaction_route(
    earlier: dict[str, Any], shadowed: bool
) -> None:
    later = {"prefix": "/api/payment", "methods": ["POST"], "host": "pay.example"}
    assert_shadowing(earlier, later, shadowed)


def assert_shadowing(earlier: dict[str, Any], later: dict[str, Any], shadowed: bool) -> None:
    """A social route matching ``earlier`` before the payment route matching ``later`` is
    refused (naming both) exactly when ``shadowed``."""
    pay = payment(to="pay")
    pay["match"] = later
    text = document([social_route("early", earlier), pay])
    if not shadowed:
        cfg.parse(text)
        return
    (error,) = errors_of(text)
    assert error.path == "$.routes[0].match"
    assert "'early'" in error.message
    assert "'payment'" in error.message
    assert "$.routes[1]" in error.message


@pytest.mark.parametrize(
    ("earlier", "shadowed"),
    [
        ({}, True),
        ({"prefix": "/"}, True),
        ({"prefix": "/api/feed"}, True),  # pay.example/api/feed would reach social
        ({"regex": "/api/.*"}, True),
        ({"exact": "/"}, True),
        ({"prefix": "/", "host": "PAY.example."}, True),
        ({"prefix": "/", "host": "*.example"}, True),
        ({"prefix": "/", "host": "feed.example"}, False),
        ({"prefix": "/", "methods": ["GET"]}, False),  # payment is POST only
    ],
)
def test_a_host_only_transaction_route_after_a_broader_social_route(
    earlier: dict[str, Any], shadowed: bool
) -> None:
    """Issue #18: a payment route matched by host alone, placed after a social route that
    takes some of that host's requests, is flagged by ``jalur check``."""
    pay = payment(to="pay")
    pay["match"] = {"host": "pay.example", "methods": ["POST"]}
    text = document([social_route("early", earlier), pay])
    if not shadowed:
        cfg.parse(text)
        return
    (error,) = errors_of(text)
    assert error.path == "$.routes[0].match"
    assert "'payment'" in error.message


@pytest.mark.parametrize(
    ("earlier", "later", "shadowed"),
    [
        ({"prefix": "/api/pay"}, {"regex": "/api/payment/[0-9]+"}, True),
        ({"exact": "/api/payment/42"}, {"regex": "/api/payment/[0-9]+"}, True),
        ({"exact": "/api/payment/x"}, {"regex": "/api/payment/[0-9]+"}, False),
        ({"regex": "/api/pay(ment)?/.*"}, {"regex": "/api/payment/[0-9]+"}, True),
        ({"regex": "/api/feed/.*"}, {"regex": "/api/(payment|checkout)/[0-9]+"}, False),
        ({"regex": "/api/[a-z]+/[0-9]+"}, {"exact": "/api/checkout/7"}, True),
    ],
)
def test_regex_transaction_routes_are_checked_too(
    earlier: dict[str, Any], later: dict[str, Any], shadowed: bool
) -> None:
    assert_shadowing(earlier, later, shadowed)


def test_the_issue_config_is_refused_by_jalur_check(tmp_path: Any) -> None:
    """A social route `/api/pay.*` before the payment route: at run time payments got 400."""
    import io

    from proxy import cli

    pay = payment(to="pay")
    f = tmp_path / "jalur.yaml"
    f.write_text(document([social_route("promo", {"regex": "/api/pay.*"}), pay]))
    out, err = io.StringIO(), io.StringIO()
    assert cli.check(str(f), out, err) == 1
    assert "$.routes[0].match" in err.getvalue()


def test_a_later_catch_all_to_social_is_fine() -> None:
    cfg.parse(document([payment(to="pay"), social_route("all", {})]))


# -- guard ----------------------------------------------------------------------------------

T_DEADLINE = DEADLINE.timestamp()


def guard_for(routes: list[dict[str, Any]], comp: dict[str, Any] | None) -> Guard:
    config = unchecked(document(routes, comp))
    return Guard(config, Router(config.routes))


@pytest.fixture
def guard() -> Guard:
    profile = {"name": "profile", "match": {"prefix": "/p"}, "category": "user-data", "to": "pay"}
    leak = {"name": "leak", "match": {"prefix": "/l"}, "category": "merchant", "to": "feed"}
    legacy_only = {**payment(to="shop-legacy"), "name": "legacy-only", "match": {"prefix": "/x"}}
    routes = [FEED, payment(("shop-legacy", 13), ("pay", 87)), profile, leak, legacy_only]
    return guard_for(routes, window())


def test_guard_allows_commerce_and_non_transaction_routes_always(guard: Guard) -> None:
    for now in (-math.inf, 0.0, T_DEADLINE, 1e12):
        assert guard.check("payment", "pay", now) is None
        assert guard.check("profile", "pay", now) is None
        assert guard.check("feed", "feed", now) is None
    assert guard.allowed_until("payment", "pay") == math.inf
    assert guard.allowed_until("feed", "feed") == math.inf


def test_guard_allows_a_legacy_cluster_until_the_deadline(guard: Guard) -> None:
    assert guard.deadline == T_DEADLINE
    assert guard.allowed_until("payment", "shop-legacy") == T_DEADLINE
    assert guard.check("payment", "shop-legacy", T_DEADLINE - 0.001) is None
    assert guard.check("payment", "shop-legacy", T_DEADLINE) == SOCIAL_AFTER_DEADLINE
    assert guard.check("payment", "shop-legacy", T_DEADLINE + 86400) == SOCIAL_AFTER_DEADLINE


def test_guard_refuses_a_non_legacy_social_cluster_always(guard: Guard) -> None:
    assert guard.allowed_until("leak", "feed") == -math.inf
    for now in (0.0, T_DEADLINE - 1, T_DEADLINE + 1):
        assert guard.check("leak", "feed", now) == SOCIAL_NOT_ALLOWED


def test_guard_refuses_a_legacy_cluster_when_there_is_no_deadline() -> None:
    g = guard_for([payment(("shop-legacy", 1), ("pay", 1))], window(None))
    assert g.deadline is None
    assert g.check("payment", "shop-legacy", 0.0) == SOCIAL_NOT_ALLOWED
    g = guard_for([payment(("shop-legacy", 1), ("pay", 1))], window("2030-01-01T00:00:00"))
    assert g.check("payment", "shop-legacy", 0.0) == SOCIAL_NOT_ALLOWED  # naive: no window


def test_guard_refuses_pairs_it_does_not_know(guard: Guard) -> None:
    assert guard.check("payment", "feed", 0.0) == UNKNOWN_CLUSTER  # not a target of it
    assert guard.check("payment", "ghost", 0.0) == UNKNOWN_CLUSTER
    assert guard.check("ghost", "pay", 0.0) == UNKNOWN_CLUSTER
    assert guard.allowed_until("ghost", "pay") == -math.inf


def test_compliant_targets(guard: Guard) -> None:
    before, after = T_DEADLINE - 1, T_DEADLINE
    assert guard.compliant_targets("payment", before) == ("shop-legacy", "pay")
    assert guard.compliant_targets("payment", after) == ("pay",)
    assert guard.compliant_targets("feed", after) == ("feed",)
    assert guard.compliant_targets("legacy-only", before) == ("shop-legacy",)
    assert guard.compliant_targets("legacy-only", after) == ()  # the caller answers 503
    assert guard.compliant_targets("leak", before) == ()
    assert guard.compliant_targets("ghost", before) == ()


def test_guard_treats_a_cluster_of_an_unknown_system_as_not_commerce() -> None:
    text = document([payment(to="odd")]).replace(
        "clusters:\n", "clusters:\n  odd:\n    system: nobody\n    endpoints: [http://h:1]\n"
    )
    config = unchecked(text)
    g = Guard(config, Router(config.routes))
    assert g.check("payment", "odd", 0.0) == SOCIAL_NOT_ALLOWED


# -- variant check --------------------------------------------------------------------------

VARIANT_ROUTES: list[dict[str, Any]] = [
    {"name": "payment", "match": {"prefix": "/api/payment"}, "category": "payment", "to": "pay"},
    {"name": "pay", "match": {"exact": "/api/pay"}, "category": "payment", "to": "pay"},
    {
        "name": "orders",
        "match": {"regex": "/api/orders/[0-9]+"},
        "category": "user-data",
        "to": "pay",
    },
    {
        "name": "merchant",
        "match": {"prefix": "/api/merchant/"},
        "category": "merchant",
        "to": "pay",
    },
    FEED,
    social_route("all", {"prefix": "/"}),
]


class Decider:
    """The handler's order: canonicalize, route, then the variant check."""

    def __init__(self, routes: list[dict[str, Any]], comp: dict[str, Any] | None = None) -> None:
        self.config = unchecked(document(routes, comp))
        self.router = Router(self.config.routes)
        self.check = VariantCheck(self.config, self.router)

    def kind(self, cluster: str) -> str:
        return self.config.systems[self.config.clusters[cluster].system].kind

    def __call__(self, raw: str) -> str | None:
        try:
            path = canonicalize(raw, "shop.example").path
        except PathError:
            return self.check.check(raw, None, "")
        route = self.router.match("GET", "shop.example", path, {})
        kind = "" if route is None else self.kind(route.targets[0].cluster)
        return self.check.check(raw, route, kind)


@pytest.fixture(scope="module")
def decide() -> Decider:
    cfg.parse(document(VARIANT_ROUTES))  # a valid config: the catch-all comes last
    return Decider(VARIANT_ROUTES)


VARIANTS = [
    "/API/Payment",  # the payment prefix is case-sensitive
    "/Api/payment/refund",
    "/API/PAYMENT%20",
    "/api/payment;x",  # Tomcat reads /api/payment
    "/api/pay;x=1",
    "/api;v=2/pay",
    "/api/pay%3Bx",  # ';' once decoded
    "/api/%2570ayment",  # double-encoded 'p'
    "/api/p%2561y",
    "/api/pay.",  # Windows trims trailing dots and spaces
    "/api/pay%20",
    "/api/pay%2e",
    "/api/pay%2E%2E",
    "/api/pay.%20.",
    "/api%EF%BC%8Fpayment",  # U+FF0F FULLWIDTH SOLIDUS
    "/api/%EF%BD%90ayment",  # U+FF50 FULLWIDTH p
    "/%EF%BC%A1PI/payment",  # U+FF21 FULLWIDTH A
    "/api/pay%EF%BC%8E",  # U+FF0E FULLWIDTH FULL STOP, trimmed
    "/api/feed/%EF%BC%8E%EF%BC%8E/pay",  # fullwidth '..'
    "/API/Payment/%EF%BC%8E%EF%BC%8E/feed",  # routed before the dots are resolved
    "/api/%EF%BC%85%37%30ay",  # fullwidth '%' then '70' = 'p'
    "/api/\uff50ay",  # raw fullwidth p (canonicalize refuses it; still a variant)
    "/API/PAY",
    "/API/PAY?x=1",
    "/api/pay/./",  # exact /api/pay with a trailing slash
    "/api/feed/../PAY",
    "/api/pay%00.html",  # NUL ends a C string
    "/api/pay%3Fx",  # a decoded '?' ends the path
    "/api/pay%23x",
    "/api\\pay",  # IIS reads '\' as '/'
    "http://shop.example/API/PAY",
    "/API/ORDERS/42",  # the orders regex is case-sensitive
    "/api/orders/42/",
    "/api/orders/4%EF%BC%92",  # fullwidth digit 2
    "/api/merchant",  # the merchant prefix ends in '/'
    "/api/Merchant/x",
]

# The exact route /api/pay names a resource: path-info routing (PHP's pay.php/ment, a
# servlet mapped to /api/pay/*) serves it with trailing segments too (issue #18).
VARIANTS += ["/api/pay;x/ment", "/api/pay/ment", "/api/pay.json"]

NOT_VARIANTS = [
    "/",
    "/api/feed",
    "/api/feed/Payment",
    "/api/feed/x?next=/api/pay",  # the query is not the path
    "/api/feed;jsessionid=1",
    "/api/payx",
    "/api/pa%C3%BF",
    "/api/pay/../feed",  # forwarded as /api/feed
    "/api/orders/x",
    "/api/merchants",
    "/static/app.js",
    "/API/Feed/%EF%BC%8E/x",
    # Chosen route is commerce: nothing to check.
    "/api/paymentx",
    "/api/payment/%EF%BC%8E%EF%BC%8E/feed",
    "/api/orders/42",
    "/api/pa%79",
    "/api//pay",
    "/api/merchant/1",
]


@pytest.mark.parametrize("raw", VARIANTS)
def test_variant_is_refused(decide: Decider, raw: str) -> None:
    assert decide(raw) == TRANSACTION_VARIANT


@pytest.mark.parametrize("raw", NOT_VARIANTS)
def test_not_a_variant(decide: Decider, raw: str) -> None:
    assert decide(raw) is None


def test_no_route_matched_is_checked_too() -> None:
    decide = Decider(VARIANT_ROUTES[:-1])  # without the catch-all
    assert decide("/API/PAY") == TRANSACTION_VARIANT
    assert decide("/nothing/here") is None


def test_a_transaction_route_or_a_commerce_cluster_is_not_checked(decide: Decider) -> None:
    feed = decide.router.by_name["feed"]
    pay = decide.router.by_name["pay"]
    assert decide.check.check("/API/PAY", feed, "social") == TRANSACTION_VARIANT
    assert decide.check.check("/API/PAY", feed, "commerce") is None
    assert decide.check.check("/API/PAY", pay, "social") is None  # the Guard's business


def test_a_shadowed_transaction_path_is_refused_at_run_time() -> None:
    # An invalid config (the static check refuses it), decoded without validation.
    decide = Decider([social_route("all", {"regex": "/.*"}), *VARIANT_ROUTES[:4]])
    assert decide("/api/payment") == TRANSACTION_VARIANT
    assert decide("/api/feed") is None


def test_transaction_routes_that_match_every_path_are_not_used() -> None:
    host_only = {
        "name": "pay-host",
        "match": {"host": "pay.example"},
        "category": "payment",
        "to": "pay",
    }
    root = {"name": "root", "match": {"prefix": "/"}, "category": "payment", "to": "pay"}
    any_rx = {"name": "rx", "match": {"regex": "/.*"}, "category": "payment", "to": "pay"}
    decide = Decider([host_only, root, any_rx, FEED])
    feed = decide.router.by_name["feed"]
    assert decide.check.check("/api/feed/x", feed, "social") is None
    assert decide.check.check("/API/PAY", feed, "social") is None


def test_no_transaction_routes_means_nothing_to_check() -> None:
    decide = Decider([FEED, social_route("all", {})])
    assert decide("/api/payment") is None
    assert decide("/API%EF%BC%8Fpayment;x") is None


def test_readings() -> None:
    assert readings("/API/Pay;x/Ment") == {"/api/pay;x/ment", "/api/pay/ment"}
    assert readings("/api/%2570ayment") == {"/api/%2570ayment", "/api/%70ayment", "/api/payment"}
    assert readings("/a/b/../c") == {"/a/c"}
    assert readings("/a/b/../c", unresolved=True) == {"/a/c", "/a/b/../c"}
    assert readings("http://h/x?y#z") == {"/x"}
    assert readings("x") == {"/x"}


def test_too_many_readings_or_too_long_is_refused(
    decide: Decider, monkeypatch: pytest.MonkeyPatch
) -> None:
    tricky = "/x;y/%25%32%35%37%30%EF%BC%85%32%35%EF%BC%85%37%30\\z%3F%20.%3B;q/%EF%BD%90."
    found = readings(tricky)
    assert found is not None
    assert len(found) > 100
    assert decide(tricky) is None
    monkeypatch.setattr(compliance, "MAX_READINGS", 64)
    assert readings(tricky) is None
    assert Decider(VARIANT_ROUTES)(tricky) == AMBIGUOUS_VARIANT  # a fresh verdict cache
    assert decide("/api/feed/" + "a" * 9000) == AMBIGUOUS_VARIANT


def test_plain_paths_are_cheap(decide: Decider) -> None:
    feed = decide.router.by_name["feed"]
    check = decide.check.check
    start = time.perf_counter()
    for _ in range(10_000):
        check("/api/feed/12345/comments?page=2", feed, "social")
    per_call = (time.perf_counter() - start) / 10_000
    assert per_call < 20e-6  # measured ~1 us; generous for a loaded CI box


@settings(max_examples=1000, deadline=None)
@given(raw=st.text())
def test_variant_check_never_raises(decide: Decider, raw: str) -> None:
    result = decide.check.check(raw, None, "")
    assert result in (None, TRANSACTION_VARIANT, AMBIGUOUS_VARIANT)
    assert decide(raw) in (None, TRANSACTION_VARIANT, AMBIGUOUS_VARIANT)


@settings(max_examples=300, deadline=None)
@given(
    raw=st.text(
        alphabet=st.sampled_from(["/", "a", "P", "y", ".", ";", "%", "2", "5", "E", "F", "\\"]),
        max_size=40,
    ).map(lambda s: "/api/" + s)
)
def test_variant_check_never_raises_on_path_like_text(decide: Decider, raw: str) -> None:
    assert decide(raw) in (None, TRANSACTION_VARIANT, AMBIGUOUS_VARIANT)


# -- audit log ------------------------------------------------------------------------------


CHAIN_RECORDS = frozenset({"start", "segment", "seal"})


def audit_cfg(path: Path | str, **kw: Any) -> cfg.Audit:
    return cfg.Audit(path=str(path), **kw)


def entry(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": f"r{i}",
        "route": "payment",
        "category": "payment",
        "cluster": "pay",
        "system": "tokopedia",
        "status": 200,
        "duration": 0.0125,
        "decision": "allowed",
        "reason": None,
        **extra,
    }


def test_audit_escapes_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    """A field holding a request's non-UTF-8 byte (a lone surrogate) is written escaped:
    the record is never lost to an encoding error (issue #18)."""
    path = tmp_path / "audit.log"
    log = AuditLog(audit_cfg(path))
    log.start()
    raw = b"\xff".decode("utf-8", "surrogateescape")
    log.record({"request_id": "r-1", "decision": "blocked", "reason": "x", "host": raw})
    log.close()
    (record,) = lines_of(path)
    assert record["host"] == "\\xff"
    assert log.failed == 0


def lines_of(*files: Path) -> list[dict[str, Any]]:
    """The records of ``files`` but the chain's own (start, segment, seal)."""
    out: list[dict[str, Any]] = []
    for f in files:
        out.extend(orjson.loads(line) for line in f.read_bytes().splitlines())
    return [r for r in out if r.get("decision") not in CHAIN_RECORDS]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll with a deadline (for what has no event to wait on)."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        tick.wait(0.005)


class HeldAuditLog(AuditLog):
    """The writer stops inside its first write of a record (after the chain's ``start``)
    until ``gate`` is set."""

    def __init__(self, audit: cfg.Audit) -> None:
        super().__init__(audit)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def _write(self, line: bytes) -> None:
        if b'"decision":"start"' not in line:
            self.entered.set()
            assert self.gate.wait(10)
        super()._write(line)


def test_audit_lines_are_json_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(audit_cfg(path))
    log.start()
    log.record(entry(0))
    log.record(entry(1, decision="blocked", reason="social-after-deadline", status=503))
    log.record({"request_id": "r2", "extra": {"k": 1}})  # missing fields become null
    log.close()
    records = lines_of(path)
    assert [r["request_id"] for r in records] == ["r0", "r1", "r2"]
    for r in records:
        assert list(r)[: len(AUDIT_FIELDS)] == list(AUDIT_FIELDS)
        stamp = datetime.fromisoformat(r["time"])
        assert r["time"].endswith("Z")
        assert stamp.utcoffset() == timedelta(0)
        assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60
    assert records[0]["duration"] == 0.0125
    assert records[0]["status"] == 200
    assert records[1]["decision"] == "blocked"
    assert records[1]["reason"] == "social-after-deadline"
    assert records[2]["route"] is None
    assert records[2]["extra"] == {"k": 1}
    assert log.written == 3
    assert log.dropped == 0
    assert log.failed == 0


def test_audit_flushes_within_the_interval_without_close(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(audit_cfg(path, flush_interval=0.05))
    log.start()
    try:
        log.record(entry(0))
        wait_until(lambda: path.read_bytes().endswith(b"\n"))
        assert lines_of(path)[0]["request_id"] == "r0"
    finally:
        log.close()


def test_audit_rotates_at_max_bytes_and_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(audit_cfg(path, max_bytes=4096, backups=2))
    log.start()
    for i in range(100):
        log.record(entry(i, pad="x" * 150))
    log.close()
    files = [tmp_path / "audit.log.2", tmp_path / "audit.log.1", path]
    assert all(f.exists() for f in files)
    assert not (tmp_path / "audit.log.3").exists()
    assert all(f.stat().st_size <= 4096 for f in files)
    ids = [int(r["request_id"][1:]) for r in lines_of(*files)]
    assert ids == list(range(ids[0], 100))  # the newest records, in order, none missing
    assert len(lines_of(tmp_path / "audit.log.1")) == len(lines_of(tmp_path / "audit.log.2"))


def test_audit_rotation_without_backups_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(audit_cfg(path, max_bytes=4096, backups=0))
    log.start()
    for i in range(60):
        log.record(entry(i, pad="x" * 150))
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log"]
    assert path.stat().st_size <= 4096
    assert lines_of(path)[-1]["request_id"] == "r59"


def test_audit_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    for i in range(2):
        log = AuditLog(audit_cfg(path))
        log.start()
        log.record(entry(i))
        log.close()
    assert [r["request_id"] for r in lines_of(path)] == ["r0", "r1"]


def test_audit_drop_mode_counts_drops_and_logs_them(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = HeldAuditLog(audit_cfg(path, queue_size=2, on_overflow="drop"))
    log.start()
    log.record(entry(0))
    assert log.entered.wait(5)  # the writer holds r0; the queue is empty
    for i in range(1, 6):
        log.record(entry(i))  # r1, r2 fill the queue; r3..r5 are dropped
    assert log.dropped == 3
    log.gate.set()
    log.close()
    records = lines_of(path)
    assert [r["request_id"] for r in records if r["decision"] == "allowed"] == ["r0", "r1", "r2"]
    (notice,) = [r for r in records if r["decision"] == "dropped"]
    assert notice["count"] == 3
    assert notice["reason"] == "audit-queue-full"
    assert set(AUDIT_FIELDS) <= set(notice)


def test_audit_block_mode_blocks_the_producer_until_there_is_room(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = HeldAuditLog(audit_cfg(path, queue_size=1, on_overflow="block"))
    log.start()
    log.record(entry(0))
    assert log.entered.wait(5)
    log.record(entry(1))  # fills the queue
    returned = threading.Event()

    def produce() -> None:
        log.record(entry(2))
        returned.set()

    producer = threading.Thread(target=produce)
    producer.start()
    waiters: Any = log._queue.not_full._waiters  # type: ignore[attr-defined]
    wait_until(lambda: len(waiters) == 1)  # the producer waits inside put()
    assert not returned.is_set()
    log.gate.set()
    assert returned.wait(5)
    producer.join()
    log.close()
    assert [r["request_id"] for r in lines_of(path)] == ["r0", "r1", "r2"]
    assert log.dropped == 0


def test_audit_close_drains_everything(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(audit_cfg(path, queue_size=50, flush_interval=60))
    log.start()
    for i in range(2000):
        log.record(entry(i))
    log.close()
    assert [r["request_id"] for r in lines_of(path)] == [f"r{i}" for i in range(2000)]
    assert log.written == 2000
    log.close()  # idempotent


def test_audit_close_without_start_writes_what_was_queued(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(audit_cfg(path))
    log.record(entry(0))
    log.close()
    assert [r["request_id"] for r in lines_of(path)] == ["r0"]


def test_audit_record_after_close_is_counted(tmp_path: Path) -> None:
    log = AuditLog(audit_cfg(tmp_path / "audit.log"))
    log.start()
    log.close()
    log.record(entry(0))
    assert log.dropped == 1


def test_audit_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    log = AuditLog(audit_cfg("-"))
    log.start()
    log.record(entry(7))
    log.close()
    start, line, seal = (orjson.loads(x) for x in capsys.readouterr().err.splitlines())
    assert line["request_id"] == "r7"
    assert (start["decision"], seal["decision"]) == ("start", "seal")
    assert line["prev"] == hashlib.sha256(orjson.dumps(start)).hexdigest()


def test_audit_unwritable_path_fails_at_start(tmp_path: Path) -> None:
    log = AuditLog(audit_cfg(tmp_path / "missing-dir" / "audit.log"))
    with pytest.raises(FileNotFoundError):
        log.start()


def test_audit_odd_values_are_still_written(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(audit_cfg(path))
    log.start()
    log.record(entry(0, when=io.StringIO("x"), code=1))
    log.close()
    (record,) = lines_of(path)
    assert record["request_id"] == "r0"
    assert "StringIO" in record["when"]


def test_audit_writer_survives_bad_records_and_write_errors(tmp_path: Path) -> None:
    class FlakyAuditLog(AuditLog):
        fail_next = True

        def _write(self, line: bytes) -> None:
            if self.fail_next and b'"decision":"start"' not in line:
                self.fail_next = False
                raise OSError(28, "No space left on device")
            super()._write(line)

    path = tmp_path / "audit.log"
    log = FlakyAuditLog(audit_cfg(path))
    log.start()
    log.record(entry(0))  # the disk is full
    log.record(["not", "a", "mapping"])  # type: ignore[arg-type]
    log.record(entry(2))
    log.close()
    assert [r["request_id"] for r in lines_of(path)] == ["r2"]
    assert log.failed == 2
    assert log.written == 1
