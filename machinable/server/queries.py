"""The reads the server makes: run pages, counts, one run with its copies.

Each request opens its index (the process-wide engine of its URL) and reads rows; the
server keeps nothing between requests, so runs launched meanwhile show up at once.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    false,
    literal,
    literal_column,
    null,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql import operators
from sqlalchemy.sql.functions import FunctionElement

from machinable.catalog.engine import get_engine, sqlite_path
from machinable.catalog.models import Availability, Location, Remote, Run
from machinable.catalog.query import (
    Expr,
    Plan,
    as_expr,
    count_statement,
    dense_probe,
    first_order_numbers,
    plan,
)
from machinable.catalog.rows import aware
from machinable.errors import QueryError
from machinable.record import SENTINEL
from machinable.server.config import ServedProject

RUNS = Run.__table__
LOCATIONS = Location.__table__
AVAILABILITY = Availability.__table__
REMOTES = Remote.__table__
TIMES = ("created_at", "started_at", "finished_at")
# The digest column arrives with the trust work (issue 10); until then it reads as null.
DIGEST = RUNS.c.get("digest")
COLUMNS = [
    RUNS.c.uuid,
    RUNS.c.module,
    RUNS.c.config,
    RUNS.c.version,
    RUNS.c.predicate,
    RUNS.c.status,
    *(RUNS.c[name] for name in TIMES),
    *([DIGEST] if DIGEST is not None else []),
]


@functools.lru_cache(maxsize=1024)
def _index_file(url: str) -> Path | None:
    return sqlite_path(url)


def has_index(project: ServedProject) -> bool:
    """False for a project whose own SQLite index was never created (the server never creates one)."""
    path = _index_file(project.index_url)
    return path is None or path.is_file()


def _search(project: ServedProject, where: str | None) -> tuple[list[Any], Expr | None]:
    """Column conditions (the served project) and the parsed ``where``."""
    conditions: list[Any] = []
    if project.scope is not None:
        conditions.append(RUNS.c.project == project.scope)
    return conditions, (as_expr(where) if where else None)


def _order_specs(order_by: str | None) -> list[str]:
    return [part.strip() for part in (order_by or "").split(",") if part.strip()]


def count_runs(project: ServedProject, where: str | None = None) -> int:
    if not has_index(project):
        return 0
    engine = get_engine(project.index_url)
    conditions, expr = _search(project, where)
    with engine.connect() as conn:
        return int(conn.execute(count_statement(expr, conditions, engine.dialect.name)).scalar() or 0)


def list_runs(
    project: ServedProject,
    where: str | None,
    order_by: str | None,
    limit: int,
    offset: int,
    after: str | None = None,
    with_count: bool = True,
) -> tuple[list[dict[str, Any]], int | None, str | None]:
    """One page of runs (as RUN objects), the number of all matching runs (None unless
    ``with_count``), and the cursor of the next page (None after the last).

    The search is the catalog's own (``catalog.query.plan``: config filters and orders
    read the leaves index), so a page lists what ``machinable ls`` lists, in its order.
    ``after`` (a cursor from the previous page) continues where that page ended with a
    keyset condition on the sort keys, so a page deep in the result costs what the
    first one does; ``offset`` skips rows, which costs more the further it goes.
    """
    if not has_index(project):
        return [], 0 if with_count else None, None
    engine = get_engine(project.index_url)
    dialect = engine.dialect.name
    conditions, expr = _search(project, where)
    specs = _order_specs(order_by)
    with engine.connect() as conn:
        dense = dense_probe(conn)
        # An ascending order by a config path starts with the runs holding a number
        # there: walk those along the leaves index first, and plan (and sort) the whole
        # order only when they do not fill the page (as Index.search does). The walk's
        # keys are the whole order's without the kind's rank (0: a number).
        numbers = plan(expr, conditions, specs, dialect, dense, numbers_only=True) if first_order_numbers(expr, specs) else None
        full = None if numbers is not None else plan(expr, conditions, specs, dialect, dense)
        size = len(numbers.order) + 1 if numbers is not None else len(full.order)  # type: ignore[union-attr]
        values = _decode_cursor(after, where, order_by, size) if after is not None else None
        rows: list[Any] = []
        if numbers is not None and (values is None or values[0] == 0):
            start = None if values is None else values[1:]
            rows = _page_rows(conn, numbers, _keys(numbers.order), start, limit, offset, dialect)
            rows = [[row, [0, *key]] for row, key in rows]
        if len(rows) < limit:
            full = full or plan(expr, conditions, specs, dialect, dense)
            rows = _page_rows(conn, full, _keys(full.order), values, limit, offset, dialect)
        total: int | None = None
        if with_count:
            if after is None and offset == 0 and len(rows) < limit:
                total = len(rows)
            else:
                total = int(conn.execute(count_statement(expr, conditions, dialect)).scalar() or 0)
        copies = _copies(conn, [row["uuid"] for row, _ in rows])
    cursor = None
    if rows and len(rows) == limit:
        cursor = _encode_cursor(where, order_by, rows[-1][1])
    return [_run(row, copies.get(row["uuid"], [])) for row, _ in rows], total, cursor


def _page_rows(
    conn: Any, compiled: Plan, keys: list[tuple[Any, bool]], values: list[Any] | None, limit: int, offset: int, dialect: str
) -> list[Any]:
    """(row, sort-key values) of one page of ``compiled``, after ``values`` when given."""
    where = list(compiled.where)
    if values is not None:
        where.append(_beyond(keys, values, dialect))
    # Two steps, as Index.search takes them: the page's uuids and sort keys (read off
    # indexes where the database can, however many rows tie on the first key), then
    # the rows of that page alone.
    statement = (
        select(RUNS.c.uuid, *(expr.label(f"_k{i}") for i, (expr, _) in enumerate(keys)))
        .select_from(compiled.source)
        .where(*where)
        .order_by(*compiled.order)
        .limit(limit)
        .offset(offset)
    )
    page = [(uuid, list(values)) for uuid, *values in conn.execute(statement)]
    if not page:
        return []
    found = {row["uuid"]: row for row in conn.execute(_ROWS, {"uuids": [uuid for uuid, _ in page]}).mappings()}
    return [[found[uuid], values] for uuid, values in page if uuid in found]


def _keys(clauses: list[Any]) -> list[tuple[Any, bool]]:
    """(expression, descending) of each ORDER BY clause."""
    return [(clause.element, clause.modifier is operators.desc_op) for clause in clauses]


def _bind(expr: Any, value: Any, dialect: str) -> Any:
    if dialect == "postgresql" and isinstance(expr, FunctionElement) and expr.name.startswith("jsonb_"):
        return literal(value, JSONB)  # a path the leaves do not hold: compared as jsonb
    return value


def _same(expr: Any, value: Any, dialect: str) -> Any:
    return expr.is_(None) if value is None else expr == _bind(expr, value, dialect)


def _past(expr: Any, descending: bool, value: Any, dialect: str) -> Any:
    """Rows that sort after ``value`` on this key. NULLs sort first on SQLite and last on
    PostgreSQL (ascending), the other way round descending."""
    nulls_first = (dialect == "sqlite") != descending
    if value is None:
        return expr.is_not(None) if nulls_first else false()
    beyond = expr < _bind(expr, value, dialect) if descending else expr > _bind(expr, value, dialect)
    return beyond if nulls_first else or_(beyond, expr.is_(None))


def _beyond(keys: list[tuple[Any, bool]], values: list[Any], dialect: str) -> Any:
    options = []
    for i, (expr, descending) in enumerate(keys):
        equal = [_same(keys[j][0], values[j], dialect) for j in range(i)]
        options.append(and_(*equal, _past(expr, descending, values[i], dialect)))
    return or_(*options)


def _cursor_value(value: Any) -> Any:
    return {"t": aware(value).isoformat()} if isinstance(value, datetime) else value  # type: ignore[union-attr]


def _encode_cursor(where: str | None, order_by: str | None, values: list[Any]) -> str:
    data = json.dumps({"w": where or "", "o": order_by or "", "v": [_cursor_value(v) for v in values]})
    return base64.urlsafe_b64encode(data.encode("utf-8")).decode("ascii").rstrip("=")


def _decode_cursor(cursor: str, where: str | None, order_by: str | None, size: int) -> list[Any]:
    """The sort-key values a cursor holds, checked against the request it continues."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        values = data["v"]
        matches = data["w"] == (where or "") and data["o"] == (order_by or "")
    except (ValueError, binascii.Error, KeyError, TypeError) as exc:
        raise QueryError("after: not a cursor from this API (use the 'next' of the previous page)") from exc
    if not matches:
        raise QueryError("after: the cursor belongs to another where/order_by; start again without it")
    if not isinstance(values, list) or len(values) != size:
        raise QueryError("after: not a cursor from this API (use the 'next' of the previous page)")
    decoded = []
    for value in values:
        if isinstance(value, dict) and set(value) == {"t"}:
            try:
                value = datetime.fromisoformat(str(value["t"]))
            except ValueError as exc:
                raise QueryError("after: the cursor holds an invalid time") from exc
        decoded.append(value)
    return decoded


_ROWS = select(*COLUMNS).where(RUNS.c.uuid.in_(bindparam("uuids", expanding=True)))
# One run and its copies: built once (building a statement costs more than running it).
_RUN = select(*COLUMNS).where(RUNS.c.uuid == bindparam("uuid"))
_SCOPED_RUN = _RUN.where(RUNS.c.project == bindparam("project"))


def _copies_of(local: Any, stored: Any) -> Any:
    """Local directories (kind 0) and store copies (kind 1) of the runs the two conditions
    pick, in one UNION (``position`` orders each kind as the index recorded it)."""
    return (
        select(
            LOCATIONS.c.run_uuid,
            literal_column("'local'").label("store"),
            LOCATIONS.c.directory.label("url"),
            null().label("state"),
            null().label("size"),
            null().label("checksum"),
            null().label("verified_at"),
            literal_column("0").label("kind"),
            LOCATIONS.c.id.label("position"),
        )
        .where(local)
        .union_all(
            select(
                AVAILABILITY.c.run_uuid,
                REMOTES.c.name,
                REMOTES.c.url,
                AVAILABILITY.c.state,
                AVAILABILITY.c.size,
                AVAILABILITY.c.checksum,
                AVAILABILITY.c.verified_at,
                literal_column("1"),
                AVAILABILITY.c.id,
            )
            .join(REMOTES, REMOTES.c.id == AVAILABILITY.c.remote_id)
            .where(stored)
        )
    )


_COPIES = _copies_of(LOCATIONS.c.run_uuid == bindparam("uuid"), AVAILABILITY.c.run_uuid == bindparam("uuid"))
_PAGE_COPIES = _copies_of(
    LOCATIONS.c.run_uuid.in_(bindparam("uuids", expanding=True)),
    AVAILABILITY.c.run_uuid.in_(bindparam("uuids", expanding=True)),
)


def get_run(project: ServedProject, uuid: str) -> dict[str, Any] | None:
    if not has_index(project) or not _looks_like_uuid(uuid):
        return None
    engine = get_engine(project.index_url)
    with engine.connect() as conn:
        if project.scope is not None:
            row = conn.execute(_SCOPED_RUN, {"uuid": uuid, "project": project.scope}).mappings().first()
        else:
            row = conn.execute(_RUN, {"uuid": uuid}).mappings().first()
        if row is None:
            return None
        copies = [
            _copy(store, url, state, size, checksum, verified, kind)
            for _, store, url, state, size, checksum, verified, kind, _ in sorted(
                conn.execute(_COPIES, {"uuid": uuid}), key=lambda r: (r[7], r[8])
            )
        ]
    return _run(row, copies)


def _copy(store: str, url: str, state: Any, size: Any, checksum: Any, verified: Any, kind: Any) -> dict[str, Any]:
    if int(kind) == 0:
        present = os.path.isfile(os.path.join(url, SENTINEL))
        return {"store": "local", "url": url, "state": "present" if present else "evicted",
                "size": None, "checksum": None, "verified_at": None}
    if isinstance(verified, str):  # SQLite hands back text through a UNION
        verified = datetime.fromisoformat(verified)
    return {"store": store, "url": url, "state": state, "size": size, "checksum": checksum,
            "verified_at": _time(verified)}


def run_directory(project: ServedProject, uuid: str) -> str | None:
    """The run's directory on this machine if one is present (it holds the sentinel)."""
    if not has_index(project) or not _looks_like_uuid(uuid):
        return None
    statement = (
        select(LOCATIONS.c.directory)
        .join(RUNS, RUNS.c.uuid == LOCATIONS.c.run_uuid)
        .where(LOCATIONS.c.run_uuid == uuid)
        .order_by(LOCATIONS.c.id)
    )
    if project.scope is not None:
        statement = statement.where(RUNS.c.project == project.scope)
    with get_engine(project.index_url).connect() as conn:
        directories = conn.execute(statement).scalars().all()
    for directory in directories:
        if os.path.isfile(os.path.join(directory, SENTINEL)):
            return directory
    return None


def _looks_like_uuid(text: str) -> bool:
    return 0 < len(text) <= 64 and text.isalnum()


def _copies(conn: Any, uuids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every copy of each of ``uuids`` (local directories first, then store copies), in
    one statement."""
    found: dict[str, list[dict[str, Any]]] = {}
    if not uuids:
        return found
    rows = conn.execute(_PAGE_COPIES, {"uuids": uuids}).all()
    for run_uuid, store, url, state, size, checksum, verified, kind, _ in sorted(rows, key=lambda r: (r[7], r[8])):
        found.setdefault(run_uuid, []).append(_copy(store, url, state, size, checksum, verified, kind))
    return found


def _time(value: datetime | None) -> str | None:
    value = aware(value)
    return value.isoformat() if value is not None else None


def _run(row: Any, copies: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "uuid": row["uuid"],
        "module": row["module"],
        "config": row["config"],
        "version": row["version"],
        "predicate": row["predicate"],
        "status": row["status"],
        "created_at": _time(row["created_at"]),
        "started_at": _time(row["started_at"]),
        "finished_at": _time(row["finished_at"]),
        "digest": row["digest"] if DIGEST is not None else None,
        "copies": copies,
    }
