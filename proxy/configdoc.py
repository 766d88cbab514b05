"""docs/configuration.md's reference part, generated from the schema in ``proxy/config.py``.

Each section is one config Struct reached from ``Config`` (``clusters.NAME.timeouts``,
``routes[].match``), with its docstring; each row is a field: its type and bounds and default
as msgspec sees them, and the ``#`` comment written above the field (or after it on its
line) in ``config.py``. So the reference cannot drift from the code: ``scripts/generate.py``
writes it, and ``tests/test_generated.py`` fails while the file differs.

The page's hand-written part (an annotated example, environment overrides) is everything
above ``MARKER`` in the existing file and is kept as it is.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import msgspec
from msgspec import inspect as mi

from . import config as cfg

__all__ = ["MARKER", "field_comments", "render", "sections"]

MARKER: Final = (
    "<!-- GENERATED BELOW by scripts/generate.py from the schema and field comments in "
    "proxy/config.py: edit those, not this part. -->"
)
SOURCE: Final = Path(cfg.__file__)


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment above the field (consecutive ``#`` lines
    directly before it) and after it on the same line, joined into one paragraph."""
    comments: dict[int, str] = {}  # line -> comment text
    own_line: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            comments[line] = tok.string.lstrip("#").strip()
            if not tok.line[: tok.start[1]].strip():
                own_line.add(line)
    out: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above: list[str] = []
            line = stmt.lineno - 1
            while line in own_line:
                above.insert(0, comments[line])
                line -= 1
            end = stmt.end_lineno or stmt.lineno
            after = [
                comments[n]
                for n in range(stmt.lineno, end + 1)
                if n in comments and n not in own_line
            ]
            text = " ".join(t for t in (*above, *after) if t)
            out[(node.name, stmt.target.id)] = text
    return out


def _bounds(t: Any) -> str:
    parts = []
    for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        value = getattr(t, attr, None)
        if value is not None:
            parts.append(f"{op} {value:,}" if isinstance(value, int) else f"{op} {value}")
    for attr, what in (("min_length", "at least"), ("max_length", "at most")):
        value = getattr(t, attr, None)
        if value is not None:
            parts.append(f"{what} {value} long")
    return f" ({', '.join(parts)})" if parts else ""


def type_name(t: mi.Type) -> str:
    """A short, human reading of a msgspec type."""
    if isinstance(t, mi.UnionType):
        names = [type_name(x) for x in t.types if not isinstance(x, mi.NoneType)]
        text = " or ".join(dict.fromkeys(names))
        return f"{text} or null" if any(isinstance(x, mi.NoneType) for x in t.types) else text
    if isinstance(t, mi.LiteralType):
        return " | ".join(f"`{v}`" for v in t.values)
    if isinstance(t, mi.StructType):
        return "mapping (below)"
    if isinstance(t, mi.ListType):
        return f"list of {type_name(t.item_type)}"
    if isinstance(t, mi.DictType):
        return f"mapping of name to {type_name(t.value_type)}"
    simple = {
        mi.IntType: "integer",
        mi.FloatType: "number",
        mi.BoolType: "boolean",
        mi.StrType: "string",
        mi.DateTimeType: "date-time with UTC offset",
    }
    for kind, name in simple.items():
        if isinstance(t, kind):
            return name + _bounds(t)
    return type(t).__name__.removesuffix("Type").lower()


def _default(field: mi.Field) -> str:
    if field.required:
        return "required"
    value = field.default
    if value is msgspec.NODEFAULT and field.default_factory is not msgspec.NODEFAULT:
        value = field.default_factory()
    if isinstance(value, msgspec.Struct):
        return "(below)"
    if value is None:
        return "null"
    return f"`{json.dumps(msgspec.to_builtins(value))}`"


def _structs(t: mi.Type) -> Iterator[tuple[str, mi.StructType]]:
    """The Structs inside ``t``, with the path suffix that reaches them."""
    if isinstance(t, mi.StructType):
        yield "", t
    elif isinstance(t, mi.UnionType):
        for x in t.types:
            yield from _structs(x)
    elif isinstance(t, mi.ListType):
        for suffix, s in _structs(t.item_type):
            yield "[]" + suffix, s
    elif isinstance(t, mi.DictType):
        for suffix, s in _structs(t.value_type):
            yield ".NAME" + suffix, s


def sections() -> list[tuple[str, mi.StructType]]:
    """(dotted path, Struct) for every section, depth first in field order."""
    out: list[tuple[str, mi.StructType]] = []
    seen: set[str] = set()

    def visit(path: str, struct: mi.StructType) -> None:
        if path in seen:
            return
        seen.add(path)
        out.append((path, struct))
        for field in struct.fields:
            for suffix, inner in _structs(field.type):
                visit(f"{path}.{field.encode_name}{suffix}".lstrip("."), inner)

    root = mi.type_info(cfg.Config)
    assert isinstance(root, mi.StructType)
    visit("", root)
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _doc(cls: type) -> str:
    doc = inspect.getdoc(cls)
    if not doc or doc == inspect.getdoc(msgspec.Struct) or cls.__doc__ is None:
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def reference() -> str:
    comments = field_comments(SOURCE.read_text(encoding="utf-8"))
    lines = [
        "## Every field",
        "",
        "Generated from `proxy/config.py`: types, bounds and defaults as the loader checks "
        "them, and the comment on each field. `NAME` is a key you choose (a system, cluster "
        "or identity name); `[]` is each item of a list. Durations are seconds.",
        "",
    ]
    for path, struct in sections():
        cls = struct.cls
        title = f"`{path}`" if path else "Top level"
        lines += [f"### {title}", ""]
        doc = _doc(cls)
        if doc:
            lines += [doc, ""]
        lines += ["| field | type | default | what |", "|---|---|---|---|"]
        for field in struct.fields:
            what = comments.get((cls.__name__, field.name), "")
            inner = [suffix for suffix, _ in _structs(field.type)]
            if inner:
                where = f"{path}.{field.encode_name}{inner[0]}".lstrip(".")
                what = f"{what} See `{where}` below.".strip()
            lines.append(
                f"| `{field.encode_name}` | {_cell(type_name(field.type))} | "
                f"{_cell(_default(field))} | {_cell(what)} |"
            )
        lines.append("")
    return "\n".join(lines)


def render(current: str | None = None) -> str:
    """The whole page: the hand-written part of ``current`` (the file as it is) up to and
    including ``MARKER``, then the generated reference."""
    if current is not None and MARKER in current:
        head = current.split(MARKER, 1)[0]
    elif current:
        head = current.rstrip("\n") + "\n\n"
    else:
        head = "# Configuration\n\n"
    return f"{head}{MARKER}\n\n{reference()}"
