"""A small TOML writer for configs: tables of strings, numbers, booleans and lists of those.

The standard library reads TOML (tomllib) but does not write it; configs are plain enough that a
few lines do, and every output is checked by reading it back with tomllib in the tests.
"""

from __future__ import annotations

import json
import math
from typing import Any


def toml_value(value: Any) -> str:
    """One value as TOML: strings quoted and escaped, floats exact (repr), lists inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON's escapes (\" \\ \n \t \uXXXX) are valid in TOML basic strings; DEL is not raw.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def dumps(doc: dict[str, Any], header: str = "") -> str:
    """A TOML document: top-level values first, then one ``[table]`` per nested dict."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    if lines:
        lines.append("")
    _write_table(doc, [], lines)
    return "\n".join(lines).rstrip() + "\n"


def _write_table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if path and (scalars or not tables):
        lines.append(f"[{'.'.join(_key(p) for p in path)}]")
    lines.extend(f"{_key(k)} = {toml_value(v)}" for k, v in scalars.items())
    if path and (scalars or not tables):
        lines.append("")
    for name, sub in tables.items():
        _write_table(sub, [*path, name], lines)


def _key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else json.dumps(key)
