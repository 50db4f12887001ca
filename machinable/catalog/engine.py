"""The one engine factory, SQLite pragmas, and migration on first use.

Every index engine is made here. SQLite connections get WAL, ``busy_timeout``,
``synchronous=NORMAL`` and foreign keys from a ``connect`` listener on that engine.
Write transactions on SQLite start with ``BEGIN IMMEDIATE`` so that two writers never
deadlock upgrading a read lock. On first use the schema is created or upgraded to the
code's head under a lock; an index newer than the code is refused.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError

from machinable.errors import IndexError_, IndexNewerThanCode
from machinable.locks import FileLock
from machinable.redact import redact

SCHEMA_HEAD = "0006"
BUSY_TIMEOUT_MS = 30_000
T = TypeVar("T")

_engines: dict[str, Engine] = {}
_ready: set[str] = set()
_paths: dict[str, Path] = {}  # SQLite urls: the index file
_identities: dict[str, tuple[int, int] | None] = {}  # its (device, inode) when opened
_lock = threading.Lock()


def to_url(spec: str | os.PathLike[str]) -> str:
    """A SQLAlchemy URL for a path or URL; paths become absolute SQLite URLs."""
    text_spec = os.fspath(spec)
    found = _urls.get(text_spec)
    if found is not None:
        return found
    if "://" in text_spec:
        try:
            make_url(text_spec)
        except ArgumentError as exc:
            raise IndexError_(f"invalid index URL {redact(text_spec)!r}: {exc}", url=text_spec) from exc
        return text_spec
    url = f"sqlite:///{os.path.abspath(os.path.expanduser(text_spec))}"
    if os.path.isabs(text_spec) and len(_urls) < 1000:  # a relative path follows the cwd
        _urls[text_spec] = url
    return url


_urls: dict[str, str] = {}  # absolute index paths -> their URLs (every get() asks)


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def migrations_dir() -> Path:
    """Shipped migrations (wheel) or the checkout's top-level ``migrations/``."""
    here = Path(__file__).resolve().parent.parent
    shipped = here / "_migrations"
    if (shipped / "env.py").is_file():
        return shipped
    return here.parent / "migrations"


def alembic_config(url: str | None = None):  # -> alembic.config.Config
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        cfg.set_main_option("machinable.url", url.replace("%", "%%"))
    return cfg


NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "sshfs", "afs", "ncpfs", "lustre", "gpfs", "beegfs"}
)


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem holding ``path``, from /proc/mounts (Linux)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def journal_mode_for(path: Path | None, mounts: str | None = None) -> str:
    """WAL, unless the index sits on a network filesystem where WAL's shared memory is unsafe.

    ``mounts`` is a mount table in /proc/mounts format (default: this machine's).
    """
    if path is None:
        return "WAL"
    kind = filesystem_type(path.parent, mounts)
    if kind in NETWORK_FILESYSTEMS:
        warnings.warn(
            f"the index {path} is on a network filesystem ({kind}); SQLite's WAL mode is unsafe "
            "there, so machinable uses a rollback journal (slower with many writers). For many "
            "machines, consider a PostgreSQL index (MACHINABLE_INDEX=postgresql+psycopg://...).",
            stacklevel=3,
        )
        return "DELETE"
    return "WAL"


def _sqlite_connect_for(journal_mode: str):  # type: ignore[no-untyped-def]
    def connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Switching a new file to WAL takes a lock; many processes opening a new index at
        # once may find it busy even with busy_timeout, so retry briefly.
        for attempt in range(50):
            try:
                cursor.execute(f"PRAGMA journal_mode = {journal_mode}")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.02 + random.random() * 0.05)
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    return connect


def _sqlite_begin(connection) -> None:  # type: ignore[no-untyped-def]
    if connection.get_execution_options().get("machinable_write"):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        connection.exec_driver_sql("BEGIN")


_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode


def json_serializer(value: object) -> str:
    """Stored JSON: sorted keys, compact, so equal values are equal text on SQLite."""
    return _ENCODE(value)  # one encoder for every value (json.dumps would make one per call)


def make_engine(url: str, *, mounts: str | None = None) -> Engine:
    """Create an engine for ``url`` with machinable's connection profile.

    A URL naming an unknown database kind, or a driver that is not installed, is an
    IndexError_ saying which.
    """
    try:
        return _make_engine(url, mounts)
    except NoSuchModuleError as exc:
        kind = make_url(url).drivername
        raise IndexError_(
            f"the index URL {_display(url)} names an unknown database kind {kind!r} "
            "(use a file path, sqlite:///path or postgresql+psycopg://...)",
            url=url,
        ) from exc
    except ImportError as exc:
        missing = exc.name or str(exc)
        raise IndexError_(
            f"the index URL {_display(url)} needs the Python package {missing!r}, which is not "
            f"installed (for PostgreSQL: pip install 'psycopg[binary]')",
            url=url,
        ) from exc
    except ArgumentError as exc:
        raise IndexError_(f"invalid index URL {_display(url)}: {exc}", url=url) from exc


def _make_engine(url: str, mounts: str | None) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": BUSY_TIMEOUT_MS / 1000},
            json_serializer=json_serializer,
        )
        event.listen(engine, "connect", _sqlite_connect_for(journal_mode_for(path, mounts)))
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # LIFO: the connection used last is used next, so a busy process (a server, a sweep)
    # keeps reusing the few connections psycopg has already prepared its statements on.
    return create_engine(url, pool_pre_ping=True, pool_use_lifo=True, json_serializer=json_serializer)


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a SQLite index file, or None when it does not exist."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return info.st_dev, info.st_ino


def get_engine(url: str) -> Engine:
    """The process-wide engine for ``url``, with its schema at head.

    A SQLite index file that was deleted or replaced since the engine opened it (same
    path, another inode) is noticed here: the old connections still reach the deleted
    file, and whatever they wrote would vanish with the process. The engine is then
    disposed and the file at the path opened (created and migrated if need be).
    """
    engine = _engines.get(url)
    if engine is not None and url in _ready:
        path = _paths.get(url)
        if path is None or _file_identity(path) == _identities.get(url):
            return engine
    with _lock:
        engine = _engines.get(url)
        path = sqlite_path(url)
        if engine is not None and path is not None and url in _ready:
            if _file_identity(path) != _identities.get(url):
                _reopen(engine, path)
                engine = None
                _ready.discard(url)
        if engine is None:
            engine = make_engine(url)
            _engines[url] = engine
        if url not in _ready:
            ensure_schema(engine, url)
            if path is not None:
                _paths[url] = path
                _identities[url] = _file_identity(path)
            _ready.add(url)
    return engine


def _reopen(engine: Engine, path: Path) -> None:
    """Close the connections to a deleted or replaced index file, and its stale journal.

    SQLite does not fold the write-ahead log into a file that was unlinked or renamed
    under it, and leaves ``-wal``/``-shm`` at the path: a new connection would read the
    old database's pages from them into the new file. The ones this process holds open
    belonged to the old file (every connection here pointed at it), so they go.
    """
    companions = [Path(f"{path}-wal"), Path(f"{path}-shm")]
    stale = {p: _file_identity(p) for p in _held_open(companions)}
    engine.dispose()
    for companion, identity in stale.items():
        if _file_identity(companion) == identity:
            companion.unlink(missing_ok=True)


def _held_open(paths: list[Path]) -> list[Path]:
    """Which of ``paths`` this process has open (Linux's /proc/self/fd; elsewhere none)."""
    wanted = {identity: path for path in paths if (identity := _file_identity(path)) is not None}
    if not wanted:
        return []
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return []
    held = []
    for fd in descriptors:
        try:
            info = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        found = wanted.pop((info.st_dev, info.st_ino), None)
        if found is not None:
            held.append(found)
    return held


def dispose_all() -> None:
    """Close every pooled connection (tests, forks)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _ready.clear()
        _paths.clear()
        _identities.clear()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        try:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except (OperationalError, DBAPIError) as exc:
            conn.rollback()
            if _is_not_a_database(exc):
                raise
            return None


def _is_not_a_database(exc: BaseException) -> bool:
    message = str(getattr(exc, "orig", exc)).lower()
    return "file is not a database" in message or "file is encrypted" in message


def _known_revisions(url: str) -> set[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(url))
    return {rev.revision for rev in script.walk_revisions()}


def ensure_schema(engine: Engine, url: str) -> None:
    """Create or upgrade the schema to head, once, under a lock shared by processes."""
    try:
        if current_revision(engine) == SCHEMA_HEAD:
            _check_tables(engine, url)
            return
        with _migration_lock(engine, url):
            revision = current_revision(engine)
            if revision == SCHEMA_HEAD:
                return
            if revision is not None and revision not in _known_revisions(url):
                raise IndexNewerThanCode(
                    f"the index at {_display(url)} has schema revision {revision!r}, newer than "
                    f"this machinable understands (head {SCHEMA_HEAD!r}); upgrade machinable, "
                    "or point MACHINABLE_INDEX at another index",
                    url=url,
                )
            _upgrade(engine, url)
    except (OperationalError, DBAPIError) as exc:
        if _is_not_a_database(exc):
            raise IndexError_(
                f"{_display(url)} is not a SQLite database; move it aside or set "
                "MACHINABLE_INDEX to another file",
                url=url,
            ) from exc
        raise IndexError_(f"cannot open the index at {_display(url)}: {exc.orig}", url=url) from exc


def _check_tables(engine: Engine, url: str) -> None:
    """An index at head must hold every table; one dropped by hand is named, not queried."""
    from sqlalchemy import inspect

    from machinable.catalog.models import Base

    with engine.connect() as conn:
        present = set(inspect(conn).get_table_names())
    missing = sorted(set(Base.metadata.tables) - present)
    if missing:
        raise IndexError_(
            f"the index at {_display(url)} is damaged: table(s) {', '.join(missing)} are missing "
            f"although it records schema revision {SCHEMA_HEAD!r}; move it aside (or drop it) and run "
            "`machinable reindex` to rebuild it from the run directories",
            url=url,
        )


def _upgrade(engine: Engine, url: str) -> None:
    from alembic import command

    cfg = alembic_config(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class _migration_lock:
    """A file lock beside a SQLite index; an advisory lock on a server."""

    def __init__(self, engine: Engine, url: str):
        self.engine = engine
        self.path = sqlite_path(url)
        self._file: FileLock | None = None
        self._conn = None

    def __enter__(self) -> None:
        if self.path is not None:
            self._file = FileLock(str(self.path) + ".lock", timeout=600)
            self._file.acquire()
        elif self.engine.dialect.name == "postgresql":
            self._conn = self.engine.connect()
            self._conn.execute(text("SELECT pg_advisory_lock(4242001)"))
            self._conn.commit()

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.release()
        if self._conn is not None:
            self._conn.execute(text("SELECT pg_advisory_unlock(4242001)"))
            self._conn.commit()
            self._conn.close()


def _display(url: str) -> str:
    path = sqlite_path(url)
    return str(path) if path is not None else make_url(url).render_as_string(hide_password=True)


def is_busy(exc: BaseException) -> bool:
    message = str(getattr(exc, "orig", exc)).lower()
    return "database is locked" in message or "database is busy" in message


def retry_busy(action: Callable[[], T], attempts: int = 8) -> T:
    """Run a write, retrying with jittered backoff while SQLite reports busy."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return action()
        except OperationalError as exc:
            if not is_busy(exc):
                raise IndexError_(f"the index refused a write: {_reason(exc)}") from exc
            if attempt == attempts - 1:
                raise IndexError_(
                    f"the index stayed busy through {attempts} attempts: {_reason(exc)}"
                ) from exc
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)
        except DBAPIError as exc:  # constraint, data or driver errors: one boundary
            raise IndexError_(f"the index refused a write: {_reason(exc)}") from exc
    raise AssertionError("unreachable")


def _reason(exc: DBAPIError) -> str:
    return " ".join(str(getattr(exc, "orig", exc)).split())[:500]


class RawWrite:
    """A write transaction on a pooled DBAPI connection, for a launch's few statements.

    SQLAlchemy's connection and statement machinery costs more than the statements of
    one launch (its row, 20 leaves, its location): this runs prepared SQL text on the
    driver's cursor. On SQLite it begins with ``BEGIN IMMEDIATE`` like every write
    (``_sqlite_begin``); it commits on success and rolls back on any exception. Driver
    errors are raised as SQLAlchemy's (``OperationalError`` for a busy database), so
    ``retry_busy`` treats them as it treats every other write's.
    """

    def __init__(self, engine: Engine):
        self.dialect = engine.dialect
        self._engine = engine
        self._error: type[Exception] = engine.dialect.loaded_dbapi.Error
        #: the driver's placeholder for positional parameters
        self.mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"

    def __enter__(self) -> RawWrite:
        self._connection = self._engine.raw_connection()  # connect errors come wrapped
        try:
            self._cursor = self._connection.cursor()
            if self.dialect.name == "sqlite":
                self.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._connection.close()
            raise
        return self

    def execute(self, statement: str, params: object = (), many: bool = False) -> None:
        try:
            if many:
                self._cursor.executemany(statement, params)
            else:
                self._cursor.execute(statement, params)
        except self._error as exc:
            raise self._wrap(statement, params, exc) from exc

    def _wrap(self, statement: str, params: object, exc: Exception) -> BaseException:
        return DBAPIError.instance(statement, params, exc, self._error, dialect=self.dialect)  # type: ignore[arg-type]

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        try:
            if kind is None:
                try:
                    self._connection.commit()
                except self._error as error:
                    raise self._wrap("COMMIT", None, error) from error
            else:
                try:
                    self._connection.rollback()
                except self._error:
                    pass  # the connection is gone; the pool discards it
        finally:
            try:
                self._cursor.close()
            finally:
                self._connection.close()
