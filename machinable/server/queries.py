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
    Column,
    and_,
    bindparam,
    false,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql import operators

from machinable.catalog.engine import get_engine, sqlite_path
from machinable.catalog.models import Availability, Location, Remote, Run
from machinable.catalog.query import as_expr, compile_expr, order_clause
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


def _conditions(project: ServedProject, where: str | None) -> list[Any]:
    dialect = get_engine(project.index_url).dialect.name
    conditions: list[Any] = []
    if project.scope is not None:
        conditions.append(RUNS.c.project == project.scope)
    expr = as_expr(where) if where else None
    if expr is not None:
        conditions.append(compile_expr(expr, dialect))
    return conditions


def count_runs(project: ServedProject, where: str | None = None) -> int:
    if not has_index(project):
        return 0
    conditions = _conditions(project, where)
    statement = select(func.count()).select_from(RUNS)
    if conditions:
        statement = statement.where(and_(*conditions))
    with get_engine(project.index_url).connect() as conn:
        return int(conn.execute(statement).scalar() or 0)


def list_runs(
    project: ServedProject,
    where: str | None,
    order_by: str | None,
    limit: int,
    offset: int,
    after: str | None = None,
) -> tuple[list[dict[str, Any]], int, str | None]:
    """One page of runs (as RUN objects), the number of all matching runs, and the
    cursor of the next page (None after the last).

    ``after`` (a cursor from the previous page) continues where that page ended with a
    keyset condition on the sort keys, so a page deep in the result costs what the
    first one does; ``offset`` skips rows, which costs more the further it goes.
    """
    if not has_index(project):
        return [], 0, None
    engine = get_engine(project.index_url)
    dialect = engine.dialect.name
    conditions = _conditions(project, where)
    keys = _keys(order_clause(order_by, dialect))
    statement = select(*COLUMNS, *(expr.label(f"_k{i}") for i, (expr, _) in enumerate(keys)))
    statement = statement.order_by(*(expr.desc() if desc else expr.asc() for expr, desc in keys))
    counting = select(func.count()).select_from(RUNS)
    if conditions:
        counting = counting.where(and_(*conditions))
    page_conditions = list(conditions)
    if after is not None:
        values = _decode_cursor(after, where, order_by, len(keys))
        page_conditions.append(_beyond(keys, values, dialect))
    if page_conditions:
        statement = statement.where(and_(*page_conditions))
    statement = statement.limit(limit).offset(offset)
    with engine.connect() as conn:
        rows = conn.execute(statement).mappings().all()
        if after is None and offset == 0 and len(rows) < limit:
            total = len(rows)
        else:
            total = int(conn.execute(counting).scalar() or 0)
        copies = _copies(conn, [row["uuid"] for row in rows])
    cursor = None
    if rows and len(rows) == limit:
        cursor = _encode_cursor(where, order_by, [rows[-1][f"_k{i}"] for i in range(len(keys))])
    return [_run(row, copies.get(row["uuid"], [])) for row in rows], total, cursor


def _keys(clauses: list[Any]) -> list[tuple[Any, bool]]:
    """(expression, descending) of each ORDER BY clause (uuid last, as order_clause adds it)."""
    return [(clause.element, clause.modifier is operators.desc_op) for clause in clauses]


def _bind(expr: Any, value: Any, dialect: str) -> Any:
    if dialect == "postgresql" and not isinstance(expr, Column):
        return literal(value, JSONB)  # a config or predicate path: compare as jsonb
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


# One run and its copies: built once (building a statement costs more than running it).
_RUN = select(*COLUMNS).where(RUNS.c.uuid == bindparam("uuid"))
_SCOPED_RUN = _RUN.where(RUNS.c.project == bindparam("project"))
_COPIES = (
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
    .where(LOCATIONS.c.run_uuid == bindparam("uuid"))
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
        .where(AVAILABILITY.c.run_uuid == bindparam("uuid"))
    )
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
    found: dict[str, list[dict[str, Any]]] = {}
    if not uuids:
        return found
    for run_uuid, directory in conn.execute(
        select(LOCATIONS.c.run_uuid, LOCATIONS.c.directory)
        .where(LOCATIONS.c.run_uuid.in_(uuids))
        .order_by(LOCATIONS.c.id)
    ):
        present = os.path.isfile(os.path.join(directory, SENTINEL))
        found.setdefault(run_uuid, []).append(
            {
                "store": "local",
                "url": directory,
                "state": "present" if present else "evicted",
                "size": None,
                "checksum": None,
                "verified_at": None,
            }
        )
    for run_uuid, name, url, state, size, checksum, verified in conn.execute(
        select(
            AVAILABILITY.c.run_uuid,
            REMOTES.c.name,
            REMOTES.c.url,
            AVAILABILITY.c.state,
            AVAILABILITY.c.size,
            AVAILABILITY.c.checksum,
            AVAILABILITY.c.verified_at,
        )
        .join(REMOTES, REMOTES.c.id == AVAILABILITY.c.remote_id)
        .where(AVAILABILITY.c.run_uuid.in_(uuids))
        .order_by(AVAILABILITY.c.id)
    ):
        found.setdefault(run_uuid, []).append(
            {
                "store": name,
                "url": url,
                "state": state,
                "size": size,
                "checksum": checksum,
                "verified_at": _time(verified),
            }
        )
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
