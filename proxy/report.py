"""``jalur report``: the migration compliance report, from a verified audit trail only.

Inputs are the trail's records and nothing else (no Prometheus, no config file): request
records (``allowed`` / ``blocked``), ``config`` records (category weights, each route's
category and split, each cluster's system kind, written at every start and reload) and
``weights-changed`` records (admin ramps, with actor and previous weights).

Figures, for records with ``since <= time < until``, per category and route:

- ``commerce`` / ``social``: requests Jalur sent to a cluster of a commerce / a social
  (legacy) system (``decision: allowed`` with a cluster; the answer's status does not
  matter: a 5xx from a commerce back end is still commerce traffic);
- ``blocked``: refused requests by reason (the compliance and boundary slugs);
- ``consent``: outcomes of the consent check on requests that carried a gated identity;
- progress of a category = commerce / (commerce + social), over the categories of
  ``migration.weights``; the total is their weighted mean over the categories that had
  traffic (a silent category's weight is spread over the others), as ``GET /migration``
  computes it, but over the whole window or one day instead of a sliding window. The
  weights used are those in effect at the end of the period, and are printed with it.

A cluster's kind is looked up in the last ``config`` record its process wrote before the
request. Weight changes are ``weights-changed`` records (actor: ``X-Jalur-Actor``, peer) and
split changes between two ``config`` records (actor ``config reload``); a change is a
*rollback* when it lowers the share of weight on commerce clusters.

The chart (progress over time) is an SVG polyline drawn here: no plotting library, so the
proxy's dependencies stay as they are.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from . import audit

__all__ = ["NotVerified", "build", "parse_time", "render"]

# Chart buckets: the smallest of these steps (seconds) that cuts the span of the traffic
# in the window into at most MAX_POINTS points (a demo of minutes gets 10-second points, a
# migration of months daily ones; the last step is used whatever the span). While counting,
# at most MAX_BUCKETS buckets are kept (bounds memory whatever the trail's length).
MAX_POINTS: Final = 120
MAX_BUCKETS: Final = 100_000
_STEPS: Final = (1, 10, 60, 600, 3600, 6 * 3600, 86_400, 7 * 86_400)


class NotVerified(Exception):
    """The trail has breaks: no report is made from it."""

    def __init__(self, breaks: list[audit.Break]) -> None:
        super().__init__(f"{len(breaks)} break(s)")
        self.breaks = breaks


def parse_time(text: str) -> datetime:
    """An RFC 3339 time (``2026-12-06T03:00:00Z``) or a date (midnight UTC); naive = UTC."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an RFC 3339 time or date: {text!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass
class _Counts:
    commerce: int = 0
    social: int = 0
    blocked: dict[str, int] = field(default_factory=dict)
    consent: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "commerce": self.commerce,
            "social": self.social,
            "blocked": dict(sorted(self.blocked.items())),
            "consent": dict(sorted(self.consent.items())),
        }


def _progress(served: dict[str, tuple[int, int]], weights: dict[str, float]) -> dict[str, Any]:
    """Per category (commerce, total, ratio) and the weighted total, from ``served``
    (category -> (commerce, social))."""
    categories: dict[str, Any] = {}
    for category in weights:
        commerce, social = served.get(category, (0, 0))
        total = commerce + social
        categories[category] = {
            "commerce": commerce,
            "requests": total,
            "ratio": commerce / total if total else None,
        }
    measured = [
        (w, categories[c]["ratio"])
        for c, w in weights.items()
        if categories[c]["ratio"] is not None and w > 0
    ]
    weight = sum(w for w, _ in measured)
    total_ratio = sum(w * r for w, r in measured) / weight if weight else None
    return {"categories": categories, "weights": dict(weights), "ratio": total_ratio}


def _share(weights: dict[str, int], kinds: dict[str, str | None]) -> float | None:
    total = sum(weights.values())
    if not total:
        return None
    return sum(w for c, w in weights.items() if kinds.get(c) == "commerce") / total


def build(
    paths: Sequence[str | os.PathLike[str]],
    key: bytes,
    since: datetime,
    until: datetime,
    *,
    live: bool = False,
) -> dict[str, Any]:
    """The report as plain data; raises :class:`NotVerified` for a broken trail.

    Two passes: :func:`audit.verify`, then the records are read again one file at a time
    and only counted, so memory does not grow with the trail (a month of records)."""
    verdict = audit.verify(paths, key, live=live)
    if not verdict.intact:
        raise NotVerified(verdict.breaks)
    lo, hi = audit.rfc3339(since.timestamp()), audit.rfc3339(until.timestamp())
    configs: dict[str, dict[str, Any]] = {}  # chain -> its last config record
    latest: dict[str, Any] | None = None  # the last config record read, of any chain
    in_effect: tuple[str, dict[str, Any]] | None = None  # the newest one before ``until``
    routes: dict[tuple[str, str], _Counts] = {}
    served_day: dict[str, dict[str, list[int]]] = {}
    weights_at_day: dict[str, dict[str, float]] = {}
    timeline = _Timeline()
    changes: list[dict[str, Any]] = []
    dropped = 0
    requests = 0
    for e in audit.records(verdict.files):
        when = str(e.get("time", ""))
        decision = e.get("decision")
        chain = str(e.get("chain"))
        inside = lo <= when < hi
        if decision == "config":
            before = configs.get(chain) or latest
            configs[chain] = latest = e
            if when < hi and (in_effect is None or when >= in_effect[0]):
                in_effect = (when, e)
            if inside and before is not None:
                changes.extend(_reload_changes(when, before, e))
            continue
        if not inside:
            continue
        conf = configs.get(chain) or latest
        if decision == "dropped":
            dropped += int(e.get("count") or 0)
            continue
        if decision in ("weights-changed", "migration-rollback"):
            changes.append(_admin_change(when, e, conf))
            continue
        if decision not in ("allowed", "blocked") or e.get("route") is None:
            continue
        requests += 1
        category, route = str(e.get("category")), str(e["route"])
        counts = routes.setdefault((category, route), _Counts())
        consent = e.get("consent")
        if consent is not None:
            counts.consent[str(consent)] = counts.consent.get(str(consent), 0) + 1
        if decision == "blocked":
            reason = str(e.get("reason"))
            counts.blocked[reason] = counts.blocked.get(reason, 0) + 1
            continue
        kind = _kind(conf, e.get("cluster"))
        if kind is None:
            continue  # not sent to any cluster (e.g. no healthy endpoint)
        is_social = kind != "commerce"
        if is_social:
            counts.social += 1
        else:
            counts.commerce += 1
        cell = served_day.setdefault(when[:10], {}).setdefault(category, [0, 0])
        cell[is_social] += 1
        timeline.add(parse_time(when).timestamp(), category, is_social)
        if conf is not None:
            weights_at_day[when[:10]] = conf["category_weights"]

    weights: dict[str, float] = dict(in_effect[1]["category_weights"]) if in_effect else {}
    per_route = [
        {"category": c, "route": r, **counts.as_dict()} for (c, r), counts in sorted(routes.items())
    ]
    window_served: dict[str, tuple[int, int]] = {}
    for (category, _), counts in routes.items():
        commerce, social = window_served.get(category, (0, 0))
        window_served[category] = (commerce + counts.commerce, social + counts.social)
    daily = [
        {"day": day, **_progress(_pairs(cats), weights_at_day.get(day, weights))}
        for day, cats in sorted(served_day.items())
    ]
    step, series = timeline.series(weights)
    return {
        "window": {"since": lo, "until": hi},
        "trail": {
            "files": verdict.files,
            "records": verdict.records,
            "chains": verdict.chains,
            "seals": verdict.seals,
            "verified": True,
            "notes": verdict.warnings,
        },
        "requests": requests,
        "dropped": dropped,
        "routes": per_route,
        "progress": _progress(window_served, weights),
        "daily": daily,
        "series": {"step_seconds": step, "points": series},
        "weight_changes": _distinct(changes),
    }


class _Timeline:
    """Served requests per (time bucket, category) for the chart, in bounded memory: the
    buckets start at 1 s and are merged into the next step of ``_STEPS`` whenever there
    are more than MAX_BUCKETS of them (every step divides the next one)."""

    def __init__(self) -> None:
        self.level = 0
        self.buckets: dict[int, dict[str, list[int]]] = {}
        self.first = math.inf
        self.last = -math.inf

    def add(self, stamp: float, category: str, social: bool) -> None:
        self.first = min(self.first, stamp)
        self.last = max(self.last, stamp)
        cell = self.buckets.setdefault(int(stamp // _STEPS[self.level]), {})
        counts = cell.setdefault(category, [0, 0])
        counts[social] += 1
        if len(self.buckets) > MAX_BUCKETS and self.level < len(_STEPS) - 1:
            self._coarsen(self.level + 1)

    def _coarsen(self, level: int) -> None:
        ratio = _STEPS[level] // _STEPS[self.level]
        merged: dict[int, dict[str, list[int]]] = {}
        for b, cats in self.buckets.items():
            into = merged.setdefault(b // ratio, {})
            for category, (commerce, social) in cats.items():
                counts = into.setdefault(category, [0, 0])
                counts[0] += commerce
                counts[1] += social
        self.level, self.buckets = level, merged

    def series(self, weights: dict[str, float]) -> tuple[int, list[dict[str, Any]]]:
        """(step seconds, weighted progress per bucket): the smallest step that gives at most
        MAX_POINTS points over the traffic's span."""
        if not self.buckets:
            return _STEPS[-1], []
        span = self.last - self.first
        level = next((i for i, s in enumerate(_STEPS) if span / s <= MAX_POINTS), len(_STEPS) - 1)
        if level > self.level:
            self._coarsen(level)
        step = _STEPS[self.level]
        return step, [
            {
                "at": audit.rfc3339(b * step)[:19] + "Z",
                "ratio": _progress(_pairs(c), weights)["ratio"],
            }
            for b, c in sorted(self.buckets.items())
        ]


def _distinct(changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """In time order; a reload seen by several workers (one ``config`` record each) is
    listed once: the same change of the same route within the same minute."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for c in sorted(changes, key=lambda c: str(c["time"])):
        if c["via"] == "config":
            key = (c["route"], str(c["previous"]), str(c["weights"]), c["time"][:16])
            if key in seen:
                continue
            seen.add(key)
        out.append(c)
    return out


def _pairs(cats: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    return {c: (v[0], v[1]) for c, v in cats.items()}


def _kind(conf: dict[str, Any] | None, cluster: Any) -> str | None:
    if conf is None or not isinstance(cluster, str):
        return None
    spec = conf.get("clusters", {}).get(cluster)
    return spec.get("kind") if isinstance(spec, dict) else None


def _kinds(conf: dict[str, Any] | None) -> dict[str, str | None]:
    if conf is None:
        return {}
    return {n: c.get("kind") for n, c in conf.get("clusters", {}).items()}


def _admin_change(when: str, e: dict[str, Any], conf: dict[str, Any] | None) -> dict[str, Any]:
    kinds = _kinds(conf)
    before = e.get("previous") or {}
    after = e.get("weights") or {}
    old, new = _share(before, kinds), _share(after, kinds)
    return {
        "time": when,
        "route": e.get("route"),
        "previous": before,
        "weights": after,
        "commerce_share": {"before": old, "after": new},
        "rollback": bool(e.get("rollback"))
        or e.get("decision") == "migration-rollback"
        or (old is not None and new is not None and new < old),
        "actor": e.get("actor") or "(not named)",
        "peer": e.get("peer"),
        "via": "config" if e.get("actor") == "config" else "admin",
    }


def _reload_changes(
    when: str, before: dict[str, Any], after: dict[str, Any]
) -> list[dict[str, Any]]:
    out = []
    kinds = _kinds(after)
    old_routes = before.get("routes", {})
    for name, spec in after.get("routes", {}).items():
        old = old_routes.get(name)
        if old is None or len(spec["weights"]) < 2 or old["weights"] == spec["weights"]:
            continue
        a, b = _share(old["weights"], _kinds(before)), _share(spec["weights"], kinds)
        out.append(
            {
                "time": when,
                "route": name,
                "previous": old["weights"],
                "weights": spec["weights"],
                "commerce_share": {"before": a, "after": b},
                "rollback": a is not None and b is not None and b < a,
                "actor": "config reload",
                "peer": None,
                "via": "config",
            }
        )
    return out


# -- rendering --------------------------------------------------------------------------


def render(report: dict[str, Any], fmt: str, *, chart_href: str | None = None) -> str:
    if fmt == "json":
        return orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n"
    if fmt == "html":
        return _html(report)
    return _markdown(report, chart_href)


def _pct(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio * 100:.1f} %"


def _bar(ratio: float | None, width: int = 20) -> str:
    if ratio is None:
        return ""
    full = round(ratio * width)
    return "█" * full + "░" * (width - full)


def _slugs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def _tables(r: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, shared by Markdown and HTML."""
    p = r["progress"]
    progress_rows = [
        [
            c,
            str(f["commerce"]),
            str(f["requests"] - f["commerce"]),
            _pct(f["ratio"]),
            f"{p['weights'][c]:g}",
        ]
        for c, f in p["categories"].items()
    ]
    progress_rows.append(["**all** (weighted)", "", "", _pct(p["ratio"]), ""])
    routes = [
        [
            x["category"],
            x["route"],
            str(x["commerce"]),
            str(x["social"]),
            _slugs(x["blocked"]),
            _slugs(x["consent"]),
        ]
        for x in r["routes"]
    ]
    daily = [
        [d["day"], _pct(d["ratio"]), _bar(d["ratio"])]
        + [_pct(d["categories"][c]["ratio"]) for c in p["categories"]]
        for d in r["daily"]
    ]
    changes = [
        [
            c["time"],
            c["route"],
            _weights(c["previous"]),
            _weights(c["weights"]),
            f"{_pct(c['commerce_share']['before'])} → {_pct(c['commerce_share']['after'])}",
            "**yes**" if c["rollback"] else "no",
            f"{c['actor']}" + (f" ({c['peer']})" if c["peer"] else ""),
        ]
        for c in r["weight_changes"]
    ]
    return [
        (
            "Migration progress over the window",
            ["category", "commerce", "legacy social", "progress", "weight"],
            progress_rows,
        ),
        (
            "Per category and route",
            [
                "category",
                "route",
                "served by commerce",
                "served by legacy social",
                "blocked (by reason)",
                "consent outcomes",
            ],
            routes,
        ),
        ("Daily progress", ["day (UTC)", "weighted", "", *p["categories"]], daily),
        (
            "Weight changes and rollbacks",
            ["time (UTC)", "route", "from", "to", "commerce share", "rollback", "actor"],
            changes,
        ),
    ]


def _weights(w: dict[str, int]) -> str:
    return " ".join(f"{c}:{n}" for c, n in w.items())


def _summary(r: dict[str, Any]) -> list[str]:
    t = r["trail"]
    return [
        f"Window: {r['window']['since']} to {r['window']['until']} (UTC).",
        f"Trail verified: {t['records']} records in {len(t['files'])} file(s), "
        f"{t['chains']} chain(s), {t['seals']} seal(s) checked under the audit key.",
        f"Audited requests in the window: {r['requests']}; audit records dropped "
        f"(queue full): {r['dropped']}.",
        f"Weighted migration progress over the window: **{_pct(r['progress']['ratio'])}**.",
    ]


def _markdown(r: dict[str, Any], chart_href: str | None) -> str:
    out = ["# Jalur migration compliance report", ""]
    out += [f"- {line}" for line in _summary(r)]
    for note in r["trail"]["notes"]:
        out.append(f"- Note: {note}")
    out.append("")
    if chart_href is not None:
        out += ["## Progress over time", "", f"![progress over time]({chart_href})", ""]
    else:
        out += ["## Progress over time", "", "| at (UTC) | weighted progress | |", "|---|---|---|"]
        out += [
            f"| {pt['at']} | {_pct(pt['ratio'])} | {_bar(pt['ratio'])} |"
            for pt in r["series"]["points"]
        ]
        out.append("")
    for title, header, rows in _tables(r):
        out += [f"## {title}", ""]
        if not rows:
            out += ["None in the window.", ""]
            continue
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        out += ["| " + " | ".join(row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)


def _html(r: dict[str, Any]) -> str:
    def cell(text: str) -> str:
        text = html.escape(text)
        if text.startswith("**") and text.endswith("**"):
            return f"<b>{text[2:-2]}</b>"
        return text

    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Jalur migration compliance report</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left}</style>",
        "</head><body>",
        "<h1>Jalur migration compliance report</h1>",
        "<ul>" + "".join(f"<li>{cell(s).replace('**', '')}</li>" for s in _summary(r)) + "</ul>",
        "<h2>Progress over time</h2>",
        chart(r),
    ]
    for title, header, rows in _tables(r):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if not rows:
            parts.append("<p>None in the window.</p>")
            continue
        parts.append("<table><tr>" + "".join(f"<th>{cell(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def chart(r: dict[str, Any], width: int = 640, height: int = 240) -> str:
    """Weighted progress per time bucket as an SVG polyline (0-100 %) on a time axis, with
    each weight change as a dashed vertical line (red when it is a rollback)."""
    points = [p for p in r["series"]["points"] if p["ratio"] is not None]
    left, right, top, bottom = 48, 12, 12, 36
    w, h = width - left - right, height - top - bottom
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="white" stroke="#999"/>',
    ]
    for pct in (0, 25, 50, 75, 100):
        y = top + h - h * pct / 100
        svg.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + w}" y2="{y:.1f}" stroke="#eee"/>')
        svg.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{pct} %</text>')
    if not points:
        svg.append(
            f'<text x="{left + w / 2}" y="{top + h / 2}" text-anchor="middle">'
            "no traffic of a migrated category in the window</text></svg>"
        )
        return "\n".join(svg)
    step = float(r["series"]["step_seconds"])
    t0 = parse_time(points[0]["at"]).timestamp()
    t1 = parse_time(points[-1]["at"]).timestamp() + step
    span = max(t1 - t0, 1.0)

    def x_of(t: float) -> float:
        return left + w * (t - t0) / span

    xy = [
        (x_of(parse_time(p["at"]).timestamp() + step / 2), top + h - h * p["ratio"]) for p in points
    ]
    for c in r["weight_changes"]:
        t = parse_time(c["time"]).timestamp()
        if t0 <= t <= t1:
            x = x_of(t)
            color = "#c33" if c["rollback"] else "#888"
            label = html.escape(f"{c['time']} {c['route']} by {c['actor']}")
            svg.append(
                f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + h}" stroke="{color}" '
                f'stroke-dasharray="4 3"><title>{label}</title></line>'
            )
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    svg.append(f'<polyline points="{coords}" fill="none" stroke="#0a7" stroke-width="2"/>')
    for (x, y), p in zip(xy, points, strict=True):
        label = html.escape(f"{p['at']}: {_pct(p['ratio'])}")
        svg.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#0a7"><title>{label}</title></circle>'
        )
    for x, anchor, t in ((left, "start", t0), (left + w, "end", t1)):
        svg.append(
            f'<text x="{x}" y="{height - 14}" text-anchor="{anchor}">'
            f"{html.escape(audit.rfc3339(t)[:19])}Z</text>"
        )
    svg.append(
        f'<text x="{left + w / 2}" y="{height - 2}" text-anchor="middle">weighted progress per '
        f"{step:g} s (dashed: weight changes, red: rollbacks)</text>"
    )
    svg.append("</svg>")
    return "\n".join(svg)
