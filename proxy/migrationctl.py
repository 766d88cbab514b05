"""``jalur migration status|ramp|rollback``: the operator's view of the fleet's migration,
talking to any replica's admin listener (every replica shows the same live weights).

The bearer token comes from the environment (``JALUR_ADMIN__TOKEN``, the variable that sets
``admin.token`` on the proxy), never from argv (visible in ``ps``). ``ramp`` refuses a step
that moves shoppers back (the proxy answers 409); ``rollback`` does it on purpose and needs
``--why``: both are audited with the actor and the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any, Final, TextIO

TOKEN_ENV: Final = "JALUR_ADMIN__TOKEN"
DEFAULT_ADMIN: Final = "http://127.0.0.1:9901"
# Seconds one admin call may take before the command gives up.
TIMEOUT: Final = 10.0


def add_parser(sub: Any) -> None:
    mig = sub.add_parser("migration", help="the fleet's migration: status, ramp, rollback")
    mig.add_argument(
        "--admin", default=DEFAULT_ADMIN, help=f"admin listener URL (default {DEFAULT_ADMIN})"
    )
    verbs = mig.add_subparsers(dest="verb", required=True)
    verbs.add_parser("status", help="live weights, who set them, and measured progress")
    for name, helptext in (
        ("ramp", "move shoppers towards commerce (refused if any would move back)"),
        ("rollback", "move shoppers back on purpose (audited; needs --why)"),
    ):
        verb = verbs.add_parser(name, help=helptext)
        verb.add_argument("route", help="split route name")
        verb.add_argument(
            "weights", nargs="+", metavar="CLUSTER=WEIGHT", help="the new weight of each cluster"
        )
        verb.add_argument("--why", default="", required=name == "rollback", help="reason")
        verb.add_argument("--actor", default=os.environ.get("USER", ""), help="who asks")


def _call(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    token = os.environ.get(TOKEN_ENV)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, {"error": exc.reason}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SystemExit(f"jalur migration: cannot reach the admin listener {url}: {exc}") from None


def _weights(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        cluster, sep, weight = item.partition("=")
        if not sep or not cluster or not weight.isdigit():
            raise SystemExit(f"jalur migration: {item!r} is not CLUSTER=WEIGHT")
        out[cluster] = int(weight)
    return out


def _print_route(name: str, view: dict[str, Any], out: TextIO) -> None:
    weights = view.get("weights", {})
    systems = view.get("systems", {})
    total = sum(weights.values()) or 1
    commerce = sum(w for c, w in weights.items() if systems.get(c) == "commerce")
    live = view.get("live") or {}
    print(f"route {name} ({view.get('category')}): commerce {commerce / total:.1%}", file=out)
    print("  live:       " + ", ".join(f"{c}={w}" for c, w in weights.items()), file=out)
    configured = view.get("configured", {})
    print("  config file " + ", ".join(f"{c}={w}" for c, w in configured.items()), file=out)
    if live:
        print(
            f"  version {live.get('version')} by {live.get('actor')!r} "
            f"({live.get('reason') or '-'}){' ROLLBACK' if live.get('rollback') else ''}",
            file=out,
        )
    if view.get("held_back"):
        print("  the file gives commerce less: the live weights stay (rollback to lower)", file=out)


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    base = args.admin.rstrip("/")
    if args.verb == "status":
        status, view = _call(f"{base}/migration")
        if status != 200:
            print(f"jalur migration: {status} {view}", file=err)
            return 1
        for name, route in view.get("routes", {}).items():
            _print_route(name, route, out)
        progress = view.get("progress", {})
        shown = ", ".join(
            f"{c} {f['ratio']:.1%}" if f.get("ratio") is not None else f"{c} -"
            for c, f in progress.items()
        )
        print(f"progress over {view.get('window_seconds')} s: {shown}", file=out)
        return 0
    body = {
        "weights": _weights(args.weights),
        "rollback": args.verb == "rollback",
        "why": args.why,
        "actor": args.actor,
    }
    status, view = _call(f"{base}/migration/{args.route}", body)
    if status != 200:
        error = view.get("error") if isinstance(view, dict) else view
        print(f"jalur migration {args.verb}: {status} {error}", file=err)
        return 1
    _print_route(args.route, view, out)
    return 0
