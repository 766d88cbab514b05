"""The compiled route table: ``Router.match(...) -> Route | None``.

Routes are compiled once at config load (regexes compiled, methods frozen, prefixes
case-folded when the route is case-insensitive). Order is the config's order and the first
route that matches wins, as in Envoy. ``match`` is called with the *canonical* path from
``paths.canonicalize``; the same string is what gets forwarded upstream.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from . import config as cfg

HeaderGetter = Mapping[str, str]  # a case-insensitive mapping (multidict.CIMultiDictProxy)


@dataclass(frozen=True, slots=True)
class Target:
    cluster: str
    weight: int


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled route. ``targets`` has one entry for ``to:``, several for ``split:``."""

    index: int
    name: str
    category: str
    targets: tuple[Target, ...]
    sticky_header: str | None
    sticky_cookie: str | None
    spec: cfg.Route
    _path: Callable[[str, str], bool]
    _methods: frozenset[str] | None
    _host: Callable[[str], bool] | None
    _headers: tuple[Callable[[HeaderGetter], bool], ...]

    def matches(self, method: str, host: str, path: str, lower: str, headers: HeaderGetter) -> bool:
        if not self._path(path, lower):
            return False
        if self._methods is not None and method not in self._methods:
            return False
        if self._host is not None and not self._host(host):
            return False
        return all(check(headers) for check in self._headers)


class Router:
    def __init__(self, routes: Sequence[cfg.Route]) -> None:
        self.routes: tuple[Route, ...] = tuple(compile_route(i, r) for i, r in enumerate(routes))
        self.by_name: dict[str, Route] = {r.name: r for r in self.routes}

    def match(self, method: str, host: str, path: str, headers: HeaderGetter) -> Route | None:
        """The first route matching; ``host`` is ``paths.canonical_host`` of the request,
        ``path`` its canonical path."""
        lower = path.lower()
        for route in self.routes:
            if route.matches(method, host, path, lower, headers):
                return route
        return None


def compile_route(index: int, spec: cfg.Route) -> Route:
    m = spec.match
    if spec.split is not None:
        targets = tuple(Target(t.cluster, t.weight) for t in spec.split)
    else:
        assert spec.to is not None
        targets = (Target(spec.to, 1),)
    return Route(
        index=index,
        name=spec.name,
        category=spec.category,
        targets=targets,
        sticky_header=spec.sticky.header if spec.sticky else None,
        sticky_cookie=spec.sticky.cookie if spec.sticky else None,
        spec=spec,
        _path=_path_matcher(m),
        _methods=frozenset(m.methods) if m.methods is not None else None,
        _host=_host_matcher(m.host) if m.host is not None else None,
        _headers=tuple(_header_matcher(h) for h in m.headers),
    )


def _path_matcher(m: cfg.Match) -> Callable[[str, str], bool]:
    """A function of (path, lowercased path); the lowercased form is computed once per
    request by the router and shared by every case-insensitive route."""
    sensitive = m.case_sensitive
    if m.exact is not None:
        exact = m.exact if sensitive else m.exact.lower()
        if sensitive:
            return lambda path, lower: path == exact
        return lambda path, lower: lower == exact
    if m.prefix is not None:
        prefix = m.prefix if sensitive else m.prefix.lower()
        if sensitive:
            return lambda path, lower: path.startswith(prefix)
        return lambda path, lower: lower.startswith(prefix)
    if m.regex is not None:
        # Full match, as Envoy's safe_regex: a regex route never matches a mere substring.
        rx = re.compile(m.regex, 0 if sensitive else re.IGNORECASE)
        return lambda path, lower: rx.fullmatch(path) is not None
    return lambda path, lower: True


def _host_matcher(pattern: str) -> Callable[[str], bool]:
    """Matched on ``paths.canonical_host``: lower case, no port, no trailing dot."""
    pattern = pattern.lower().removesuffix(".")
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        return lambda host: host.endswith(suffix)
    return lambda host: host == pattern


def _header_matcher(h: cfg.HeaderMatch) -> Callable[[HeaderGetter], bool]:
    name = h.name
    invert = h.invert
    check: Callable[[str | None], bool]
    if h.exact is not None:
        exact = h.exact
        check = lambda v: v == exact  # noqa: E731
    elif h.prefix is not None:
        prefix = h.prefix
        check = lambda v: v is not None and v.startswith(prefix)  # noqa: E731
    elif h.regex is not None:
        rx = re.compile(h.regex)
        check = lambda v: v is not None and rx.fullmatch(v) is not None  # noqa: E731
    else:
        present = bool(h.present)
        check = lambda v: (v is not None) == present  # noqa: E731
    return lambda headers: check(headers.get(name)) != invert
