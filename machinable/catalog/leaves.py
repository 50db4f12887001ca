"""Config and predicate values as typed rows, so that any path filters through an index.

Every value inside a run's ``config`` and ``predicate`` becomes one row of the
``leaves`` table: ``(run_uuid, path, kind, number, text, scope)``, where ``path`` is the
field as searches name it (``config.optimizer.name``). Numbers go to ``number`` (compared
as numbers), strings to ``text`` (compared as strings), booleans, nulls, objects and
lists only have a ``kind``. ``scope`` is a 64-bit hash of the run's (project, module), so
a search within one module is answered from the leaves alone. An index on
``(path, kind, number, text, scope, run_uuid)`` answers an equality or range filter on
any path, and an order by it, without the user declaring anything.

What is not a row, and therefore answered from the JSON columns instead (correct, but a
scan): values inside lists, keys that are not identifiers, paths longer than
``MAX_PATH`` characters. ``text`` holds the first ``MAX_TEXT`` characters of a string,
which decides every comparison with a shorter string exactly; a longer comparison value
is answered from the JSON columns too. Query and write side share ``leaf_path``.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Any

NUMBER, STRING, TRUE, FALSE, NULL, OBJECT, ARRAY = "n", "s", "t", "f", "z", "o", "a"
MAX_PATH = 255
MAX_TEXT = 500
# Integers beyond 2**53 do not survive a double: such comparison values use the JSON columns.
MAX_EXACT = 2**53
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
COLUMNS = ("config", "predicate")


def leaf_path(column: str, path: tuple[str, ...]) -> str | None:
    """The ``leaves.path`` of a field, or None when the field has no rows of its own."""
    if column not in COLUMNS or not path or not all(_IDENTIFIER.match(part) for part in path):
        return None
    name = column + "." + ".".join(path)
    return name if len(name) <= MAX_PATH else None


@lru_cache(maxsize=4096)
def scope_key(project: str, module: str) -> int:
    """A signed 64-bit hash of (project, module): the ``leaves.scope`` of their runs."""
    digest = hashlib.sha256(f"{project}\x00{module}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def leaf_rows(uuid: str, project: str, module: str, config: Any, predicate: Any) -> list[dict[str, Any]]:
    """The ``leaves`` rows of one run."""
    rows: list[dict[str, Any]] = []
    scope = scope_key(project, module)
    for column, value in (("config", config), ("predicate", predicate)):
        if isinstance(value, dict):
            _walk(uuid, scope, column, value, rows)
    return rows


def _walk(uuid: str, scope: int, prefix: str, mapping: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    for key, value in mapping.items():
        path = _child(prefix, key)
        if path is None:
            continue
        number = text = None
        if value is None:
            kind = NULL
        elif value is True:
            kind = TRUE
        elif value is False:
            kind = FALSE
        elif isinstance(value, (int, float)):
            kind, number = NUMBER, _double(value)
        elif isinstance(value, str):
            kind, text = STRING, value[:MAX_TEXT]
        elif isinstance(value, dict):
            kind = OBJECT
        elif isinstance(value, list):
            kind = ARRAY
        else:  # not a JSON value: nothing to search
            continue
        rows.append({"run_uuid": uuid, "path": path, "kind": kind, "number": number, "text": text, "scope": scope})
        if kind == OBJECT:
            _walk(uuid, scope, path, value, rows)


_CHILDREN: dict[tuple[str, str], str | None] = {}


def _child(prefix: str, key: Any) -> str | None:
    """``prefix.key``, or None when ``key`` is no identifier or the path is too long
    (memoised: a sweep repeats the same few keys in every run)."""
    found = _CHILDREN.get((prefix, key), False) if isinstance(key, str) else None
    if found is False:
        path = prefix + "." + key
        found = path if _IDENTIFIER.match(key) and len(path) <= MAX_PATH else None
        if len(_CHILDREN) < 100_000:
            _CHILDREN[(prefix, key)] = found
    return found  # type: ignore[return-value]


def _double(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond any double still orders beyond every one
        return float("inf") if value > 0 else float("-inf")


__all__ = ["leaf_path", "leaf_rows", "scope_key", "MAX_TEXT", "MAX_EXACT"]
