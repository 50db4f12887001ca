"""``machinable import``: bring a storage written by machinable 5.x into this catalog.

Machinable 5.x keeps each run in ``<storage>/<identity key>/<predicate key>/``: a
``.machinable`` sentinel, ``id.json`` (kind, its own 12-character id), ``model.json``
(module, config with its ``_default_``/``_version_``/``_update_`` layers, predicate,
``created_at_ns``), a ``cached`` marker once finished, and the run's files. Each launch
adds an execution record nested inside it (``<key>/<timestamp>/``) with ``started_at``,
``finished_at``, ``heartbeat_at`` and ``output.log``.

Every run becomes a record in the connected storage, named by this project's uuid for
its module and config (so the module must resolve here). Its files are copied where the
run wrote them; 5.x's own files and execution records go under ``upstream/``; the
upstream id and timestamps are kept in ``model.json``. The source is data, never code:
it is only read, through one boundary with limits (sizes, depth, entry counts, no
symlinks out of a run, no FIFOs or devices opened), and nothing in it is imported or
unpickled. Running the import again changes nothing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from machinable.catalog.index import Index
from machinable.errors import ConfigError, MachinableError
from machinable.identity import check_finite
from machinable.interface import Interface
from machinable.progress import track
from machinable.project import Project, module_file, validate_module_name
from machinable.record import (
    ERROR_FILE,
    MODEL_FILE,
    RESERVED,
    atomic_write,
    read_json,
    timestamp,
    write_record,
)
from machinable.storage import Storage

SENTINEL = ".machinable"
UPSTREAM_DIR = "upstream"  # 5.x's own files and execution records, inside each record
RECORDS_DIR = "records"
UPSTREAM_FILES = frozenset({SENTINEL, "id.json", "model.json", "cached", "updated_at"})
MARKER_NAMES = ("started_at", "finished_at", "heartbeat_at", "updated_at", "resumed_at")

MAX_HEADER_BYTES = 1 << 20  # id.json, model.json
MAX_MARKER_BYTES = 4096  # *_at, cached
MAX_LOG_TAIL = 64 * 1024  # of output.log, into error.txt
MAX_FILE_BYTES = 64 << 30  # any one file copied
MAX_DEPTH = 32  # directories below the source or a run
MAX_ENTRIES = 200_000  # entries in one run
LIVE_WINDOW = 90.0  # seconds: 5.x counts an unfinished run live while its heartbeat is this fresh


class Skip(Exception):
    """A run that is not imported, and why."""


@dataclass
class ImportReport:
    """What an import did: runs imported, already there, and skipped with their reasons."""

    source: str
    imported: list[tuple[str, str]] = field(default_factory=list)  # (upstream id, uuid)
    unchanged: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    other: int = 0  # records that are not runs (executions outside a run, projects, ...)

    def __str__(self) -> str:
        lines = [
            f"{self.source}: {len(self.imported)} imported, {len(self.unchanged)} already here, "
            f"{len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


# The boundary: 5.x headers as typed values.


class UpstreamHeader(BaseModel):
    """``id.json`` of a 5.x record."""

    model_config = ConfigDict(extra="ignore")
    uuid: str = Field(min_length=1, max_length=64)
    kind: str = Field(max_length=100)
    parent: str | None = Field(default=None, max_length=64)


class UpstreamModel(BaseModel):
    """``model.json`` of a 5.x run."""

    model_config = ConfigDict(extra="ignore")
    uuid: str = Field(min_length=1, max_length=64)
    module: str = Field(min_length=1, max_length=255)
    config: dict[str, Any]
    version: list[Any] = Field(default_factory=list)
    predicate: dict[str, Any] | None = None
    created_at_ns: int | None = Field(default=None, ge=0, lt=1 << 63)
    created_by: str | None = Field(default=None, max_length=1000)
    label: str | None = Field(default=None, max_length=1000)


@dataclass
class Entry:
    """One file of a run to copy: where it is, where it goes."""

    source: Path
    target: str
    size: int


@dataclass
class UpstreamRun:
    """A 5.x run as read from the source, checked and ready to write."""

    path: Path
    header: UpstreamHeader
    model: UpstreamModel
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    failed_at: datetime | None
    log_tail: str | None
    files: list[Entry]


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _open_regular(path: Path, limit: int) -> int:
    """A descriptor of the regular file at ``path`` (never a FIFO or a link), at most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Skip(f"{path.name} is a symlink") from None
        raise Skip(f"{path.name} cannot be read: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise Skip(f"{path.name} is {_kind(info.st_mode)}")
    if info.st_size > limit:
        os.close(fd)
        raise Skip(f"{path.name} is {info.st_size} bytes; the limit is {limit}")
    return fd


def _read_small(path: Path, limit: int) -> bytes:
    fd = _open_regular(path, limit)
    try:
        chunks = []
        size = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:  # it grew while we read it
                raise Skip(f"{path.name} is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_json(path: Path) -> Any:
    raw = _read_small(path, MAX_HEADER_BYTES)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Skip(f"{path.name} is not valid JSON: {' '.join(str(exc).split())[:200]}") from None
    except RecursionError:
        raise Skip(f"{path.name} is not valid JSON: nested too deeply") from None


def _parse(cls: type[BaseModel], path: Path) -> Any:
    try:
        return cls.model_validate(_read_json(path))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'top level'}: {error['msg']}"
            for error in exc.errors()[:3]
        )
        raise Skip(f"{path.name} is not a machinable 5.x record ({problems})") from None


def _read_time(path: Path) -> datetime | None:
    try:
        text = _read_small(path, MAX_MARKER_BYTES).decode("utf-8").strip()
    except (Skip, UnicodeDecodeError):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


# Reading the source.


def discover(root: Path) -> Iterator[tuple[Path, str | None]]:
    """Record directories below ``root`` (yielded with None) and entries not looked into
    (yielded with the reason). Symlinks are never followed."""
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        directory, depth = stack.pop()
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as exc:
            yield directory, f"cannot be listed: {exc.strerror}"
            continue
        names = {entry.name for entry in entries}
        if directory != root and SENTINEL in names:
            yield directory, None
            continue
        for entry in reversed(entries):
            path = Path(entry.path)
            if entry.is_symlink():
                yield path, "a symlink; not followed"
            elif entry.is_dir(follow_symlinks=False):
                if depth + 1 > MAX_DEPTH:
                    yield path, f"nested more than {MAX_DEPTH} levels deep"
                else:
                    stack.append((path, depth + 1))
            elif not entry.is_file(follow_symlinks=False):
                info = _lstat(path)
                yield path, _kind(info.st_mode) if info else "vanished"


def _inside(root: Path, path: Path) -> bool:
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)


def read_run(path: Path, now: datetime, live_window: float = LIVE_WINDOW) -> UpstreamRun | None:
    """A 5.x run directory as typed values; None for a record that is not a run.

    Raises ``Skip`` with the reason when the directory cannot be imported.
    """
    header = _parse(UpstreamHeader, path / "id.json")
    if header.kind != "Interface" or header.parent is not None:
        return None
    model = _parse(UpstreamModel, path / "model.json")
    try:  # NaN, infinities, lone surrogates, NUL: nothing a record or an index can hold
        check_finite(model.model_dump(mode="python"), "model.json")
    except ConfigError as exc:
        raise Skip(str(exc)) from None
    if model.uuid != header.uuid:
        raise Skip(f"model.json names {model.uuid!r}, id.json {header.uuid!r}")

    files: list[Entry] = []
    executions: list[Path] = []
    stack: list[tuple[Path, str, int, bool]] = [(path, "", 0, False)]
    count = 0
    while stack:
        directory, relative, depth, nested = stack.pop()
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as exc:
            raise Skip(f"{relative or '.'} cannot be listed: {exc.strerror}") from None
        names = {entry.name for entry in entries}
        if directory != path and SENTINEL in names and not nested:
            # a record inside the run (5.x's executions): kept whole under upstream/
            nested = True
            executions.append(directory)
        for entry in entries:
            count += 1
            if count > MAX_ENTRIES:
                raise Skip(f"holds more than {MAX_ENTRIES} entries")
            name = f"{relative}/{entry.name}" if relative else entry.name
            source = Path(entry.path)
            info = _lstat(source)
            if info is None:
                raise Skip(f"{name} vanished while being read")
            if stat.S_ISLNK(info.st_mode):
                if not _inside(path, source):
                    raise Skip(f"{name} is a symlink that points outside the run ({os.readlink(source)})")
                target = Path(os.path.realpath(source))
                info = _lstat(target)
                if info is None or not stat.S_ISREG(info.st_mode):
                    raise Skip(f"{name} is a symlink to something that is not a regular file")
                source = target
            if stat.S_ISDIR(info.st_mode):
                if depth + 1 > MAX_DEPTH:
                    raise Skip(f"{name} is nested more than {MAX_DEPTH} levels deep")
                stack.append((source, name, depth + 1, nested))
                continue
            if not stat.S_ISREG(info.st_mode):
                raise Skip(f"{name} is {_kind(info.st_mode)}")
            if info.st_size > MAX_FILE_BYTES:
                raise Skip(f"{name} is {info.st_size} bytes; the limit is {MAX_FILE_BYTES}")
            files.append(Entry(source, _target(name, nested), info.st_size))

    status, started, finished, failed, log = _status(path, executions, now, live_window)
    return UpstreamRun(path, header, model, status, started, finished, failed, log, files)


def _target(name: str, nested: bool) -> str:
    """Where a run file goes in the new record."""
    top = name.split("/", 1)[0]
    if nested:
        return f"{UPSTREAM_DIR}/{RECORDS_DIR}/{name}"
    if "/" not in name and name in UPSTREAM_FILES:
        return f"{UPSTREAM_DIR}/{name}"
    if top in RESERVED or top == UPSTREAM_DIR:
        # a run file named like one of ours (error.txt, started_at): kept, out of the way
        return f"{UPSTREAM_DIR}/files/{name}"
    return name


def _status(
    path: Path, executions: list[Path], now: datetime, live_window: float
) -> tuple[str, datetime | None, datetime | None, datetime | None, str | None]:
    """(status, started, finished, failed, log tail) from the run's markers and executions."""
    runs = []
    for directory in executions:
        markers = {name: _read_time(directory / name) for name in MARKER_NAMES}
        if markers["started_at"] is not None:
            runs.append((directory, markers))
    finished = [m for _, m in runs if m["finished_at"] is not None]
    cached = _lstat(path / "cached")
    if finished or (cached is not None and stat.S_ISREG(cached.st_mode)):
        last = max(finished, key=lambda m: m["finished_at"]) if finished else {}
        done = last.get("finished_at") or _read_time(path / "updated_at") or now
        return "finished", last.get("started_at"), done, None, None
    if not runs:
        raise Skip("never launched (no execution started)")
    directory, latest = max(runs, key=lambda item: item[1]["started_at"])
    beat = latest["heartbeat_at"] or latest["updated_at"] or latest["started_at"]
    # 5.x writes no failure marker: an unfinished run whose heartbeat is fresh may be
    # running still (or have failed moments ago); it is left for a later import.
    if beat is not None and (now - beat).total_seconds() < live_window:
        age = max(0, int((now - beat).total_seconds()))
        raise Skip(
            f"may still be running in machinable 5.x (heartbeat {age} s ago, within "
            f"{live_window:g} s); import again later"
        )
    tail = None
    log = directory / "output.log"
    if _lstat(log) is not None:
        try:
            fd = _open_regular(log, MAX_FILE_BYTES)
        except Skip:
            fd = None
        if fd is not None:
            try:
                size = os.fstat(fd).st_size
                os.lseek(fd, max(0, size - MAX_LOG_TAIL), os.SEEK_SET)
                tail = os.read(fd, MAX_LOG_TAIL).decode("utf-8", errors="replace")
            finally:
                os.close(fd)
    return "failed", latest["started_at"], None, beat, tail


# Writing the new record.


def _copy(entry: Entry, destination: Path) -> None:
    fd = _open_regular(entry.source, MAX_FILE_BYTES)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        out = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                os.write(out, chunk)
        finally:
            os.close(out)
        info = os.fstat(fd)
        os.utime(destination, ns=(info.st_atime_ns, info.st_mtime_ns))
    finally:
        os.close(fd)


def _created(model: UpstreamModel, fallback: datetime) -> datetime:
    if model.created_at_ns is None:
        return fallback
    return datetime.fromtimestamp(model.created_at_ns / 1e9, timezone.utc)


def import_run(
    found: UpstreamRun, source_root: Path, *, project: Project, storage: Path, index: Index
) -> tuple[str, bool]:
    """Write one run's record (or find it already there); returns (uuid, written)."""
    try:
        validate_module_name(found.model.module)
    except MachinableError as exc:
        raise Skip(str(exc)) from None
    file = module_file(project, found.model.module)
    if file is not None and _inside(source_root, file):
        # a source folder inside the project must not smuggle code in by naming its own files
        raise Skip(f"module {found.model.module!r} is a file inside the imported folder; it is never imported")
    try:
        cls = project.resolve(found.model.module)
    except MachinableError as exc:
        raise Skip(f"module {found.model.module!r} does not resolve in this project: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Interface)):
        raise Skip(f"module {found.model.module!r} is not an Interface here")
    config = {key: value for key, value in found.model.config.items() if not key.startswith("_")}
    try:
        run = cls.make(
            config, project=project, storage=Storage(storage), index=index,
            predicate=found.model.predicate or {},
        )
    except MachinableError as exc:
        raise Skip(f"config does not fit module {found.model.module!r} here: {exc}") from None
    directory = storage / run.uuid
    existing = _existing(directory)
    if existing is not None:
        if existing == found.header.uuid:
            if index.status(run.uuid) is None:
                index.ingest_directory(directory)
            return run.uuid, False
        origin = f"imported from 5.x run {existing}" if existing else "computed here"
        raise Skip(f"names run {run.uuid}, which already exists ({origin})")

    header, model = run._headers()
    model.pop("code", None)  # 5.x's code computed it, not the code that resolves it here now
    created = _created(found.model, found.started_at or datetime.now(timezone.utc))
    model["created_at"] = timestamp(created)
    model["upstream"] = {
        "id": found.header.uuid,
        "module": found.model.module,
        "version": found.model.version,
        "predicate": found.model.predicate,
        "created_at": timestamp(created),
        "created_at_ns": found.model.created_at_ns,
        "created_by": found.model.created_by,
        "label": found.model.label,
        "started_at": timestamp(found.started_at) if found.started_at else None,
        "finished_at": timestamp(found.finished_at) if found.finished_at else None,
        "failed_at": timestamp(found.failed_at) if found.failed_at else None,
        "status": found.status,
        "path": found.path.relative_to(source_root).as_posix(),
    }
    # Named like an interrupted fetch's directory, so that `machinable gc` collects what a
    # killed import leaves behind.
    scratch = storage / f".{run.uuid}.partial-import-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        write_record(scratch, header, model)
        for entry in found.files:
            _copy(entry, scratch / entry.target)
        markers = {"started_at": found.started_at, "finished_at": found.finished_at, "failed_at": found.failed_at}
        if found.status == "failed":
            note = "imported from machinable 5.x, where this run failed"
            atomic_write(scratch / ERROR_FILE, f"{note}\n\n{found.log_tail}" if found.log_tail else note + "\n")
        written = [moment for moment in markers.values() if moment is not None]
        for name, moment in markers.items():
            if moment is not None:
                atomic_write(scratch / name, timestamp(moment))
        if written:
            atomic_write(scratch / "updated_at", timestamp(max(written)))
        try:
            os.rename(scratch, directory)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # another import wrote it meanwhile
            if _existing(directory) == found.header.uuid:
                return run.uuid, False
            raise Skip(f"names run {run.uuid}, which was created meanwhile by someone else") from None
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    index.ingest_directory(directory)
    return run.uuid, True


def _existing(directory: Path) -> str | None:
    """The 5.x id a record was imported from, "" for a run computed here, None if absent."""
    try:
        model = read_json(directory / MODEL_FILE)
    except FileNotFoundError:
        if directory.exists():
            return ""  # a directory without headers: not ours to replace
        return None
    except (ValueError, OSError):
        return ""
    upstream = model.get("upstream") if isinstance(model, dict) else None
    return str(upstream.get("id", "")) if isinstance(upstream, dict) else ""


def import_storage(
    source: str | os.PathLike[str],
    *,
    project: Project | None = None,
    storage: Storage | None = None,
    index: Index | None = None,
    progress: bool | None = None,
    live_window: float = LIVE_WINDOW,
) -> ImportReport:
    """Import every run of the 5.x storage at ``source`` into the connected storage.

    An unfinished run whose heartbeat is younger than ``live_window`` seconds may still
    be running and is skipped; an older one failed and is imported as failed.
    """
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(source))))
    info = _lstat(root)
    if info is None or not stat.S_ISDIR(info.st_mode):
        raise MachinableError(f"the import source is not a directory: {root} (give the machinable 5.x storage folder)")
    project = project or Project.get()
    storage_dir = (storage or Storage.get()).directory(project)
    index = index or Index.get()
    report = ImportReport(str(root))
    now = datetime.now(timezone.utc)

    candidates: list[Path] = []
    for path, reason in discover(root):
        if reason is None:
            candidates.append(path)
        else:
            report.skipped.append((path.relative_to(root).as_posix(), reason))
    storage_dir.mkdir(parents=True, exist_ok=True)
    for path in track(candidates, total=len(candidates), description="import", show=progress):
        name = path.relative_to(root).as_posix()
        try:
            found = read_run(path, now, live_window)
            if found is None:
                report.other += 1
                continue
            uuid, written = import_run(found, root, project=project, storage=storage_dir, index=index)
        except Skip as reason:
            report.skipped.append((name, str(reason)))
            continue
        except (ValueError, TypeError, UnicodeError, RecursionError) as exc:  # data we did not foresee
            report.skipped.append((name, f"cannot be imported: {type(exc).__name__}: {exc}"))
            continue
        (report.imported if written else report.unchanged).append((found.header.uuid, uuid))
    return report


__all__ = ["ImportReport", "import_storage"]
