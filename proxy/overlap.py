"""Can two path matchers take the same request path? (for ``jalur check``'s shadowing rule)

Prefix and exact matchers are decided exactly (string prefixes). A regex matcher is a
regular language, and deciding whether it meets another one exactly would mean building
automata; Jalur samples instead, from both sides:

- the *transaction* matcher's own paths: an exact path; a prefix ``P`` followed by a fixed
  set of suffixes (``""``, ``/``, ``/1``, ``/x``, ``/v1/confirm``, ``.json``, ...); for a
  regex, the strings generated from it (below);
- the *social* regex's language: strings generated from its parsed form (``re._parser``):
  every alternative of a branch, each repeat taken its minimum number of times and once
  and twice more, each character class by a few members (``/`` and letters first, as paths
  use them), anchors and lookarounds as empty; at most ``MAX_SAMPLES`` strings per pattern.

Two matchers overlap when a sample of either is taken by the other (the router's
semantics: regexes match the whole path, ``case_sensitive: false`` folds case). A hit is a
proof of overlap, so a refusal is never wrong; a miss is not a proof of disjointness: a
regex whose only overlapping strings are outside the samples (say ``/api/pa[^y].*`` against
``/api/pax9``, or a lookahead that rejects every generated string) passes the check. The run
time ``VariantCheck`` and the compliance guard still stand behind it.
"""

from __future__ import annotations

import itertools
import re
import re._constants as sre_c  # type: ignore[import-not-found]  # stdlib, 3.11+
import re._parser as sre_parse  # type: ignore[import-not-found]
from collections.abc import Callable, Iterable
from typing import Any, Final

# Most strings generated from one regex: bounds the check's time on patterns with many
# alternatives (a product of alternatives grows fast).
MAX_SAMPLES: Final = 512
# Suffixes appended to a prefix to sample the paths a prefix route takes.
PREFIX_SUFFIXES: Final = ("", "/", "/1", "/x", "/v1/confirm", "/123/pay", ".json", "x", "-1")
# Characters tried for a character class, in order: path separators and letters first.
_CLASS_CANDIDATES: Final = "/aAz0-_.x1~%"
_REPEAT_EXTRA: Final = (0, 1, 2)


class PathMatcher:
    """One route's path matcher: ``exact``, ``prefix``, ``regex`` or none (every path)."""

    def __init__(
        self,
        exact: str | None = None,
        prefix: str | None = None,
        regex: str | None = None,
        case_sensitive: bool = True,
    ) -> None:
        self.exact, self.prefix, self.regex = exact, prefix, regex
        self.case_sensitive = case_sensitive
        self.fold: Callable[[str], str] = (lambda s: s) if case_sensitive else str.lower
        flags = 0 if case_sensitive else re.IGNORECASE
        self._rx = re.compile(regex, flags) if regex is not None else None

    def takes(self, path: str) -> bool:
        if self.exact is not None:
            return self.fold(path) == self.fold(self.exact)
        if self.prefix is not None:
            return self.fold(path).startswith(self.fold(self.prefix))
        if self._rx is not None:
            return self._rx.fullmatch(path) is not None
        return True

    def samples(self) -> set[str]:
        """Paths this matcher takes (some of them)."""
        if self.exact is not None:
            return {self.exact}
        if self.prefix is not None:
            return {self.prefix + s for s in PREFIX_SUFFIXES}
        if self.regex is not None:
            return examples(self.regex)
        return {"/", "/x"}


def overlap(a: PathMatcher, b: PathMatcher) -> bool:
    """True when a path taken by both was found (see the module docstring for the limits)."""
    if a.regex is None and b.regex is None:
        if (a.exact is None and a.prefix is None) or (b.exact is None and b.prefix is None):
            return True
        fa = a.fold if a.case_sensitive and b.case_sensitive else str.lower
        x = fa(a.exact if a.exact is not None else a.prefix or "")
        y = fa(b.exact if b.exact is not None else b.prefix or "")
        if a.exact is not None and b.exact is not None:
            return x == y
        if a.exact is not None:
            return x.startswith(y)
        if b.exact is not None:
            return y.startswith(x)
        return x.startswith(y) or y.startswith(x)
    return any(b.takes(s) for s in a.samples()) or any(a.takes(s) for s in b.samples())


def examples(pattern: str, limit: int = MAX_SAMPLES) -> set[str]:
    """Strings of ``pattern``'s language (many, not all): see the module docstring."""
    try:
        parsed = sre_parse.parse(pattern)
    except re.error:
        return set()
    rx = re.compile(pattern)
    out = set(itertools.islice(_seq(list(parsed), limit), limit))
    return {s for s in out if rx.fullmatch(s)} or out


def _seq(items: list[tuple[Any, Any]], limit: int) -> Iterable[str]:
    parts = [list(itertools.islice(_node(op, av, limit), limit)) for op, av in items]
    for combo in itertools.islice(itertools.product(*parts), limit):
        yield "".join(combo)


def _node(op: Any, av: Any, limit: int) -> Iterable[str]:
    if op is sre_c.LITERAL:
        yield chr(av)
    elif op is sre_c.NOT_LITERAL:
        yield next(c for c in _CLASS_CANDIDATES if ord(c) != av)
    elif op is sre_c.ANY:
        yield from ("x", "/")
    elif op is sre_c.IN:
        yield from _class(av)
    elif op is sre_c.BRANCH:
        for alternative in av[1]:
            yield from _seq(list(alternative), limit)
    elif op is sre_c.SUBPATTERN:
        yield from _seq(list(av[-1]), limit)
    elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, getattr(sre_c, "POSSESSIVE_REPEAT", None)):
        low, high, body = av
        inner = list(itertools.islice(_seq(list(body), limit), 4)) or [""]
        for extra in _REPEAT_EXTRA:
            n = low + extra
            if n > high:
                break
            for s in inner:
                yield s * n
    elif op is getattr(sre_c, "ATOMIC_GROUP", None):
        yield from _seq(list(av), limit)
    else:  # AT (anchors), ASSERT, ASSERT_NOT, GROUPREF, ...: no characters of their own
        yield ""


def _class(items: list[tuple[Any, Any]]) -> list[str]:
    negate = bool(items) and items[0][0] is sre_c.NEGATE
    rx_items = items[1:] if negate else items

    def member(c: str) -> bool:
        code = ord(c)
        for op, av in rx_items:
            if op is sre_c.LITERAL and av == code:
                return True
            if op is sre_c.RANGE and av[0] <= code <= av[1]:
                return True
            if op is sre_c.CATEGORY and _category(av, c):
                return True
        return False

    picked = [c for c in _CLASS_CANDIDATES if member(c) != negate][:3]
    if not picked and not negate:
        for op, av in rx_items:
            if op is sre_c.LITERAL:
                picked.append(chr(av))
            elif op is sre_c.RANGE:
                picked.append(chr(av[0]))
    return picked[:3] or [""]


def _category(cat: Any, c: str) -> bool:
    name = str(cat)
    table = {
        "CATEGORY_DIGIT": c.isdigit(),
        "CATEGORY_NOT_DIGIT": not c.isdigit(),
        "CATEGORY_WORD": c.isalnum() or c == "_",
        "CATEGORY_NOT_WORD": not (c.isalnum() or c == "_"),
        "CATEGORY_SPACE": c.isspace(),
        "CATEGORY_NOT_SPACE": not c.isspace(),
    }
    return table.get(name, False)
