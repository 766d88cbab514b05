"""Shoppers of the shared app, as Locust users, for load tests of Jalur.

Each shopper watches the feed and live streams, opens products (promotion, served by the social
system) and now and then adds to the cart, checks out, pays and looks up an order (transactions,
served by the commerce system). Every request is named after the Jalur route that serves it
(``feed``, ``live``, ``products``, ``cart``, ``checkout``, ``payment``, ``orders``: the demo
config's route names), so Locust's table lines up with ``jalur_requests_total{route=...}``.

A request counts as a **failure** when

* the status is not 2xx, or
* it is a transaction (``cart``, ``checkout``, ``orders``, ``payment``) and the response came
  from a *social* system (the back end's ``x-backend-system`` header names a system whose
  ``kind`` is ``social``), unless the proxy's config makes that legal right now: the route's
  split names a cluster of that system listed in ``compliance.legacy_clusters`` and
  ``compliance.transition_until`` is in the future (a migration in progress, as in the
  ``MigrationRampShape``). A 2xx transaction response without ``x-backend-system`` fails too:
  it cannot be checked.

The systems, the legacy clusters and the deadline are read once per Locust process from the
proxy's admin listener (``GET $JALUR_LOADTEST_ADMIN_URL/config``, default
``http://127.0.0.1:9901``). When the admin listener cannot be reached the rule is the strict
one: ``tiktok`` (the demo's social system) may serve no transaction at all.
``JALUR_LOADTEST_STRICT=1`` forces the strict rule even inside a transition window (use it once
a migration is meant to be finished).

Environment: ``JALUR_LOADTEST_ADMIN_URL``, ``JALUR_LOADTEST_ADMIN_TOKEN`` (sent as a bearer
token, if set), ``JALUR_LOADTEST_STRICT``, ``JALUR_LOADTEST_WAIT`` (think time ``MIN,MAX``
seconds, default ``0.1,0.6``), ``JALUR_LOADTEST_SHAPE`` (``step`` or ``migration``: run with a
shape from ``shapes.py``; unset: a fixed number of users from ``-u``/``-r``),
``LOADTEST_FAILURE_LOG`` (a file: every failure is appended as a JSON line with the response's
``x-request-id``, so ``soak.py`` can match it to Jalur's access log). The load test's own
variables are ``JALUR_LOADTEST_*``: Jalur never reads
those as config overrides (those are ``JALUR_<SECTION>__<FIELD>``).

Run (``make loadtest`` does all of this, including starting the demo)::

    locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 60s --host http://127.0.0.1:8080
"""

from __future__ import annotations

import json
import logging
import os
import random
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from locust import FastHttpUser, between, events, tag, task
from locust.contrib.fasthttp import ResponseContextManager

log = logging.getLogger("jalur.loadtest")

ADMIN_URL = os.environ.get("JALUR_LOADTEST_ADMIN_URL", "http://127.0.0.1:9901").rstrip("/")
TRANSACTION_ROUTES = frozenset({"cart", "checkout", "orders", "payment"})
FAILURE_LOG = os.environ.get("LOADTEST_FAILURE_LOG") or None
DEFAULT_SOCIAL = frozenset({"tiktok"})


def admin_get(path: str, timeout: float = 3.0) -> Any:
    """``GET`` an admin endpoint and decode its JSON (raises on any error)."""
    req = urllib.request.Request(ADMIN_URL + path)
    # /config needs the bearer token once one is set; the demo's by default (as shapes.py).
    token = os.environ.get("JALUR_LOADTEST_ADMIN_TOKEN", "jalur-demo-token")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


@dataclass
class Rules:
    """Which social systems may still answer which transaction routes (see the module doc)."""

    social: frozenset[str] = DEFAULT_SOCIAL
    # route name -> social systems owning one of its legacy clusters
    legacy: dict[str, frozenset[str]] = field(default_factory=dict)
    legacy_until: datetime | None = None
    source: str = "default (admin listener not reached)"

    def allowed_social(self, route: str) -> frozenset[str]:
        if self.legacy_until is None or datetime.now(UTC) >= self.legacy_until:
            return frozenset()
        return self.legacy.get(route, frozenset())

    @classmethod
    def from_config(cls, conf: dict[str, Any], strict: bool) -> Rules:
        systems = conf.get("systems") or {}
        social = frozenset(n for n, s in systems.items() if s.get("kind") == "social")
        clusters = conf.get("clusters") or {}
        comp = conf.get("compliance") or {}
        legacy_clusters = set(comp.get("legacy_clusters") or [])
        until_text = comp.get("transition_until")
        until = datetime.fromisoformat(until_text) if until_text else None
        legacy: dict[str, frozenset[str]] = {}
        for route in conf.get("routes") or []:
            named = [t["cluster"] for t in route.get("split") or []]
            if route.get("to"):
                named.append(route["to"])
            owners = frozenset(
                clusters[c]["system"] for c in named if c in legacy_clusters and c in clusters
            )
            if owners:
                legacy[route["name"]] = owners
        if strict:
            legacy, until = {}, None
        return cls(social or DEFAULT_SOCIAL, legacy, until, f"{ADMIN_URL}/config")


RULES = Rules()


@events.init.add_listener
def _load_rules(environment: Any, **_kw: Any) -> None:
    global RULES
    strict = os.environ.get("JALUR_LOADTEST_STRICT", "") not in ("", "0")
    try:
        RULES = Rules.from_config(admin_get("/config"), strict)
    except Exception as exc:  # any failure: keep the strict default
        log.warning("jalur rules: %s unreachable (%s); strict default rules", ADMIN_URL, exc)
    log.info(
        "jalur rules (from %s): social systems %s; legacy allowed %s until %s",
        RULES.source,
        sorted(RULES.social),
        {k: sorted(v) for k, v in RULES.legacy.items()} or "nowhere",
        RULES.legacy_until.isoformat() if RULES.legacy_until else "-",
    )


def fail(resp: ResponseContextManager, message: str) -> None:
    """Mark ``resp`` failed; with ``LOADTEST_FAILURE_LOG``, also append it there with its
    request id (None when no response carried one, e.g. a dropped connection)."""
    resp.failure(message)
    if FAILURE_LOG is None:
        return
    try:
        request_id = resp.headers.get("x-request-id")
    except AttributeError:  # no response at all
        request_id = None
    try:  # a payment's key: the soak ties a repeat's failure to its first attempt's fault
        key = resp.request.headers.get("Idempotency-Key")
    except AttributeError:
        key = None
    line = {
        "request_id": request_id,
        "key": key,
        "status": resp.status_code,
        "error": message[:200],
    }
    with open(FAILURE_LOG, "a") as f:
        f.write(json.dumps(line) + "\n")


def check(resp: ResponseContextManager, route: str) -> None:
    """Mark ``resp`` failed or succeeded by the rules in the module docstring."""
    status = resp.status_code
    if not 200 <= status < 300:
        body = (resp.text or "")[:120] if resp.content else ""
        fail(resp, f"HTTP {status} {body}".rstrip())
        return
    if route in TRANSACTION_ROUTES:
        system = resp.headers.get("x-backend-system")
        if system is None:
            fail(resp, "transaction response without x-backend-system")
            return
        if system in RULES.social and system not in RULES.allowed_social(route):
            cluster = resp.headers.get("x-backend-cluster", "?")
            fail(resp, f"transaction served by social system {system} (cluster {cluster})")
            return
    resp.success()


def _wait_time() -> Any:
    low, _, high = os.environ.get("JALUR_LOADTEST_WAIT", "0.1,0.6").partition(",")
    return between(float(low), float(high or low))


class Shopper(FastHttpUser):
    """One shopper with a stable user id (``x-user-id``: the sticky split key) and a session
    with the commerce system (``Authorization``: the identity its rate limits and payment
    scopes count per shopper; without it every shopper would share the load generator's
    address, and the demo's per-shopper payment limit would refuse them as one)."""

    host = "http://127.0.0.1:8080"
    wait_time = _wait_time()
    # Weights follow the real app: mostly browsing, a few transactions.

    def on_start(self) -> None:
        self.user_id = f"shopper-{uuid.uuid4().hex[:12]}"
        self.headers = {"x-user-id": self.user_id, "Authorization": f"Bearer {self.user_id}"}
        self.rng = random.Random(self.user_id)
        self.cart: list[int] = []
        self.orders: list[str] = []

    def _get(self, path: str, route: str) -> None:
        with self.client.get(path, name=route, headers=self.headers, catch_response=True) as r:
            check(r, route)

    def _post(
        self, path: str, route: str, body: dict[str, Any], extra: dict[str, str] | None = None
    ) -> None:
        headers = {**self.headers, **(extra or {})}
        with self.client.post(
            path, name=route, json=body, headers=headers, catch_response=True
        ) as r:
            check(r, route)

    @tag("promotion", "feed")
    @task(30)
    def feed(self) -> None:
        self._get(f"/api/feed?page={self.rng.randint(1, 20)}", "feed")

    @tag("promotion", "live")
    @task(10)
    def live(self) -> None:
        self._get(f"/api/live/{self.rng.randint(1, 50)}", "live")

    @tag("promotion", "products")
    @task(20)
    def product(self) -> None:
        self._get(f"/api/products/{self.rng.randint(1, 5000)}", "products")

    @tag("transaction", "cart")
    @task(10)
    def add_to_cart(self) -> None:
        product = self.rng.randint(1, 5000)
        self._post("/api/cart/items", "cart", {"product_id": product, "quantity": 1})
        self.cart.append(product)

    @tag("transaction", "checkout")
    @task(5)
    def checkout(self) -> None:
        items = self.cart or [self.rng.randint(1, 5000)]
        self._post("/api/checkout", "checkout", {"items": items, "currency": "IDR"})
        self.cart = []

    @tag("transaction", "payment")
    @task(5)
    def pay(self) -> None:
        order_id = f"o-{uuid.uuid4().hex[:10]}"
        self._post(
            "/api/payment/charge",
            "payment",
            {"order_id": order_id, "amount": self.rng.randint(10, 2000) * 1000, "currency": "IDR"},
            # A fresh key per payment: the proxy may retry it, the back end dedupes on it.
            {"Idempotency-Key": str(uuid.uuid4())},
        )
        self.orders.append(order_id)
        del self.orders[:-20]

    @tag("transaction", "payment", "retry")
    @task(3)
    def pay_and_retry(self) -> None:
        """The phone lost the answer: the same payment is sent again with the same key. The
        repeat must be a replay (``Idempotent-Replayed: true``), and the back end must have
        executed the payment once (``x-sim-executions: 1`` from the demo back end)."""
        key = str(uuid.uuid4())
        body = {"order_id": f"o-{uuid.uuid4().hex[:10]}", "amount": 5000, "currency": "IDR"}
        headers = {**self.headers, "Idempotency-Key": key}
        for attempt in ("payment", "payment-retry"):
            with self.client.post(
                "/api/payment/charge", name=attempt, json=body, headers=headers,
                catch_response=True,
            ) as r:  # fmt: skip
                check(r, "payment")
                if r.headers.get("x-sim-executions", "1") != "1":
                    fail(r, f"payment {key} executed {r.headers['x-sim-executions']} times")
                elif attempt == "payment-retry" and r.headers.get("Idempotent-Replayed") != "true":
                    fail(r, "a retried payment was not replayed")

    @tag("transaction", "orders")
    @task(5)
    def order(self) -> None:
        order_id = self.rng.choice(self.orders) if self.orders else f"o-{self.rng.randint(1, 9999)}"
        self._get(f"/api/orders/{order_id}", "orders")


# A shape from shapes.py, when asked for: Locust runs the load shape it finds in this module.
_SHAPE = os.environ.get("JALUR_LOADTEST_SHAPE", "").strip().lower()
if _SHAPE in ("step", "stepload", "steploadshape"):
    from shapes import StepLoadShape  # noqa: F401  (found by Locust)
elif _SHAPE in ("migration", "migrationramp", "migrationrampshape"):
    from shapes import MigrationRampShape  # noqa: F401  (found by Locust)
elif _SHAPE in ("rollback", "migrationrollbackdrill", "migrationrollbackdrillshape"):
    from shapes import MigrationRollbackDrillShape  # noqa: F401  (found by Locust)
elif _SHAPE:
    raise SystemExit(f"JALUR_LOADTEST_SHAPE={_SHAPE!r}: expected 'step', 'migration' or 'rollback'")
