"""The reads the server makes: run pages, counts, one run with its copies.

Each request opens its index (the process-wide engine of its URL) and reads rows; the
server keeps nothing between requests, so runs launched meanwhile show up at once.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, select

from machinable.catalog.engine import get_engine, sqlite_path
from machinable.catalog.index import aware
from machinable.catalog.models import Availability, Location, Remote, Run
from machinable.catalog.query import as_expr, compile_expr, order_clause
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


def has_index(project: ServedProject) -> bool:
    """False for a project whose own SQLite index was never created (the server never creates one)."""
    path = sqlite_path(project.index_url)
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
    project: ServedProject, where: str | None, order_by: str | None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """One page of runs (as RUN objects) and the number of all matching runs."""
    if not has_index(project):
        return [], 0
    engine = get_engine(project.index_url)
    conditions = _conditions(project, where)
    order = order_clause(order_by, engine.dialect.name)
    statement = select(*COLUMNS).order_by(*order).limit(limit).offset(offset)
    counting = select(func.count()).select_from(RUNS)
    if conditions:
        statement = statement.where(and_(*conditions))
        counting = counting.where(and_(*conditions))
    with engine.connect() as conn:
        rows = conn.execute(statement).mappings().all()
        if offset == 0 and len(rows) < limit:
            total = len(rows)
        else:
            total = int(conn.execute(counting).scalar() or 0)
        copies = _copies(conn, [row["uuid"] for row in rows])
    return [_run(row, copies.get(row["uuid"], [])) for row in rows], total


def get_run(project: ServedProject, uuid: str) -> dict[str, Any] | None:
    if not has_index(project) or not _looks_like_uuid(uuid):
        return None
    engine = get_engine(project.index_url)
    statement = select(*COLUMNS).where(RUNS.c.uuid == uuid)
    if project.scope is not None:
        statement = statement.where(RUNS.c.project == project.scope)
    with engine.connect() as conn:
        row = conn.execute(statement).mappings().first()
        if row is None:
            return None
        copies = _copies(conn, [uuid])
    return _run(row, copies.get(uuid, []))


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
