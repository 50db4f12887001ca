"""Rows from record directories: what the index stores for a run, read from its files.

``row_values`` turns a record's headers and status markers into a ``runs`` row;
``scan_names`` reads a batch of record directories (the unit of reindex work, run in
worker processes for large storages). Reading never imports user code.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from machinable.catalog.leaves import leaf_tuples, scope_key, sql_exact, sql_shape
from machinable.record import (
    ID_FILE,
    MAX_MARKER_BYTES,
    MODEL_FILE,
    SENTINEL,
    is_uuid,
    parse_timestamp,
    read_bytes,
    read_json,
    status_of,
    validate_headers,
)

IDENTITY_KEYS = ("project", "module", "config_key", "predicate_key")


@dataclass(frozen=True)
class RunRecord:
    """One indexed run, as the index knows it."""

    uuid: str
    project: str
    module: str
    config_key: str
    predicate_key: str
    config: dict[str, Any]
    canonical: dict[str, Any]
    predicate: dict[str, Any]
    version: Any
    status: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    failed_at: datetime | None = None
    updated_at: datetime | None = None
    digest: str | None = None
    directories: tuple[str, ...] = ()


@dataclass
class ReindexReport:
    """What a reindex pass did: rows added, updated, removed, and directories skipped and why."""

    storage: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stores: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def indexed(self) -> int:
        """Runs of this storage now in the index (read this pass or unchanged)."""
        return self.added + self.updated + self.unchanged

    def __str__(self) -> str:
        lines = [
            f"{self.storage}: {self.added} added, {self.updated} updated, "
            f"{self.unchanged} unchanged, {self.removed} removed, {len(self.skipped)} skipped"
        ]
        lines += [
            f"store {name}: {counts['listed']} listed, {counts['present']} complete, "
            f"{counts['added']} new to the index"
            for name, counts in self.stores.items()
        ]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def aware(value: datetime | None) -> datetime | None:
    """Timestamps read back from SQLite are naive; they were written in UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def row_values(header: dict[str, Any], model: dict[str, Any], markers: dict[str, datetime | None]) -> dict[str, Any]:
    """The ``runs`` row of a record, from its headers and marker timestamps."""
    created = parse_timestamp(str(model.get("created_at", ""))) or markers.get("started_at")
    return {
        "uuid": header["uuid"],
        "project": header["project"],
        "module": header["module"],
        "config_key": header["config_key"],
        "predicate_key": header["predicate_key"],
        "config": model["config"],
        "canonical": model["canonical"],
        "predicate": model["predicate"],
        "version": model["version"],
        "status": status_of(name for name, value in markers.items() if value is not None),
        "created_at": created or datetime.now(timezone.utc),
        "started_at": markers.get("started_at"),
        "finished_at": markers.get("finished_at"),
        "failed_at": markers.get("failed_at"),
        "updated_at": markers.get("updated_at"),
    }


STATUS_MARKERS = ("started_at", "finished_at", "failed_at")


def read_markers(directory: str | Path, names: Iterable[str], dir_fd: int | None = None) -> dict[str, datetime | None]:
    """Timestamps of the status markers present among ``names``.

    ``updated_at`` is the latest of the three status markers: ``mark()`` writes it with
    the same text every time it writes one, so it need not be read.
    """
    markers: dict[str, datetime | None] = {}
    base = os.fspath(directory)
    for name in STATUS_MARKERS:
        if name in names:
            try:
                raw = (
                    read_bytes(name, dir_fd, MAX_MARKER_BYTES)
                    if dir_fd is not None
                    else read_bytes(os.path.join(base, name), limit=MAX_MARKER_BYTES)
                )
                markers[name] = parse_timestamp(raw.decode("utf-8")) or _mtime(os.path.join(base, name))
            except (OSError, UnicodeDecodeError):  # gone, a directory, unreadable: not a marker
                markers[name] = None
    present = [value for value in markers.values() if value is not None]
    if present:
        markers["updated_at"] = max(present)
    elif "updated_at" in names:
        markers["updated_at"] = _mtime(os.path.join(base, "updated_at"))
    return markers


def _mtime(path: str) -> datetime | None:
    try:
        return datetime.fromtimestamp(os.stat(path).st_mtime, timezone.utc)
    except FileNotFoundError:
        return None




@functools.lru_cache(maxsize=4)
def _converters(dialect: str) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    """(column, converter) of every ``runs`` column: the value a bulk load writes, the same
    stored form as SQLAlchemy's bind processors give it (JSON as the engine's text)."""
    from sqlalchemy import JSON

    from machinable.catalog.engine import json_serializer
    from machinable.catalog.models import Run

    columns = list(Run.__table__.c)
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

        sqlite = SQLiteDialect_pysqlite(json_serializer=json_serializer)
        return tuple((c.name, c.type._cached_bind_processor(sqlite)) for c in columns)
    # PostgreSQL loads with COPY: JSON as text, everything else as Python values.
    return tuple((c.name, json_serializer if isinstance(c.type, JSON) else None) for c in columns)


def prepare_row(
    row: dict[str, Any], dialect: str
) -> tuple[tuple[Any, ...], list[tuple[Any, ...]] | tuple[int, bool, bool]]:
    """A ``runs`` row ready for a bulk load (values in column order), and its leaves: the
    rows themselves, or (when the database builds them exactly, ``leaves.sql_exact``)
    the run's scope key and ``leaves.sql_shape``.

    Raises ValueError for a value the index cannot store (NaN or infinity in a config).
    """
    converters = _converters(dialect)
    values = tuple(convert(row.get(name)) if convert is not None else row.get(name) for name, convert in converters)
    names = [name for name, _ in converters]
    config, predicate = values[names.index("config")], values[names.index("predicate")]
    # SQLite builds leaves from its JSON faster than rows can be inserted; PostgreSQL
    # takes Python's rows through COPY faster than it expands jsonb (measured).
    if dialect == "sqlite" and isinstance(config, str) and isinstance(predicate, str) and sql_exact(config, predicate):
        return values, (scope_key(row["project"], row["module"]), *sql_shape(config, predicate))
    return values, leaf_tuples(row["uuid"], row["project"], row["module"], row["config"], row["predicate"])


def scan_names(
    storage: str,
    names: list[str],
    known: dict[str, tuple[str, int | None]],
    recent: int,
    prepare: str | None = None,
) -> tuple[list[Any], list[dict[str, Any]], set[str], list[tuple[str, str]]]:
    """Read the record directories ``names`` of ``storage`` (a unit of reindex work).

    With ``prepare`` (a dialect name) rows come as ``prepare_row`` gives them, ready for
    a bulk load, so that serialising them happens here (in a scan worker) too.
    """
    rows: list[Any] = []
    locations: list[dict[str, Any]] = []
    unchanged: set[str] = set()
    skipped: list[tuple[str, str]] = []
    for name in names:
        directory = os.path.join(storage, name)
        try:
            info = os.lstat(directory)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode):
            # A link could point anywhere: gc or evict following it would delete there.
            skipped.append((directory, "a symbolic link, not a run directory; move the run here instead"))
            continue
        if not stat.S_ISDIR(info.st_mode):
            if is_uuid(name):
                skipped.append((directory, "named like a run but not a directory"))
            continue
        if not is_uuid(name):
            skipped.append((directory, "not named like a run uuid"))
            continue
        seen = known.get(directory)
        if seen is not None and seen[1] is not None and seen[1] == info.st_mtime_ns:
            unchanged.add(seen[0])
            continue
        dir_fd = None
        try:
            # Open the directory once and read its files relative to it: a large
            # share of reindex is path lookups otherwise.
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            entries = os.listdir(dir_fd)
            if SENTINEL not in entries:
                skipped.append((directory, f"no {SENTINEL} sentinel"))
                continue
            header = read_json(ID_FILE, dir_fd)
            model = read_json(MODEL_FILE, dir_fd)
            markers = read_markers(directory, entries, dir_fd)
        except FileNotFoundError as exc:
            skipped.append((directory, f"{os.path.basename(exc.filename or '?')} is missing"))
            continue
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            skipped.append((directory, f"unreadable header: {exc}"))
            continue
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        problem = validate_headers(header, model, name)
        if problem:
            skipped.append((directory, problem))
            continue
        try:
            row = row_values(header, model, markers)
        except (KeyError, TypeError, ValueError) as exc:
            skipped.append((directory, f"invalid header: {exc}"))
            continue
        if prepare is not None:
            try:
                rows.append(prepare_row(row, prepare))
            except (TypeError, ValueError) as exc:
                skipped.append((directory, f"model.json cannot be stored in the index: {exc}"))
                continue
        else:
            rows.append(row)
        mtime = info.st_mtime_ns if info.st_mtime_ns < recent else None
        locations.append({"run_uuid": name, "storage": storage, "directory": directory, "mtime_ns": mtime})
    return rows, locations, unchanged, skipped
