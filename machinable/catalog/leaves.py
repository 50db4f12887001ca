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


LEAF_COLUMNS = ("run_uuid", "path", "kind", "number", "text", "scope")


def leaf_rows(uuid: str, project: str, module: str, config: Any, predicate: Any) -> list[dict[str, Any]]:
    """The ``leaves`` rows of one run."""
    return [dict(zip(LEAF_COLUMNS, leaf, strict=True)) for leaf in leaf_tuples(uuid, project, module, config, predicate)]


def leaf_tuples(uuid: str, project: str, module: str, config: Any, predicate: Any) -> list[tuple[Any, ...]]:
    """The ``leaves`` rows of one run as tuples in ``LEAF_COLUMNS`` order, by path."""
    rows: list[tuple[Any, ...]] = []
    scope = scope_key(project, module)
    for column, value in (("config", config), ("predicate", predicate)):
        if isinstance(value, dict):
            _walk(uuid, scope, column, value, rows)
    return rows


def _walk(uuid: str, scope: int, prefix: str, mapping: dict[str, Any], rows: list[tuple[Any, ...]]) -> None:
    for key, value in mapping.items():
        path = _child(prefix, key)
        if path is None:
            continue
        if value is None:
            rows.append((uuid, path, NULL, None, None, scope))
        elif value is True:
            rows.append((uuid, path, TRUE, None, None, scope))
        elif value is False:
            rows.append((uuid, path, FALSE, None, None, scope))
        elif isinstance(value, (int, float)):
            rows.append((uuid, path, NUMBER, _double(value), None, scope))
        elif isinstance(value, str):
            rows.append((uuid, path, STRING, None, value[:MAX_TEXT], scope))
        elif isinstance(value, dict):
            rows.append((uuid, path, OBJECT, None, None, scope))
            _walk(uuid, scope, path, value, rows)
        elif isinstance(value, list):
            rows.append((uuid, path, ARRAY, None, None, scope))
        # anything else is not a JSON value: nothing to search


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


# Bulk loads build the leaves inside the database from the stored JSON (a few statements
# per batch instead of twenty inserted rows per run), for the runs whose JSON text the
# database reads exactly as ``leaf_tuples`` reads it (``sql_exact``): identifier keys, no escape sequence
# (so every character is one ASCII byte, and no string holds a quote, a control
# character or a surrogate) and numbers of at most 15 significant digits with a small
# exponent, which SQLite parses to the same double as Python (one correctly
# rounded division by an exact power of ten). Every other run gets its rows from
# ``leaf_tuples``, and so does every run with a key that is no identifier (and every run
# on PostgreSQL, see ``leaf_sql``). The SQL skips
# paths longer than MAX_PATH (and their subtrees), as ``_walk`` does.
_IDENTIFIER_KEY = re.compile(r'"[A-Za-z_][A-Za-z0-9_]*":')
_EXPONENT = re.compile(r"e[-+]0*(?:[6-9]|[1-9][0-9])")  # beyond +-5 (floats print as 1e-05)
# Digits and the point to "0", every other byte to " ".
_DIGIT_TABLE = bytes(ord("0") if chr(c) in "0123456789." else ord(" ") for c in range(256))


def sql_exact(*texts: str) -> bool:
    """May the leaves of a run whose config and predicate are stored as ``texts`` (the
    engine's compact, ASCII-only JSON) be built by ``leaf_sql``?

    No escape sequence (so no quote, control character or surrogate in any string or
    key), every key an identifier, no run of 15 digits or more with a point (a number
    with more significant digits than a double parses alike everywhere; a false alarm in
    a string only costs speed) and no exponent beyond +-5.
    """
    for text in texts:
        if "\\" in text:
            return False
        if ("e-" in text or "e+" in text) and _EXPONENT.search(text):
            return False
        # Without escapes no string holds a quote, so '":' ends a key and nothing else.
        if text.count('":') != len(_IDENTIFIER_KEY.findall(text)):
            return False
        if b"0" * 16 in text.encode("ascii", "replace").translate(_DIGIT_TABLE):
            return False
    return True


def sql_shape(config: str, predicate: str) -> tuple[bool, bool]:
    """(has a predicate, has a nested object) of a run whose leaves ``leaf_sql`` builds."""
    return predicate != "{}", '":{' in config or '":{' in predicate


@lru_cache(maxsize=1)
def leaf_sql() -> dict[str, str]:
    """SQLite INSERTs that build the leaves of the runs named by the parameter ``batch``
    (a JSON array of ``[uuid, scope]``, runs already in the ``runs`` table, each passing
    ``sql_exact``): ``config`` and ``predicate`` the top-level values of that column,
    ``nested`` the members of objects at any depth (only for runs that have objects).

    (PostgreSQL takes Python's rows through COPY faster than it expands jsonb.)
    """
    runs = "json_each(:batch) AS b JOIN runs AS r ON r.uuid = b.value ->> 0"
    kind = (
        f"CASE j.type WHEN 'integer' THEN '{NUMBER}' WHEN 'real' THEN '{NUMBER}' WHEN 'text' THEN '{STRING}' "
        f"WHEN 'true' THEN '{TRUE}' WHEN 'false' THEN '{FALSE}' WHEN 'null' THEN '{NULL}' "
        f"WHEN 'object' THEN '{OBJECT}' ELSE '{ARRAY}' END"
    )
    values = (
        f"{kind}, CASE WHEN j.type IN ('integer', 'real') THEN j.value END, "
        f"CASE WHEN j.type = 'text' THEN substr(j.value, 1, {MAX_TEXT}) END"
    )
    insert = "INSERT INTO leaves (run_uuid, path, kind, number, text, scope)"
    statements = {
        column: f"{insert} SELECT r.uuid, '{column}.' || j.key, {values}, b.value ->> 1 FROM {runs} "
        f"JOIN json_each(r.{column}) AS j WHERE length(j.key) <= {MAX_PATH - len(column) - 1}"
        for column in COLUMNS
    }
    # Objects (at any depth, within the path limit), then one row per member of each.
    top = " UNION ALL ".join(
        f"SELECT r.uuid, b.value ->> 1, '{column}.' || j.key, j.value FROM {runs} JOIN json_each(r.{column}) AS j "
        f"WHERE j.type = 'object' AND length(j.key) <= {MAX_PATH - len(column) - 1}"
        for column in COLUMNS
    )
    statements["nested"] = (
        f"WITH RECURSIVE objects(uuid, scope, path, value) AS ({top} UNION ALL "
        "SELECT o.uuid, o.scope, o.path || '.' || j.key, j.value FROM objects AS o JOIN json_each(o.value) AS j "
        f"WHERE j.type = 'object' AND length(o.path) + 1 + length(j.key) <= {MAX_PATH}) "
        f"{insert} SELECT o.uuid, o.path || '.' || j.key, {values}, o.scope FROM objects AS o "
        f"JOIN json_each(o.value) AS j WHERE length(o.path) + 1 + length(j.key) <= {MAX_PATH}"
    )
    return statements


__all__ = [
    "LEAF_COLUMNS",
    "leaf_path",
    "leaf_rows",
    "leaf_tuples",
    "leaf_sql",
    "sql_exact",
    "sql_shape",
    "scope_key",
    "MAX_TEXT",
    "MAX_EXACT",
]
