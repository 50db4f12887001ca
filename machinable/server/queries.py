"""The reads the server makes: run pages, counts, one run with its copies.

Each request opens its index (the process-wide engine of its URL) and reads rows; the
server keeps nothing between requests, so runs launched meanwhile show up at once.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Integer,
    Text,
    and_,
    bindparam,
    case,
    cast,
    false,
    func,
    literal_column,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.functions import FunctionElement

from machinable.catalog.engine import get_engine, sqlite_path
from machinable.catalog.models import Availability, Location, Remote, Run
from machinable.catalog.query import (
    Expr,
    Plan,
    as_expr,
    count_statement,
    dense_probe,
    directories_column,
    first_order_numbers,
    json_rows,
    order_keys,
    page_select,
    plan,
    remembered,
    values_before_numbers,
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
JSON_FIELDS = ("config", "version", "predicate")


def _columns(dialect: str) -> list[Any]:
    """The columns of a RUN object but its copies. The JSON columns are read as their
    stored text and passed through to the answer undecoded (decoding and encoding them
    again was most of a page's time on PostgreSQL). PostgreSQL writes the whole object
    itself, as one text (``_HEAD``): one column per run through the driver, not ten."""
    if dialect == "postgresql":
        fields = ["uuid", "module", *JSON_FIELDS, "status", *TIMES, "digest"]
        pairs = [part for name in fields for part in (literal_column(f"'{name}'"), RUNS.c[name])]
        return [cast(func.json_build_object(*pairs), Text).label("run_head")]
    raw = [_json_text(RUNS.c[name], dialect).label(name) for name in JSON_FIELDS]
    return [RUNS.c.uuid, RUNS.c.module, *raw, RUNS.c.status, *(RUNS.c[name] for name in TIMES), RUNS.c.digest]


def _json_text(column: Any, dialect: str) -> Any:
    """A JSON column's text, safe to splice into an answer: PostgreSQL writes jsonb's text
    itself; a SQLite file may come from elsewhere and hold anything in a JSON column, so
    text that is not one valid JSON value is sent as a JSON string instead (it could
    otherwise close the object it stands in and add keys of its own)."""
    if dialect == "postgresql":
        return cast(column, Text)
    text = type_coerce(column, Text)
    return type_coerce(case((func.json_valid(text) == 1, text), else_=func.json_quote(text)), Text)


# A row of ``_columns`` then ``_copy_columns`` (a page's sort keys follow): on SQLite,
(_UUID, _MODULE, _CONFIG, _VERSION, _PREDICATE, _STATUS, _CREATED, _STARTED, _FINISHED, _DIGEST,
 _LOCAL, _STORED) = range(12)
# on PostgreSQL
_HEAD, _PG_LOCAL, _PG_STORED = range(3)


def _keys_at(dialect: str) -> int:
    """Where a row's sort keys start."""
    return _PG_STORED + 1 if dialect == "postgresql" else _STORED + 1


def _render(dialect: str) -> Any:
    """The function that writes a RUN object from a row of this dialect."""
    return _run_head if dialect == "postgresql" else _run


def _read(engine: Any) -> Any:
    """A connection for reads. On PostgreSQL without a transaction: BEGIN and ROLLBACK
    were two of a run detail's four round trips. (Each statement then sees its own
    snapshot: a page and its total, two statements, can differ by a run launched
    between them, as two requests can.)"""
    conn = engine.connect()
    if engine.dialect.name == "postgresql":
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
    return conn


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
    with _read(engine) as conn:
        return int(conn.execute(count_statement(expr, conditions, engine.dialect.name)).scalar() or 0)


def list_runs(
    project: ServedProject,
    where: str | None,
    order_by: str | None,
    limit: int,
    offset: int,
    after: str | None = None,
    with_count: bool = True,
) -> tuple[list[str], int | None, str | None]:
    """One page of runs (RUN objects as JSON text, see ``page_json``), the number of all matching runs (None unless
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
    search = (project.index_url, project.scope, where, order_by)
    with _read(engine) as conn:
        dense = dense_probe(conn)

        def built(numbers: bool) -> _Built:
            def make() -> _Built:
                compiled = _plan(project, where, order_by, dialect, dense, numbers)
                if compiled is None or not numbers:
                    return _Built(compiled)
                conditions, expr = _search(project, where)
                return _Built(compiled, before=values_before_numbers(expr, conditions, _order_specs(order_by), dialect))

            return remembered(_BUILT, (*search, numbers), make, 512)

        # An order by a config path starts with the runs holding a number there (when
        # descending, unless a run of the search holds a string, boolean, list or object
        # there): walk those along the leaves index first, and plan (and sort) the whole
        # order only when they do not fill the page (as Index.search does). The walk's
        # keys are the whole order's without the kind's rank (0: a number).
        numbers = built(numbers=True)
        if numbers.plan is not None:  # the walk's keys lack the whole order's first (the rank)
            size = len(numbers.plan.order) + 1
        else:
            size = len(built(numbers=False).plan.order)  # type: ignore[union-attr]
        values = _decode_cursor(after, where, order_by, size) if after is not None else None
        rows: list[Any] = []
        walk = numbers.plan is not None and (values is None or values[0] == 0)
        if walk and values is None and numbers.before is not None:
            walk = conn.execute(numbers.before).first() is None  # else the page starts before the numbers
        if walk:
            start = None if values is None else values[1:]
            rows = [[row, [0, *key]] for row, key in _page_rows(conn, numbers, start, limit, offset, dialect)]
        if len(rows) < limit:
            rows = _page_rows(conn, built(numbers=False), values, limit, offset, dialect)
        total: int | None = None
        if with_count:
            if after is None and offset == 0 and len(rows) < limit:
                total = len(rows)
            else:
                conditions, expr = _search(project, where)
                total = int(conn.execute(count_statement(expr, conditions, dialect)).scalar() or 0)
    cursor = None
    if rows and len(rows) == limit:
        cursor = _encode_cursor(where, order_by, rows[-1][1])
    render = _render(dialect)
    return [render(row) for row, _ in rows], total, cursor


# Plans and their page statements, by index, project, where and order_by (statements
# also by cursor shape), kept as long as the dense probes they were built on: building
# a page's statement cost about as much as running it (2 ms), and a client paging
# through a result, or several looking at the same view, asks for the same one again.
_BUILT: dict[Any, tuple[float, Any]] = {}


@dataclass
class _Built:
    plan: Plan | None
    statements: dict[Any, Any] = dataclasses.field(default_factory=dict)  # by cursor shape
    # of a numbers walk in descending order: finds a value that sorts before the numbers
    before: Any = None


def _plan(
    project: ServedProject, where: str | None, order_by: str | None, dialect: str, dense: Any, numbers: bool = False
) -> Plan | None:
    """The catalog's plan of this search; with ``numbers``, of its start along the first
    order path's numbers (None when the order does not start that way)."""
    conditions, expr = _search(project, where)
    specs = _order_specs(order_by)
    if numbers and not first_order_numbers(expr, specs):
        return None
    return plan(expr, conditions, specs, dialect, dense, numbers_only=numbers)


def _page_rows(
    conn: Any, built: _Built, values: list[Any] | None, limit: int, offset: int, dialect: str
) -> list[Any]:
    """(row, sort-key values) of one page of ``built.plan``, after ``values`` when given."""
    shape = None if values is None else tuple(value is None for value in values)
    statement = built.statements.get(shape)
    if statement is None:
        statement = built.statements[shape] = _page_statement(built.plan, shape, dialect)  # type: ignore[arg-type]
    params: dict[str, Any] = {"page_limit": limit, "page_offset": offset}
    for i, value in enumerate(values or ()):
        if value is not None:
            params[f"after_{i}"] = value
    keys = _keys_at(dialect)
    return [[row, list(row[keys:])] for row in conn.execute(statement, params).all()]


def _page_statement(compiled: Plan, shape: tuple[bool, ...] | None, dialect: str) -> Any:
    """A page of ``compiled`` (RUN columns and copies, then the sort keys) with bound
    limit, offset and, for a cursor whose values are NULL where ``shape`` says, the
    cursor's values (``after_<i>``)."""
    keys = order_keys(compiled)
    where = []
    if shape is not None:
        never_null = [_never_null(expr, compiled) for expr, _ in keys]
        where.append(_beyond(keys, shape, dialect, never_null))
        first, descending = keys[0]
        if not shape[0] and (never_null[0] or (dialect == "sqlite") != descending):
            # Implied by the condition above, but a range the database can seek: the
            # page starts at the cursor instead of walking the order's index from its
            # start (a page at the end of 100,000 runs took 40 ms, not 4).
            bound = _param(first, 0, dialect)
            where.append(first <= bound if descending else first >= bound)
    limit, offset = bindparam("page_limit", type_=Integer), bindparam("page_offset", type_=Integer)
    return page_select(compiled, [*_columns(dialect), *_copy_columns(dialect)], limit, offset, where)


def _param(expr: Any, i: int, dialect: str) -> Any:
    """The cursor's value of sort key ``i``, bound as the key's type."""
    if dialect == "postgresql" and isinstance(expr, FunctionElement) and expr.name.startswith("jsonb_"):
        return bindparam(f"after_{i}", type_=JSONB)  # a path the leaves do not hold: compared as jsonb
    return bindparam(f"after_{i}", type_=expr.type)


def _never_null(expr: Any, compiled: Plan) -> bool:
    """Is this sort key never NULL: a NOT NULL column, or a leaf value the plan pins?"""
    return getattr(expr, "nullable", True) is False or any(expr is known for known in compiled.not_null)


def _past(expr: Any, descending: bool, i: int, null: bool, dialect: str, never_null: bool) -> Any:
    """Rows that sort after the cursor's value of key ``i`` (``null``: it is NULL). NULLs
    sort first on SQLite and last on PostgreSQL (ascending), the other way descending."""
    nulls_first = (dialect == "sqlite") != descending
    if null:
        return expr.is_not(None) if nulls_first else false()
    value = _param(expr, i, dialect)
    beyond = expr < value if descending else expr > value
    return beyond if nulls_first or never_null else or_(beyond, expr.is_(None))


def _beyond(keys: list[tuple[Any, bool]], shape: tuple[bool, ...], dialect: str, never_null: list[bool]) -> Any:
    options = []
    for i, (expr, descending) in enumerate(keys):
        equal = [keys[j][0].is_(None) if shape[j] else keys[j][0] == _param(keys[j][0], j, dialect) for j in range(i)]
        options.append(and_(*equal, _past(expr, descending, i, shape[i], dialect, never_null[i])))
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


def _copy_columns(dialect: str) -> list[Any]:
    """Every copy of the run of the enclosing row, as two JSON arrays: its local
    directories ``[id, directory]`` and its store copies ``[id, store, url, state, size,
    checksum, verified_at]``, each in the order the index recorded them (``id``). Read
    in the run's own statement, they cost no round trip of their own."""
    stored = (
        select(
            json_rows(
                dialect, AVAILABILITY.c.id, REMOTES.c.name, REMOTES.c.url, AVAILABILITY.c.state,
                AVAILABILITY.c.size, AVAILABILITY.c.checksum, AVAILABILITY.c.verified_at,
            )
        )
        .select_from(AVAILABILITY.join(REMOTES, REMOTES.c.id == AVAILABILITY.c.remote_id))
        .where(AVAILABILITY.c.run_uuid == RUNS.c.uuid)
    )
    return [directories_column(dialect), stored.scalar_subquery().label("store_copies")]


def _copies(local: str | None, stored: str | None) -> str:
    """The copies ``_copy_columns`` read, as a JSON list: local directories first, then
    store copies. (Written as text: a page renders 100 of these, and building dicts to
    encode them was most of a page's time in Python.)"""
    found = []
    if local and local != "[]":
        directories = json.loads(local)
        if len(directories) > 1:
            directories.sort()
        found = [_local_copy(directory) for _, directory in directories]
    if stored and stored != "[]":
        items = json.loads(stored)
        items.sort(key=lambda item: item[0])
        found += [_copy(*item[1:]) for item in items]
    return f"[{', '.join(found)}]"


@dataclass(frozen=True)
class _Statements:
    run: Any  # one run with its copies (uuid)
    scoped_run: Any  # the same within one project (uuid, project)


@functools.cache
def _statements(dialect: str) -> _Statements:
    """The server's fixed statements, built once per dialect (building a statement
    costs more than running it)."""
    run = select(*_columns(dialect), *_copy_columns(dialect)).where(RUNS.c.uuid == bindparam("uuid"))
    return _Statements(run=run, scoped_run=run.where(RUNS.c.project == bindparam("project")))


def get_run(project: ServedProject, uuid: str) -> str | None:
    """One RUN object as JSON text, or None when the project has no such run."""
    if not has_index(project) or not _looks_like_uuid(uuid):
        return None
    engine = get_engine(project.index_url)
    statements = _statements(engine.dialect.name)
    with _read(engine) as conn:
        if project.scope is not None:
            row = conn.execute(statements.scoped_run, {"uuid": uuid, "project": project.scope}).first()
        else:
            row = conn.execute(statements.run, {"uuid": uuid}).first()
    return None if row is None else _render(engine.dialect.name)(row)


def _local_copy(directory: str) -> str:
    state = "present" if os.path.isfile(os.path.join(directory, SENTINEL)) else "evicted"
    return (f'{{"store": "local", "url": {_QUOTE(directory)}, "state": "{state}", "size": null, '
            '"checksum": null, "verified_at": null}')


def _copy(store: str, url: str, state: Any, size: Any, checksum: Any, verified: Any) -> str:
    if isinstance(verified, str):  # a time inside JSON
        verified = datetime.fromisoformat(verified)
    return _ENCODE({"store": store, "url": url, "state": state, "size": size, "checksum": checksum,
                    "verified_at": _time(verified)})


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
    with _read(get_engine(project.index_url)) as conn:
        directories = conn.execute(statement).scalars().all()
    for directory in directories:
        if os.path.isfile(os.path.join(directory, SENTINEL)):
            return directory
    return None


def _looks_like_uuid(text: str) -> bool:
    return 0 < len(text) <= 64 and text.isalnum()


def _time(value: datetime | None) -> str | None:
    value = aware(value)
    return value.isoformat() if value is not None else None


def _string(value: str | None) -> str:
    return "null" if value is None else _QUOTE(value)


def _run(row: Any) -> str:
    """A RUN object as JSON text, from a row of ``_columns`` and ``_copy_columns``: the
    config, version and predicate spliced in as the index stores them."""
    created, started, finished = (_string(_time(row[i])) for i in (_CREATED, _STARTED, _FINISHED))
    return (
        f'{{"uuid": {_QUOTE(row[_UUID])}, "module": {_QUOTE(row[_MODULE])}, "config": {row[_CONFIG] or "null"}, '
        f'"version": {row[_VERSION] or "null"}, "predicate": {row[_PREDICATE] or "null"}, '
        f'"status": {_string(row[_STATUS])}, "created_at": {created}, "started_at": {started}, '
        f'"finished_at": {finished}, "digest": {_string(row[_DIGEST])}, '
        f'"copies": {_copies(row[_LOCAL], row[_STORED])}}}'
    )


def _run_head(row: Any) -> str:
    """A RUN object as JSON text, from a PostgreSQL row: the object PostgreSQL wrote
    (``_columns``), with the copies added."""
    head = row[_HEAD]
    return f'{head[:-1]}, "copies": {_copies(row[_PG_LOCAL], row[_PG_STORED])}}}'


_QUOTE = json.encoder.encode_basestring  # a JSON string, as JSONEncoder(ensure_ascii=False) writes it
_ENCODE = json.JSONEncoder(ensure_ascii=False).encode


def page_json(runs: list[str], total: int | None, limit: int, offset: int, cursor: str | None) -> bytes:
    """The answer of a runs request: the RUN objects of ``list_runs`` and the paging."""
    rest = _ENCODE({"count": total, "limit": limit, "offset": offset, "next": cursor})
    return f'{{"runs": [{", ".join(runs)}], {rest[1:]}'.encode()
