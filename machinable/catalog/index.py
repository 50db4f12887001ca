"""The ``Index`` facade: look up runs, record them, rebuild from directories.

The index is a cache of the record directories. Every row can be rebuilt with
``reindex()``, which reads headers only and never imports user code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Engine,
    Text,
    and_,
    bindparam,
    cast,
    delete,
    false,
    func,
    literal_column,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from machinable.catalog.engine import RawWrite, get_engine, retry_busy, sqlite_path, to_url
from machinable.catalog.leaves import LEAF_COLUMNS, leaf_sql, leaf_tuples, scope_key
from machinable.catalog.models import Availability, Leaf, Location, Run
from machinable.catalog.query import (
    SORT_PASSING,
    TIME_COLUMNS,
    And,
    Expr,
    Field,
    Plan,
    as_expr,
    check_field,
    compile_expr,
    count_statement,
    dense_probe,
    directories_column,
    first_order_numbers,
    json_value,
    leaf_uuid_page,
    order_keys,
    page_select,
    plan,
    remembered,
    values_before_numbers,
)
from machinable.catalog.rows import (
    IDENTITY_KEYS,
    ReindexReport,
    RunRecord,
    aware,
    prepare_row,
    read_markers,
    row_values,
    scan_names,
)
from machinable.context import Context, innermost
from machinable.errors import IdentityCollision, IndexError_, QueryError, ReindexRefused
from machinable.progress import track
from machinable.record import SENTINEL, is_uuid, read_record
from machinable.redact import redact
from machinable.settings import index_setting, kill_point

RUNS = Run.__table__
LOCATIONS = Location.__table__
LEAVES = Leaf.__table__
PAGE_SIZE = 1000
# Writes of at least this many runs at once are followed by ANALYZE on PostgreSQL.
ANALYZE_AFTER = 1000
SCAN_CHUNK = 2000
# Reindex commits the runs it has read every this many (memory holds one batch).
WRITE_BATCH = 20_000
PARALLEL_SCAN_MIN = 20_000
RUN_COLUMNS = tuple(c.name for c in RUNS.c)
LOCATION_COLUMNS = ("run_uuid", "storage", "directory")
# Foreign keys a PostgreSQL bulk load drops for its batch and puts back (models.py names).
_BULK_FOREIGN_KEYS = (("leaves", "fk_leaves_run_uuid_runs"), ("locations", "fk_locations_run_uuid_runs"))
_STATEMENTS: dict[tuple[str, str], Any] = {}
_WRITABLE: dict[str, Engine] = {}


def _bind(row: dict[str, Any], processors: list[Any], positional: bool) -> Any:
    """A row's parameters for a driver statement, through the columns' bind processors
    (a key the row lacks binds NULL, as SQLAlchemy's INSERT leaves it out)."""
    values = [(key, process(row.get(key)) if process else row.get(key)) for key, process in processors]
    return [value for _, value in values] if positional else dict(values)


def _scope(project: str | None, module: str | None) -> int | None:
    """The leaves' scope key of a search within one project and module, else None."""
    return scope_key(project, module) if project is not None and module is not None else None


@dataclass(frozen=True)
class Defaults:
    """Where an ``Index()`` without a URL lives and which storage ``reindex()`` reads.

    Both depend on the connected project, which the catalog does not know: the
    user-API layer (``machinable.storage``) installs them with ``set_defaults``.
    """

    index_path: Callable[[], Path]
    storage_directory: Callable[[], Path]


_defaults = Defaults(
    index_path=lambda: Path(os.getcwd()) / ".machinable.sqlite",
    storage_directory=lambda: Path(os.getcwd()) / "storage",
)


def set_defaults(defaults: Defaults) -> None:
    """Install how the default index file and storage directory are found."""
    global _defaults
    _defaults = defaults


def _create_leaf_indexes(conn: Any) -> None:
    """Build the leaves' indexes that are missing (a bulk load drops them)."""
    for index in sorted(LEAVES.indexes, key=lambda index: index.name):
        index.create(conn, checkfirst=True)


def _foreign_key_valid(conn: Any, table: str, name: str) -> bool | None:
    """PostgreSQL: is this foreign key validated (None: it is not there)?"""
    return conn.execute(
        text("SELECT convalidated FROM pg_constraint WHERE conname = :name AND conrelid = CAST(:table AS regclass)"),
        {"name": name, "table": table},
    ).scalar()


@functools.cache
def _record_columns(dialect: str) -> list[Any]:
    """What a ``RunRecord`` is read from (see ``_record``): the ``runs`` columns in their
    order, then the run's directories. SQLite's times come as their text, which
    ``datetime.fromisoformat`` reads ten times faster than SQLAlchemy's own parsing (a
    page of 100 runs has 500 of them)."""
    columns = [
        type_coerce(column, Text).label(column.name) if dialect == "sqlite" and column.name in TIME_COLUMNS else column
        for column in RUNS.c
    ]
    return [*columns, directories_column(dialect)]


def _record(row: Any) -> RunRecord:
    """The ``RunRecord`` of a row of ``_record_columns`` (sort keys may follow)."""
    return _run_record(row[: len(RUN_COLUMNS)], json.loads(row[len(RUN_COLUMNS)] or "[]"))


def _run_record(columns: Any, located: list[Any]) -> RunRecord:
    """A ``RunRecord`` from the ``runs`` columns in their order (times as datetimes or
    ISO text) and the run's ``[id, directory]`` pairs."""
    values = dict(zip(RUN_COLUMNS, columns, strict=True))
    for key in TIME_COLUMNS:
        value = values[key]
        values[key] = aware(datetime.fromisoformat(value) if isinstance(value, str) else value)
    return RunRecord(**values, directories=tuple(directory for _, directory in sorted(located)))


def _as_one_json(statement: Any, compiled: Plan) -> Any:
    """The rows of a PostgreSQL page (``page_select`` of ``_record_columns``) as the text of
    one JSON array, in the page's order. Decoding five JSON values and 17 columns per row
    through the driver was most of a page's time; one ``json.loads`` of the page is not."""
    rows = statement.subquery("rows")
    values = [rows.c[column.name] for column in RUNS.c]
    values.append(cast(rows.c.run_directories, JSON))
    order = [
        rows.c[f"_k{i}"].desc() if descending else rows.c[f"_k{i}"].asc()
        for i, (_, descending) in enumerate(order_keys(compiled))
    ]
    built = func.json_build_array(*values)
    return select(cast(func.json_agg(postgresql.aggregate_order_by(built, *order) if order else built), Text))


def _json_record(item: list[Any]) -> RunRecord:
    """The ``RunRecord`` of one element of ``_as_one_json``'s array."""
    return _run_record(item[: len(RUN_COLUMNS)], item[len(RUN_COLUMNS)] or [])


@dataclass
class _Recipe:
    """The statements of one search: the page off the leaves when few runs pass
    (``leaves``), else a check for values that sort before numbers (``before``), the page
    walked along the numbers (``numbers``) and the page of the whole order (``whole``)."""

    leaves: Any = None
    before: Any = None
    numbers: Any = None
    whole: Any = None


_RECIPES: dict[Any, tuple[float, Any]] = {}


def _search_key(url: str, where: Any, project: Any, module: Any, predicate: Any, order_by: Any, limit: Any, offset: int) -> Any:
    """A key for a search's ``_Recipe``, or None when its arguments cannot be one."""
    try:
        if isinstance(where, dict):
            where = ("dict", json.dumps(where, sort_keys=True))
        predicate = json.dumps(predicate, sort_keys=True) if predicate else None
    except (TypeError, ValueError):
        return None
    if isinstance(order_by, list):
        order_by = ("list", *order_by)
    if isinstance(where, Expr):
        # by its repr, not by equality: True == 1 in Python, not in a search
        where = ("expr", repr(where))
    key = (url, where, project, module, predicate, order_by, limit, offset)
    try:
        hash(key)
    except TypeError:  # an expression holding a list
        return None
    return key


@functools.cache
def _find_statement(dialect: str) -> Any:
    return select(*_record_columns(dialect)).where(RUNS.c.uuid == bindparam("uuid"))


class Index(Context):
    """The catalog of runs: a SQLite file by default, any SQLAlchemy URL otherwise."""

    #: True for catalogs that cannot record runs (a remote catalog server)
    read_only: bool = False
    #: URL schemes served by Index subclasses (``http`` -> catalog.remote.RemoteIndex)
    _schemes: dict[str, type[Index]] = {}

    def __new__(cls, spec: str | os.PathLike[str] | None = None) -> Index:
        if cls is Index and spec is not None:
            scheme = os.fspath(spec).partition("://")[0].lower()
            kind = Index._schemes.get(scheme) if "://" in os.fspath(spec) else None
            if kind is not None:
                return super().__new__(kind)
        return super().__new__(cls)

    @classmethod
    def register_scheme(cls, scheme: str, kind: type[Index]) -> None:
        """Let ``Index(url)`` with this URL scheme make a ``kind`` (without an import cycle)."""
        Index._schemes[scheme] = kind

    def __init__(self, spec: str | os.PathLike[str] | None = None):
        self.url = to_url(spec) if spec is not None else None

    def __repr__(self) -> str:
        return f"Index({redact(self.resolved_url)!r})"

    @classmethod
    def get(cls) -> Index:
        """The index of the current context: ``with Index(...)``, MACHINABLE_INDEX, or the project's."""
        found = innermost(Index)
        if found is not None:
            return found
        setting = index_setting()
        if setting:
            return Index(setting)
        return Index(_defaults.index_path())

    @property
    def resolved_url(self) -> str:
        return self.url or to_url(_defaults.index_path())

    @property
    def engine(self) -> Engine:
        return get_engine(self.resolved_url)

    @property
    def path(self) -> Path | None:
        """The SQLite file, or None for a server index."""
        return sqlite_path(self.resolved_url)

    def check_writable(self) -> None:
        """Raise ``IndexError_`` unless the index accepts writes (once per engine).

        ``launch()`` asks before computing: a read-only index (a file without write
        permission, a read-only database role) would otherwise refuse the run's row
        after the whole computation.
        """
        engine = self.engine
        if _WRITABLE.get(self.resolved_url) is engine:
            return

        def probe() -> None:
            # Writes nothing, but needs the write lock (SQLite) or write permission and
            # a read-write transaction (PostgreSQL), exactly as recording a run does.
            with engine.execution_options(machinable_write=True).begin() as conn:
                conn.execute(delete(RUNS).where(false()))

        try:
            retry_busy(probe)
        except IndexError_ as exc:
            raise IndexError_(
                f"the index {redact(self.resolved_url)} does not accept writes, so nothing can be "
                f"launched into it ({exc}); use a writable index (MACHINABLE_INDEX) or read only",
                url=self.resolved_url,
            ) from exc
        _WRITABLE[self.resolved_url] = engine

    # Lookups.

    def status(self, uuid: str) -> str | None:
        """The indexed status of a run, or None if the index does not hold it."""
        # On the driver's cursor: every launch asks this first, and SQLAlchemy's
        # statement machinery costs ten times the lookup itself.
        engine = self.engine
        mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        statement = f"SELECT status FROM runs WHERE uuid = {mark}"
        connection = engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                cursor.execute(statement, (uuid,))
                row = cursor.fetchone()
            except engine.dialect.loaded_dbapi.Error as exc:
                raise DBAPIError.instance(
                    statement, (uuid,), exc, engine.dialect.loaded_dbapi.Error, dialect=engine.dialect
                ) from exc
            finally:
                cursor.close()
        finally:
            connection.close()
        return None if row is None else row[0]

    # Search indexes: expression indexes on config/predicate paths users filter by.

    def add_search_index(self, field: str) -> str:
        """Index a config or predicate path (``"config.lr"``) so filters on it use an index.

        Returns the index name. Idempotent. These indexes live outside the migrations
        (named ``ix_search_*``); ``drop_search_index`` removes one.
        """
        name, expression = self._search_index(field)
        # Rendered by hand rather than as an sqlalchemy Index, which would attach itself
        # to the models' metadata and show up as schema drift.
        sql = f'CREATE INDEX IF NOT EXISTS "{name}" ON runs (({expression.compile(dialect=self.engine.dialect)}))'

        def write() -> None:
            with self.engine.execution_options(machinable_write=True).begin() as conn:
                conn.exec_driver_sql(sql)

        retry_busy(write)
        return name

    def drop_search_index(self, field: str) -> None:
        name, _ = self._search_index(field)

        def write() -> None:
            with self.engine.execution_options(machinable_write=True).begin() as conn:
                conn.exec_driver_sql(f'DROP INDEX IF EXISTS "{name}"')

        retry_busy(write)

    def search_indexes(self) -> list[str]:
        """Names of the search indexes this index has."""
        if self.dialect == "sqlite":
            query = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'runs'"
        else:
            query = "SELECT indexname FROM pg_indexes WHERE tablename = 'runs' AND schemaname = current_schema()"
        with self.engine.connect() as conn:
            names = conn.execute(text(query)).scalars().all()
        return sorted(name for name in names if name.startswith("ix_search_"))

    def _search_index(self, field: str) -> tuple[str, Any]:
        column, path = check_field(field)
        if not path:
            raise QueryError(f"{field!r}: search indexes are for config.<path> or predicate.<path>")
        name = f"ix_search_{column}_{'_'.join(path)}"
        if len(name) > 60:
            name = name[:48] + "_" + hashlib.sha256(field.encode()).hexdigest()[:10]
        return name, json_value(literal_column(column), path, self.dialect)

    def has_copy(self, uuid: str) -> bool:
        """Does the run's data exist: a local directory that is present, or a present store copy?"""
        if self.local_directory(uuid) is not None:
            return True
        table = Availability.__table__
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(table.c.id).where(table.c.run_uuid == uuid, table.c.state == "present").limit(1)
                ).first()
                is not None
            )

    def find(self, uuid: str) -> RunRecord | None:
        """The indexed run with this uuid, or None."""
        statement = _find_statement(self.dialect)
        with self.engine.connect() as conn:
            row = conn.execute(statement, {"uuid": uuid}).first()
        return None if row is None else _record(row)

    def local_directory(self, uuid: str) -> Path | None:
        """The run's directory on this machine if it is present, else None."""
        with self.engine.connect() as conn:
            dirs = conn.execute(
                select(LOCATIONS.c.directory).where(LOCATIONS.c.run_uuid == uuid).order_by(LOCATIONS.c.id)
            ).scalars().all()
        for directory in dirs:
            if os.path.isfile(os.path.join(directory, SENTINEL)):
                return Path(directory)
        return None

    def _filter(
        self,
        where: Any = None,
        project: str | None = None,
        module: str | None = None,
        predicate: dict[str, Any] | None = None,
    ) -> tuple[list[Any], Expr | None]:
        """Column conditions (project, module) and the search expression (scope and where)."""
        conditions = []
        if project is not None:
            conditions.append(RUNS.c.project == project)
        if module is not None:
            conditions.append(RUNS.c.module == module)
        items = [Field(f"predicate.{key}") == value for key, value in (predicate or {}).items()]
        expr = as_expr(where)
        if expr is not None:
            items.append(expr)
        if not items:
            return conditions, None
        return conditions, items[0] if len(items) == 1 else And(tuple(items))

    def _conditions(
        self,
        where: Any = None,
        project: str | None = None,
        module: str | None = None,
        predicate: dict[str, Any] | None = None,
    ) -> list[Any]:
        conditions, expr = self._filter(where, project, module, predicate)
        if expr is not None:
            conditions.append(compile_expr(expr, self.dialect, _scope(project, module)))
        return conditions

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def runs(
        self,
        where: Any = None,
        *,
        project: str | None = None,
        module: str | None = None,
        predicate: dict[str, Any] | None = None,
        page_size: int | None = None,
    ) -> Iterator[RunRecord]:
        """Every matching run, fetched page by page (keyset on uuid): no silent cap."""
        conditions = self._conditions(where, project, module, predicate)
        page_size = page_size or PAGE_SIZE
        last = ""
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(*_record_columns(self.dialect))
                    .where(and_(RUNS.c.uuid > last, *conditions))
                    .order_by(RUNS.c.uuid)
                    .limit(page_size)
                ).all()
            if not rows:
                return
            yield from (_record(row) for row in rows)
            last = rows[-1][0]
            if len(rows) < page_size:
                return

    def check_query(
        self, where: Any = None, *, order_by: str | list[str] | None = None, limit: int | None = None, offset: int = 0
    ) -> None:
        """Raise QueryError for a search that could not run, without running it."""
        if limit is not None and (not isinstance(limit, int) or limit < 0) or not isinstance(offset, int) or offset < 0:
            raise QueryError("limit and offset must be whole numbers, not negative")
        expr = as_expr(where)
        plan(expr, [], order_by, self.dialect)

    def search(
        self,
        where: Any = None,
        *,
        project: str | None = None,
        module: str | None = None,
        predicate: dict[str, Any] | None = None,
        order_by: str | list[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[RunRecord]:
        """Runs matching ``where`` (an expression, a string like ``"config.lr > 0.1"``,
        or a dict of equalities), ordered, with limit and offset."""
        if limit is not None and limit < 0 or offset < 0:
            raise QueryError("limit and offset must not be negative")
        if limit is None and not offset and order_by is None:
            return list(self.runs(where, project=project, module=module, predicate=predicate))
        key = _search_key(self.resolved_url, where, project, module, predicate, order_by, limit, offset)
        with self.engine.connect() as conn:
            def make() -> _Recipe:
                return self._recipe(conn, where, project, module, predicate, order_by, limit, offset)

            # Built statements are kept as long as the dense probes they rest on: building
            # and compiling a page's statement cost 0.5 to 1.4 ms, as much as reading it.
            recipe = make() if key is None else remembered(_RECIPES, key, make, 512)
            if recipe.leaves is not None:
                return self._read_page(conn, recipe.leaves)
            records: list[RunRecord] = []
            if recipe.numbers is not None and (recipe.before is None or conn.execute(recipe.before).first() is None):
                records = self._read_page(conn, recipe.numbers)
            if limit is None or len(records) < limit:
                records = self._read_page(conn, recipe.whole)
            return records

    def _recipe(
        self,
        conn: Any,
        where: Any,
        project: str | None,
        module: str | None,
        predicate: dict[str, Any] | None,
        order_by: Any,
        limit: int | None,
        offset: int,
    ) -> _Recipe:
        """The statements of a search (see ``_Recipe``), chosen with ``conn``'s dense probes."""
        conditions, expr = self._filter(where, project, module, predicate)
        dense = dense_probe(conn) if limit is not None else None
        scope = _scope(project, module)
        recipe = _Recipe()
        by_leaves = leaf_uuid_page(expr, conditions, order_by, scope) if limit is not None else None
        if by_leaves is not None:
            if not dense_probe(conn, SORT_PASSING + 1)(by_leaves[0]):
                # few pass: sort their uuids off the leaves rather than probe run by run
                recipe.leaves = self._page_statement(by_leaves[1], limit, offset, uuid=LEAVES.c.run_uuid)
                return recipe
            # more than SORT_PASSING pass the one filter: the plan need not count again
            dense = lambda probe: True  # noqa: E731
        if limit is not None and first_order_numbers(expr, order_by):
            recipe.before = values_before_numbers(expr, conditions, order_by, self.dialect, scope)
            numbers = plan(expr, conditions, order_by, self.dialect, dense, scope, numbers_only=True)
            recipe.numbers = self._page_statement(numbers, limit, offset)
        recipe.whole = self._page_statement(plan(expr, conditions, order_by, self.dialect, dense, scope), limit, offset)
        return recipe

    def _page_statement(self, compiled: Plan, limit: int | None, offset: int, uuid: Any = RUNS.c.uuid) -> Any:
        """One page of ``compiled``, in its order, with the runs' directories: one
        statement (``page_select``; on PostgreSQL its rows as one JSON array)."""
        statement = page_select(compiled, _record_columns(self.dialect), limit, offset, uuid=uuid)
        return _as_one_json(statement, compiled) if self.dialect == "postgresql" else statement

    def _read_page(self, conn: Any, statement: Any) -> list[RunRecord]:
        if self.dialect == "postgresql":
            return [_json_record(item) for item in json.loads(conn.execute(statement).scalar() or "[]")]
        return [_record(row) for row in conn.execute(statement).all()]

    def count(
        self,
        where: Any = None,
        *,
        project: str | None = None,
        module: str | None = None,
        predicate: dict[str, Any] | None = None,
    ) -> int:
        """How many runs match, without loading any of them."""
        conditions, expr = self._filter(where, project, module, predicate)
        statement = count_statement(expr, conditions, self.dialect, _scope(project, module))
        with self.engine.connect() as conn:
            return int(conn.execute(statement).scalar() or 0)

    # Writes.

    def upsert(self, table: Any) -> Any:
        """An INSERT for ``table`` in this index's dialect, ready for ``on_conflict_*``."""
        return postgresql.insert(table) if self.dialect == "postgresql" else sqlite.insert(table)

    def _statement(self, name: str) -> Any:
        """Upsert statements, built once per dialect: building one costs more than a launch's
        whole database round trip."""
        key = (self.engine.dialect.name, name)
        stmt = _STATEMENTS.get(key)
        if stmt is None:
            if name == "upsert_runs":
                stmt = self.upsert(RUNS)
                # A row rebuilt from a directory carries no digest: keep the recorded one.
                stmt = stmt.on_conflict_do_update(
                    index_elements=[RUNS.c.uuid],
                    set_={
                        c.name: stmt.excluded[c.name]
                        if c.name != "digest"
                        else func.coalesce(stmt.excluded.digest, RUNS.c.digest)
                        for c in RUNS.c
                        if c.name != "uuid"
                    },
                )
            elif name == "add_locations":
                stmt = self.upsert(LOCATIONS).on_conflict_do_nothing(
                    index_elements=[LOCATIONS.c.run_uuid, LOCATIONS.c.directory]
                )
            else:
                stmt = self.upsert(LOCATIONS)
                stmt = stmt.on_conflict_do_update(
                    index_elements=[LOCATIONS.c.run_uuid, LOCATIONS.c.directory],
                    set_={"mtime_ns": stmt.excluded.mtime_ns, "storage": stmt.excluded.storage},
                )
            _STATEMENTS[key] = stmt
        return stmt

    def _driver_statement(self, tx: RawWrite, name: str, keys: tuple[str, ...]) -> tuple[str, list[Any], bool]:
        """An upsert of ``_statement`` as the driver's SQL text: ``(sql, bind processors of
        keys, positional)``, built once per dialect. The processors are the column types'
        own (JSON serializer, SQLite datetimes), so rows are stored as SQLAlchemy stores them."""
        dialect = tx.dialect
        cache_key = (f"{dialect.name}+{dialect.driver}", "driver:" + name)
        found = _STATEMENTS.get(cache_key)
        if found is None:
            compiled = self._statement(name).compile(dialect=dialect, column_keys=list(keys))
            order = list(compiled.positiontup or ()) if compiled.positional else list(keys)
            if sorted(order) != sorted(keys):
                raise AssertionError(f"{name}: compiled parameters {order} are not {keys}")
            table = RUNS if name == "upsert_runs" else LOCATIONS
            processors = [table.c[key].type.dialect_impl(dialect).bind_processor(dialect) for key in order]
            found = (compiled.string, list(zip(order, processors, strict=True)), compiled.positional)
            _STATEMENTS[cache_key] = found
        return found

    def _upsert_runs(self, conn: Any, rows: list[dict[str, Any]], fresh: bool = False) -> None:
        """Upsert run rows and replace their config leaves, in the caller's transaction.

        ``fresh``: the runs are known to be new (an empty index), so there are no old
        leaves to delete. ``conn`` is a SQLAlchemy connection, or a ``RawWrite`` (launch).
        """
        if not rows:
            return
        if isinstance(conn, RawWrite):
            self._upsert_runs_raw(conn, rows, fresh)
            return
        conn.execute(self._statement("upsert_runs"), rows)
        if not fresh:
            uuids = [row["uuid"] for row in rows]
            for start in range(0, len(uuids), 500):
                chunk = uuids[start : start + 500]
                conn.execute(delete(LEAVES).where(LEAVES.c.run_uuid.in_(chunk)) if len(chunk) > 1
                             else delete(LEAVES).where(LEAVES.c.run_uuid == chunk[0]))
        leaves = [
            leaf
            for row in rows
            for leaf in leaf_tuples(row["uuid"], row["project"], row["module"], row["config"], row["predicate"])
        ]
        if leaves:
            # Plain tuples through the driver: SQLAlchemy's per-parameter processing
            # costs more than the insert itself for a run's 20 leaves.
            mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
            conn.exec_driver_sql(
                f"INSERT INTO leaves ({', '.join(LEAF_COLUMNS)}) VALUES ({', '.join([mark] * len(LEAF_COLUMNS))})",
                leaves,
            )

    def _upsert_runs_raw(self, tx: RawWrite, rows: list[dict[str, Any]], fresh: bool) -> None:
        sql, processors, positional = self._driver_statement(tx, "upsert_runs", RUN_COLUMNS)
        params = [_bind(row, processors, positional) for row in rows]
        tx.execute(sql, params[0]) if len(params) == 1 else tx.execute(sql, params, many=True)
        if not fresh:
            tx.execute(f"DELETE FROM leaves WHERE run_uuid = {tx.mark}", [(row["uuid"],) for row in rows], many=True)
        leaves = [
            leaf
            for row in rows
            for leaf in leaf_tuples(row["uuid"], row["project"], row["module"], row["config"], row["predicate"])
        ]
        if leaves:
            marks = ", ".join([tx.mark] * len(LEAF_COLUMNS))
            tx.execute(f"INSERT INTO leaves ({', '.join(LEAF_COLUMNS)}) VALUES ({marks})", leaves, many=True)

    def _add_locations(self, conn: Any, rows: list[dict[str, Any]]) -> None:
        if isinstance(conn, RawWrite):
            sql, processors, positional = self._driver_statement(conn, "add_locations", LOCATION_COLUMNS)
            for row in rows:
                conn.execute(sql, _bind(row, processors, positional))
            return
        conn.execute(self._statement("add_locations"), rows)

    def _check_identity(self, conn: Any, rows: list[dict[str, Any]]) -> dict[str, str]:
        """Map uuid -> reason for rows whose identity disagrees with the stored row."""
        found: dict[str, str] = {}
        uuids = [row["uuid"] for row in rows]
        by_uuid = {row["uuid"]: row for row in rows}
        for start in range(0, len(uuids), 500):
            chunk = uuids[start : start + 500]
            existing = conn.execute(
                select(RUNS.c.uuid, *[RUNS.c[k] for k in IDENTITY_KEYS]).where(RUNS.c.uuid.in_(chunk))
            ).mappings()
            for old in existing:
                new = by_uuid[old["uuid"]]
                differing = [k for k in IDENTITY_KEYS if old[k] != new[k]]
                if differing:
                    found[old["uuid"]] = (
                        f"uuid {old['uuid']} is already indexed with a different "
                        f"{', '.join(differing)}"
                    )
        return found

    def add_run(self, row: dict[str, Any], directory: Path, storage: Path) -> None:
        """Write one run's row and its location (the launch path)."""

        engine = self.engine
        location = {"run_uuid": row["uuid"], "storage": str(storage), "directory": str(directory)}

        def write() -> None:
            with RawWrite(engine) as tx:
                self._upsert_runs(tx, [row])
                self._add_locations(tx, [location])

        retry_busy(write)

    def add_location(self, uuid: str, directory: Path) -> None:
        """Record that a run's directory is (again) present at ``directory``."""
        directory = Path(os.path.abspath(directory))

        def write() -> None:
            with self.engine.execution_options(machinable_write=True).begin() as conn:
                self._add_locations(
                    conn, [{"run_uuid": uuid, "storage": str(directory.parent), "directory": str(directory)}]
                )

        retry_busy(write)

    def drop_location(self, uuid: str, directory: Path) -> None:
        """Forget one local directory of a run (the run's row stays)."""

        def write() -> None:
            with self.engine.execution_options(machinable_write=True).begin() as conn:
                conn.execute(
                    delete(LOCATIONS).where(
                        LOCATIONS.c.run_uuid == uuid, LOCATIONS.c.directory == str(directory)
                    )
                )

        retry_busy(write)

    def digest(self, uuid: str) -> str | None:
        """The content digest the index recorded for a run, or None."""
        with self.engine.connect() as conn:
            return conn.execute(select(RUNS.c.digest).where(RUNS.c.uuid == uuid)).scalar()

    def set_digest(self, uuid: str, digest: str, *, only_if_unset: bool = False) -> None:
        """Record a run's content digest (``only_if_unset``: keep one already recorded)."""
        condition = [RUNS.c.uuid == uuid]
        if only_if_unset:
            condition.append(RUNS.c.digest.is_(None))

        def write() -> None:
            with self.engine.execution_options(machinable_write=True).begin() as conn:
                conn.execute(update(RUNS).where(*condition).values(digest=digest))

        retry_busy(write)

    def add_rows(self, rows: list[dict[str, Any]]) -> None:
        """Upsert run rows that have no local directory (known from a store)."""

        def write() -> None:
            with self.engine.execution_options(machinable_write=True).begin() as conn:
                # Into an empty index, every run is new: no old leaves to delete. (On
                # PostgreSQL the delete's cached plan, made while the table was small,
                # scans every leaf: 100,000 runs took over 15 minutes instead of 30 s.)
                fresh = conn.execute(select(RUNS.c.uuid).limit(1)).first() is None
                unique = list({row["uuid"]: row for row in rows}.values()) if fresh else rows
                for start in range(0, len(unique), 5000):
                    self._upsert_runs(conn, unique[start : start + 5000], fresh=fresh)

        retry_busy(write)
        self._analyze(len(rows))

    def _analyze(self, written: int) -> None:
        """After a bulk write, refresh the planner's statistics. PostgreSQL's planner that
        still believes the tables empty joins them by scanning one per row of the other;
        SQLite's, without statistics, takes any equality on an indexed column (``status =
        'finished'``) as selective and sorts every run it matches instead of walking the
        order's index and stopping at the limit (160 ms against 7 ms at 100,000 runs)."""
        if written < ANALYZE_AFTER:
            return
        if self.dialect == "sqlite":
            with self.engine.begin() as conn:  # about 0.2 s at 100,000 runs
                conn.exec_driver_sql("ANALYZE")
            return
        if self.dialect != "postgresql":
            return
        # VACUUM also marks the new pages all-visible, so that counts read the leaves
        # index alone instead of visiting each row.
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE) runs, leaves, locations")


    def ingest_directory(self, path: str | os.PathLike[str]) -> RunRecord:
        """Index one run directory where it lies; idempotent; refuses identity collisions."""
        directory = Path(os.path.abspath(path))
        header, model, names = read_record(directory)
        row = row_values(header, model, read_markers(directory, names))

        def write() -> None:
            with self.engine.execution_options(machinable_write=True).begin() as conn:
                collision = self._check_identity(conn, [row])
                if collision:
                    raise IdentityCollision(
                        f"{directory}: {collision[row['uuid']]}; nothing was changed",
                        uuid=row["uuid"],
                        path=directory,
                    )
                self._upsert_runs(conn, [row])
                self._add_locations(
                    conn,
                    [{"run_uuid": row["uuid"], "storage": str(directory.parent), "directory": str(directory)}],
                )

        retry_busy(write)
        found = self.find(row["uuid"])
        assert found is not None
        return found

    def reindex(
        self,
        storage: str | os.PathLike[str] | None = None,
        *,
        full: bool = False,
        progress: bool | None = None,
        allow_empty: bool = False,
    ) -> ReindexReport:
        """Bring the index in line with a storage directory's record directories.

        Directories whose mtime is unchanged since the last pass are not read again
        (every record write renames a file into its directory, which bumps the mtime);
        ``full=True`` reads every directory. Rows of directories that are gone are
        removed. Headers only are read; user code is never imported. Store availability
        is rebuilt by ``machinable.operations.reindex.reindex_stores``.

        A storage root that is missing or holds no run while the index lists runs there
        (an unmounted disk, a moved folder) is refused with ``ReindexRefused`` and
        nothing changes; ``allow_empty=True`` says the runs are really gone.
        """
        root = Path(storage) if storage is not None else _defaults.storage_directory()
        root = Path(os.path.abspath(root))
        report = ReindexReport(storage=str(root))
        known: dict[str, tuple[str, int | None]] = {}
        with self.engine.connect() as conn:
            if full:  # the directories are all read again: only how many the index lists
                known_count = int(
                    conn.execute(
                        select(func.count()).select_from(LOCATIONS).where(LOCATIONS.c.storage == str(root))
                    ).scalar()
                    or 0
                )
            else:
                known = {
                    directory: (run_uuid, mtime)
                    for directory, run_uuid, mtime in conn.execute(
                        select(LOCATIONS.c.directory, LOCATIONS.c.run_uuid, LOCATIONS.c.mtime_ns).where(
                            LOCATIONS.c.storage == str(root)
                        )
                    )
                }
                known_count = len(known)
        if storage is not None and not root.is_dir() and (root.exists() or not known_count):
            # A mistyped path must not reindex "clean"; a deleted storage the index still
            # lists is reindexed (its rows are dropped).
            what = "is not a directory" if root.exists() else "does not exist"
            raise FileNotFoundError(f"storage {root} {what}, and the index lists no runs there")
        # Rows are written in batches as the scan yields them, so memory holds one batch
        # (plus the set of uuids seen), not the whole storage. A storage of up to
        # WRITE_BATCH runs is one transaction (the old rows or the new, never a mix);
        # a larger one commits each batch with its runs' leaves and locations, and stale
        # rows go in the last, so a reindex stopped midway removes nothing and the next
        # one completes it.
        keep: set[str] = set()
        state: dict[str, bool] = {}
        unchanged: set[str] = set()
        # An index that is empty now is most likely still empty when the first batch is
        # written: then the scan workers serialise the rows ready for a bulk load, and
        # each batch is written as its parts arrive (one transaction per batch), so the
        # writes overlap the scan. (Checked again under the write lock; if another
        # writer came first, those directories are read again the usual way.)
        prepare = self.dialect if self._is_empty() else None

        def finish(conn: Any, last: bool) -> None:
            if self.dialect == "postgresql" and (last or state.get("unchecked") is conn):
                self._restore_foreign_keys(conn, validate=last)
            if last:
                report.unchanged = len(unchanged)
                # A directory that is present but skipped (corrupt, colliding) keeps
                # its row: the index may hold the only readable copy of its config.
                present = {os.path.basename(path) for path, _ in report.skipped}
                report.removed = self._drop_stale(conn, root, keep | unchanged | present)
                # The leaves index is built once, after the last bulk batch; a reindex
                # stopped between two batches leaves it to the next one (checkfirst).
                _create_leaf_indexes(conn)

        def write_batch(rows: list[Any], locations: list[dict[str, Any]], last: bool) -> None:
            with self.engine.execution_options(machinable_write=True).begin() as conn:
                self._write_batch(conn, root, rows, locations, unchanged, keep, state, report, prepare)
                finish(conn, last)

        batch: list[Any] = []
        batch_locations: list[dict[str, Any]] = []
        streamed = 0  # runs of the prepared batch being written
        stream: list[Any] = []  # [connection, transaction] of the prepared batch being written
        committed = 0  # batches committed before the last

        def stream_part(rows: list[Any], locations: list[dict[str, Any]]) -> None:
            if not stream:
                def begin() -> None:
                    conn = self.engine.execution_options(machinable_write=True).connect()
                    try:
                        stream[:] = [conn, conn.begin()]
                    except BaseException:
                        conn.close()
                        raise

                retry_busy(begin)  # waiting for the write lock is the only wait worth retrying
            conn = stream[0]
            retry_busy(
                lambda: self._write_batch(conn, root, rows, locations, unchanged, keep, state, report, prepare),
                attempts=1,
            )

        def end_stream(last: bool) -> None:
            if not stream:
                return
            conn, transaction = stream
            try:
                retry_busy(lambda: (finish(conn, last), transaction.commit()), attempts=1)
            finally:
                stream.clear()
                conn.close()

        try:
            for part_rows, part_locations, part_unchanged, part_skipped in self._scan(root, known, progress, prepare):
                unchanged.update(part_unchanged)
                report.skipped.extend(part_skipped)
                if prepare is not None:
                    if part_rows or part_locations:
                        stream_part(part_rows, part_locations)
                    streamed += len(part_rows)
                    if streamed >= WRITE_BATCH:
                        end_stream(False)
                        streamed = 0
                        committed += 1
                        kill_point("reindex-batch", committed)  # tests: die between two batches
                    continue
                batch.extend(part_rows)
                batch_locations.extend(part_locations)
                if len(batch) >= WRITE_BATCH:
                    retry_busy(functools.partial(write_batch, batch, batch_locations, False))
                    batch, batch_locations = [], []
                    committed += 1
                    kill_point("reindex-batch", committed)
            known = {}
            found = keep or batch or unchanged or any(is_uuid(os.path.basename(path)) for path, _ in report.skipped)
            if known_count and not found and not allow_empty:
                condition = "does not exist" if not os.path.lexists(root) else "holds no run directory"
                raise ReindexRefused(
                    f"{root} {condition}, but the index lists {known_count} run director"
                    f"{'y' if known_count == 1 else 'ies'} there; nothing was changed. Is a disk "
                    "unmounted or the folder moved? If the runs are really gone, reindex with "
                    "--allow-empty (allow_empty=True) to drop them.",
                    storage=str(root),
                )
            if stream:
                end_stream(True)
            else:
                retry_busy(functools.partial(write_batch, batch, batch_locations, True))
        finally:
            if stream:  # an error midway: the open batch is rolled back
                stream[1].rollback()
                stream[0].close()
        self._analyze(report.added + report.updated)
        return report

    def _is_empty(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(RUNS.c.uuid).limit(1)).first() is None

    def _write_batch(
        self,
        conn: Any,
        root: Path,
        rows: list[Any],
        locations: list[dict[str, Any]],
        unchanged: set[str],
        keep: set[str],
        state: dict[str, bool],
        report: ReindexReport,
        prepare: str | None = None,
    ) -> None:
        """Write one reindex batch (or part of one) in the caller's transaction.

        ``prepare``: the rows are ``prepare_row`` tuples; they are bulk loaded when the
        index was empty under the write lock, else read again as dicts and upserted.
        """
        first = "empty" not in state
        if first:
            # Rebuilding an empty index (the common case after deleting it) has
            # nothing to collide with: skip the per-run lookups.
            state["empty"] = conn.execute(select(RUNS.c.uuid).limit(1)).first() is None
            state["bulk"] = state["empty"] and bool(rows) and self._lock_empty(conn)
            if state["bulk"]:
                # Leaves are loaded without their index, built once at the end (finish).
                for index in sorted(LEAVES.indexes, key=lambda index: index.name):
                    index.drop(conn, checkfirst=True)
        if state["bulk"] and self.dialect == "postgresql" and state.get("unchecked") is not conn:
            # PostgreSQL checks a foreign key row by row (most of a bulk load's time):
            # every batch loads without them and puts them back before it commits
            # (finish). Its rows reference runs of the same transaction by construction.
            # Later batches lock out other writers as the first did (_lock_empty), so
            # that no run appears between the check for existing ones and the COPY.
            state["unchecked"] = conn
            conn.exec_driver_sql("LOCK TABLE runs, leaves, locations IN EXCLUSIVE MODE")
            for table, name in _BULK_FOREIGN_KEYS:
                conn.exec_driver_sql(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}")
        if prepare is None and state["bulk"] and first:
            rows = [prepare_row(row, self.dialect) for row in rows]
            prepare = self.dialect
        if prepare is not None:
            again: list[str] = []
            if state["bulk"]:
                # After the first write another process may have indexed some of these
                # runs (between two batches): those go the usual way below.
                existing = set() if first else self._existing(conn, [row[0][0] for row in rows])
                new = [row for row in rows if row[0][0] not in existing]
                self._bulk_load(conn, new, [loc for loc in locations if loc["run_uuid"] not in existing])
                report.added += len(new)
                keep.update(row[0][0] for row in new)
                again = sorted(existing)
            else:
                again = [row[0][0] for row in rows]
            if not again:
                return
            # Read these directories again as dicts for the upsert path.
            rows, locations, _, skipped = scan_names(str(root), again, {}, time.time_ns() - 2_000_000_000)
            report.skipped.extend(skipped)
        empty = state["empty"] and not state["bulk"]
        collisions = self._check_identity(conn, rows) if rows and not empty else {}
        good = [row for row in rows if row["uuid"] not in collisions]
        for uuid, reason in collisions.items():
            report.skipped.append((str(root / uuid), reason))
        fresh = {row["uuid"] for row in good}
        existing_uuids = set() if empty else self._existing(conn, list(fresh))
        for start in range(0, len(good), 5000):
            self._upsert_runs(conn, good[start : start + 5000])
        wanted = [loc for loc in locations if loc["run_uuid"] in fresh or loc["run_uuid"] in unchanged]
        for start in range(0, len(wanted), 5000):
            self._put_locations(conn, wanted[start : start + 5000])
        added = sum(1 for uuid in fresh if uuid not in existing_uuids)
        report.added += added
        report.updated += len(good) - added
        keep.update(fresh)

    def unfinished_bulk_load(self) -> list[str]:
        """What a reindex stopped between two bulk batches left undone: the leaves
        index it builds after the last batch (searches are then slow, not wrong) and, on
        PostgreSQL, the check of the foreign keys it put back NOT VALID."""
        from sqlalchemy import inspect

        with self.engine.connect() as conn:
            present = {index["name"] for index in inspect(conn).get_indexes("leaves")}
            undone = [
                f"the search index {index.name} is missing"
                for index in sorted(LEAVES.indexes, key=lambda index: index.name)
                if index.name not in present
            ]
            if self.dialect == "postgresql":
                for table, name in _BULK_FOREIGN_KEYS:
                    valid = _foreign_key_valid(conn, table, name)
                    if not valid:
                        undone.append(f"the foreign key {name} is {'missing' if valid is None else 'not validated'}")
        return undone

    def finish_bulk_load(self) -> None:
        """Do what ``unfinished_bulk_load`` lists (what the next reindex would do)."""
        with self.engine.execution_options(machinable_write=True).begin() as conn:
            _create_leaf_indexes(conn)
            if self.dialect == "postgresql":
                self._restore_foreign_keys(conn, validate=True)

    @staticmethod
    def _restore_foreign_keys(conn: Any, validate: bool) -> None:
        """Put back the foreign keys a PostgreSQL bulk load dropped: NOT VALID (enforced
        from now on, cascades included, without reading the table), and with
        ``validate`` checked over every row (once, after the last batch; also completes
        a reindex stopped between two batches)."""
        for table, name in _BULK_FOREIGN_KEYS:
            valid = _foreign_key_valid(conn, table, name)
            if valid is None:
                conn.exec_driver_sql(
                    f"ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY (run_uuid) "
                    "REFERENCES runs (uuid) ON DELETE CASCADE NOT VALID"
                )
            if validate and not valid:
                conn.exec_driver_sql(f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}")

    def _lock_empty(self, conn: Any) -> bool:
        """Is the index still empty, with no other writer able to change that until commit?

        SQLite's write transaction (BEGIN IMMEDIATE) already excludes other writers; on
        PostgreSQL the tables are locked against writes (reads go on).
        """
        if self.dialect == "postgresql":
            conn.exec_driver_sql("LOCK TABLE runs, leaves, locations IN EXCLUSIVE MODE")
        return conn.execute(select(RUNS.c.uuid).limit(1)).first() is None

    def _bulk_load(
        self, conn: Any, rows: list[tuple[tuple[Any, ...], list[tuple[Any, ...]]]], locations: list[dict[str, Any]]
    ) -> None:
        """Load new runs (``prepare_row`` tuples), their leaves and locations in the caller's
        transaction with plain inserts through the driver (COPY on PostgreSQL), leaves in
        primary-key order. The leaves index is not there (see ``_write_batch``)."""
        if not rows:
            return
        rows = sorted(rows, key=lambda row: row[0][0])
        self._load(conn, RUNS.name, [c.name for c in RUNS.c], [row[0] for row in rows])
        self._load(
            conn,
            LOCATIONS.name,
            ["run_uuid", "storage", "directory", "mtime_ns"],
            [(loc["run_uuid"], loc["storage"], loc["directory"], loc["mtime_ns"]) for loc in locations],
        )
        self._load(
            conn, LEAVES.name, list(LEAF_COLUMNS), [leaf for row in rows if isinstance(row[1], list) for leaf in row[1]]
        )
        # The other runs' leaves are built by the database from the rows just written.
        built = [(row[0][0], *row[1]) for row in rows if not isinstance(row[1], list)]
        if built:
            statements = leaf_sql()
            for name, wanted in (
                ("config", built),
                ("predicate", [run for run in built if run[2]]),
                ("nested", [run for run in built if run[3]]),
            ):
                if wanted:
                    conn.exec_driver_sql(statements[name], {"batch": json.dumps([[run[0], run[1]] for run in wanted])})

    @staticmethod
    def _load(conn: Any, table: str, columns: list[str], values: list[tuple[Any, ...]]) -> None:
        """Insert plain tuples: one executemany on SQLite, COPY on PostgreSQL."""
        if not values:
            return
        if conn.dialect.name == "postgresql":
            with conn.connection.dbapi_connection.cursor() as cursor:
                with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for value in values:
                        copy.write_row(value)
            return
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        conn.exec_driver_sql(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join([mark] * len(columns))})", values
        )

    def _existing(self, conn: Any, uuids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(uuids), 500):
            found.update(
                conn.execute(
                    select(RUNS.c.uuid).where(RUNS.c.uuid.in_(uuids[start : start + 500]))
                ).scalars()
            )
        return found

    def _put_locations(self, conn: Any, rows: list[dict[str, Any]]) -> None:
        conn.execute(self._statement("put_locations"), rows)

    def _scan(
        self,
        root: Path,
        known: dict[str, tuple[str, int | None]],
        progress: bool | None,
        prepare: str | None = None,
    ) -> Iterator[tuple[list[Any], list[dict[str, Any]], set[str], list[tuple[str, str]]]]:
        """Read the record directories under ``root`` that changed since ``known``, yielding
        (rows, locations, unchanged uuids, skipped) one chunk of directories at a time."""
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            return
        storage = str(root)
        # A directory modified within this window could change again within the
        # filesystem's timestamp granularity unseen: do not trust its mtime next time.
        recent = time.time_ns() - 2_000_000_000
        # In name (uuid) order, so that a bulk load appends to the tables' primary keys
        # rather than inserting all over them.
        names = sorted(name for name in names if not name.startswith("."))
        chunks = [names[i : i + SCAN_CHUNK] for i in range(0, len(names), SCAN_CHUNK)]

        def job(chunk: list[str]) -> tuple[Any, ...]:
            seen = {d: known[d] for d in (os.path.join(storage, n) for n in chunk) if d in known}
            return storage, chunk, seen, recent, prepare

        workers = min(os.cpu_count() or 1, 4)
        if len(names) >= PARALLEL_SCAN_MIN and workers > 1 and hasattr(os, "fork"):
            # Reading headers is bound by syscalls and JSON parsing: spread it over
            # processes. Workers only read files; they never touch the database. At most
            # a few chunks are in flight, so results never pile up in memory.
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                pending = [pool.submit(scan_names, *job(chunk)) for chunk in chunks[: 2 * workers]]
                queued = len(pending)
                for _ in track(range(len(chunks)), total=len(chunks), description=f"reindex {root}", show=progress):
                    part = pending.pop(0).result()
                    if queued < len(chunks):
                        pending.append(pool.submit(scan_names, *job(chunks[queued])))
                        queued += 1
                    yield part
        else:
            for chunk in track(chunks, total=len(chunks), description=f"reindex {root}", show=progress):
                yield scan_names(*job(chunk))

    def _drop_stale(self, conn: Any, root: Path, keep: set[str]) -> int:
        """Remove locations under ``root`` whose directory is gone, and runs left nowhere."""
        stale = [
            (loc_id, run_uuid)
            for loc_id, run_uuid in conn.execute(
                select(LOCATIONS.c.id, LOCATIONS.c.run_uuid).where(LOCATIONS.c.storage == str(root))
            )
            if run_uuid not in keep
        ]
        if not stale:
            return 0
        ids = [loc_id for loc_id, _ in stale]
        for start in range(0, len(ids), 500):
            conn.execute(delete(LOCATIONS).where(LOCATIONS.c.id.in_(ids[start : start + 500])))
        availability = Availability.__table__
        removed = 0
        orphans = sorted({run_uuid for _, run_uuid in stale})
        for start in range(0, len(orphans), 500):
            chunk = orphans[start : start + 500]
            still_known = set(
                conn.execute(
                    select(LOCATIONS.c.run_uuid).where(LOCATIONS.c.run_uuid.in_(chunk))
                ).scalars()
            ) | set(
                conn.execute(
                    select(availability.c.run_uuid).where(availability.c.run_uuid.in_(chunk))
                ).scalars()
            )
            gone = [u for u in chunk if u not in still_known]
            if gone:
                conn.execute(delete(RUNS).where(RUNS.c.uuid.in_(gone)))
                removed += len(gone)
        return removed


__all__ = ["Index", "ReindexReport", "RunRecord"]
