"""The configuration's fields as users look them up (dotted path, type, value and the doc line) and set
them (:func:`coerce_value` reads a ``--set`` string or a JSON value as the field's type).

Each field of the config dataclasses (:mod:`pof3d.config`) is documented where it is defined, by a
``#:`` comment after it on its line or on the lines just above it (the attribute-comment form Sphinx's
autodoc reads); plain ``#`` comments are section headings and notes, not field docs. This module reads
those comments back from the source, so ``python -m pof3d.train --list-fields`` and the ``--set`` error
messages show the same text as the code. It works on any dataclass of section dataclasses, so it does not
import :mod:`pof3d.config` (which uses it for its error messages).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import math
import re
import shutil
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any

from pof3d.errors import ConfigError

DOC_MARK = "#:"


@dataclass(frozen=True)
class FieldInfo:
    """One config field: ``section.name``, its declared type, its value in the config described, its doc."""

    path: str
    type: str
    value: Any
    doc: str


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field name: doc}`` from the ``#:`` comments of dataclass ``cls``'s source ('' when undocumented)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, tuple[str, bool]] = {}  # line -> (doc text, whether the comment is the whole line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith(DOC_MARK):
            alone = not tok.line[: tok.start[1]].strip()
            comments[tok.start[0]] = (tok.string[len(DOC_MARK) :].strip(), alone)
    lines = source.splitlines()
    docs = {}
    for f in dataclasses.fields(cls):
        pattern = re.compile(rf"^\s+{re.escape(f.name)}\s*:")
        row = next((i + 1 for i, text in enumerate(lines) if pattern.match(text)), None)
        if row is None:
            docs[f.name] = ""
            continue
        above = []
        i = row - 1
        while i in comments and comments[i][1]:
            above.insert(0, comments[i][0])
            i -= 1
        trailing = comments.get(row)
        parts = above + ([trailing[0]] if trailing and not trailing[1] else [])
        docs[f.name] = " ".join(parts)
    return docs


def type_name(kind: Any) -> str:
    """``float``, ``bool``, ``tuple[float, float, float]``: the declared type as users write values."""
    if typing.get_origin(kind) is tuple:
        return f"tuple[{', '.join(type_name(a) for a in typing.get_args(kind))}]"
    return getattr(kind, "__name__", str(kind))


def section_names(cfg: Any) -> list[str]:
    """The sections of a config: its fields that are dataclasses themselves."""
    return [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]


def section_fields(cfg: Any, section: str) -> list[FieldInfo]:
    """The fields of one section of ``cfg``, in definition order, with ``cfg``'s values."""
    if section not in section_names(cfg):
        raise ConfigError(
            f"unknown config section {section!r}; expected one of {', '.join(section_names(cfg))}"
        )
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    docs = field_docs(type(obj))
    return [
        FieldInfo(f"{section}.{f.name}", type_name(hints[f.name]), getattr(obj, f.name), docs[f.name])
        for f in dataclasses.fields(obj)
    ]


def config_fields(cfg: Any, section: str | None = None) -> list[FieldInfo]:
    """Every field of ``cfg`` (or of one section), section by section."""
    sections = [section] if section else section_names(cfg)
    return [info for name in sections for info in section_fields(cfg, name)]


def valid_fields(cfg: Any, section: str) -> str:
    """The tail of an unknown-field error: the section's fields and where their docs are."""
    names = ", ".join(info.path.split(".", 1)[1] for info in section_fields(cfg, section))
    return (
        f"valid fields of {section}: {names} (`python -m pof3d.train --list-fields {section}` describes them)"
    )


def format_fields(fields: list[FieldInfo], width: int | None = None) -> str:
    """One row per field: path, type, value, doc; columns aligned, the doc wrapped to ``width`` columns
    (the terminal's by default) under its own column."""
    rows = [(f.path, f.type, _value_text(f.value), f.doc) for f in fields]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    indent = sum(widths) + 6
    width = width or shutil.get_terminal_size((120, 24)).columns
    out = []
    for path, kind, value, doc in rows:
        head = f"{path:<{widths[0]}}  {kind:<{widths[1]}}  {value:<{widths[2]}}  "
        lines = textwrap.wrap(doc, max(width - indent, 40)) or [""]
        out.append((head + lines[0]).rstrip())
        out.extend(" " * indent + line for line in lines[1:])
    return "\n".join(out)


def _value_text(value: Any) -> str:
    """Values as ``--set`` takes them: true/false, 1,2,3 for tuples, '' shown as ""."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(_value_text(v) for v in value)
    return '""' if value == "" else str(value)


def coerce_value(value: Any, kind: Any, where: str) -> Any:
    """Turn a JSON value or a ``--set`` string into a field's declared type; ``where`` names the field."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        args = typing.get_args(kind)
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(coerce_value(v, a, where) for v, a in zip(value, args, strict=True))
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected a boolean (true/false), got {value!r}")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from exc
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from exc
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if kind is str:
        return str(value)
    raise ConfigError(f"{where}: unsupported field type {kind!r}")
