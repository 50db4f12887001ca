"""Verify the index against the record directories, and repair what is safe to repair.

The directories are the truth and the index is a cache. ``verify()`` walks a storage
directory in uuid order and reports, per run: invalid headers, id.json/model.json
drift, directories the index does not hold, rows whose status disagrees with the
markers, rows whose directory is gone, runs whose process died, and (with checksums)
files that no longer match the run's verified store manifest. ``repair=True`` fixes
what needs no guessing (re-ingest, add or drop locations, drop rows whose data is gone
everywhere) and says what it changed. A checkpoint file makes long passes resumable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import String, any_, bindparam, delete, select, tuple_
from sqlalchemy.dialects import postgresql

from machinable.catalog.engine import retry_busy
from machinable.catalog.index import LOCATIONS, RUNS, Index
from machinable.catalog.rows import read_markers, row_values
from machinable.errors import LockTimeout, MachinableError, RecordError, StoreError, UnsafeFileError
from machinable.locks import FileLock, is_held
from machinable.progress import track
from machinable.record import LOCKS_DIR, atomic_write, is_uuid, read_record, status_of
from machinable.storage import Storage
from machinable.stores import AVAILABILITY, REMOTES, copies, resolve_store
from machinable.stores.manifest import MANIFEST_NAME, build_manifest, manifest_digest

CHECKPOINT = ".machinable-verify.json"
# The columns of a run's row that verify compares (not the JSON ones: parsing them is
# most of what reading rows costs).
_COMPARED = tuple(RUNS.c[name] for name in ("uuid", "project", "module", "config_key", "predicate_key", "status", "digest"))
CHECKPOINT_EVERY = 1000


@dataclass
class Finding:
    """One problem: which run or path, what kind, details, and whether it was repaired."""

    target: str
    kind: str
    detail: str
    repaired: bool = False

    def __str__(self) -> str:
        state = "repaired" if self.repaired else "NOT repaired"
        return f"{self.kind}: {self.target}: {self.detail} [{state}]"


@dataclass
class VerifyReport:
    storage: str
    checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    resumed_after: str | None = None
    unchecked: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)

    @property
    def unrepaired(self) -> list[Finding]:
        return [f for f in self.findings if not f.repaired]

    @property
    def ok(self) -> bool:
        return not self.unrepaired

    def __str__(self) -> str:
        lines = [str(f) for f in self.findings]
        if self.resumed_after is not None:
            lines.append(
                f"resumed after {self.resumed_after} (the checkpoint of an interrupted pass; "
                "its findings are included)"
            )
        repaired = len(self.findings) - len(self.unrepaired)
        lines.append(
            f"checked {self.checked} run directories in {self.storage}: "
            f"{len(self.findings)} problem(s), {repaired} repaired, {len(self.unrepaired)} left"
        )
        if self.in_flight:
            lines.append(
                f"{len(self.in_flight)} run(s) in flight (being launched or evicted by another "
                f"process, their lock held): not problems; verify again later to check them: "
                f"{', '.join(self.in_flight[:5])}{' ...' if len(self.in_flight) > 5 else ''}"
            )
        if self.unchecked:
            lines.append(
                f"{len(self.unchecked)} run(s) have no verified store copy, so their file "
                "checksums had nothing to be compared with (push them to a store first)"
            )
        return "\n".join(lines)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(
    index: Index,
    storage: str | os.PathLike[str] | None = None,
    *,
    checksums: bool = False,
    repair: bool = False,
    resume: bool = False,
    progress: bool | None = None,
) -> VerifyReport:
    """Compare the index with the directories of a storage; optionally repair."""

    root = Path(os.path.abspath(storage if storage is not None else Storage.get().directory()))
    report = VerifyReport(storage=str(root))
    # Memory stays flat with the number of runs: the rows of the storage are read back
    # in pages at the end, and what the pass saw is kept as names, not paths.
    with index.engine.connect() as conn:
        located_any = (
            conn.execute(select(LOCATIONS.c.id).where(LOCATIONS.c.storage == str(root)).limit(1)).first()
            is not None
        )
    if storage is not None and not root.is_dir() and (root.exists() or not located_any):
        # a mistyped path must not verify "clean"; a deleted storage the index
        # still lists is verified (every row's directory is reported missing)
        what = "is not a directory" if root.exists() else "does not exist"
        raise MachinableError(f"storage {root} {what}, and the index lists no runs there")
    checkpoint = root / CHECKPOINT
    start_after = ""
    if resume and checkpoint.is_file():
        try:
            saved = json.loads(checkpoint.read_text())
            start_after = str(saved["last"])
            findings = [Finding(**item) for item in saved.get("findings", [])]
            checked = int(saved.get("checked", 0))
            unchecked = [str(u) for u in saved.get("unchecked", [])]
        except (ValueError, KeyError, TypeError):
            start_after = ""
        else:
            report.resumed_after = start_after
            report.findings, report.checked, report.unchecked = findings, checked, unchecked
    # One listing says which entries are plain directories (no stat per run); the few
    # that are not (links, files) are looked at one by one below.
    names: list[str] = []
    odd: set[str] = set()
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name <= start_after:
                    continue
                names.append(entry.name)
                if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                    odd.add(entry.name)
    except FileNotFoundError:
        pass
    names.sort()

    def note(target: str, kind: str, detail: str, fix: Any = None) -> None:
        finding = Finding(target, kind, detail)
        if repair and fix is not None:
            try:
                fix()
                finding.repaired = True
            except (MachinableError, OSError) as exc:
                finding.detail += f" (repair failed: {exc})"
        report.findings.append(finding)

    seen: set[str] = set()
    batch: list[str] = []
    # Runs checked per round of queries: PostgreSQL takes the names as one array
    # parameter, so a larger batch means fewer round trips; SQLite binds each name.
    size = max(1, min(1000 if index.dialect == "postgresql" else 500, CHECKPOINT_EVERY))
    saved_at = report.checked
    for name in track(names, total=len(names), description=f"verify {root}", show=progress):
        if name in odd:
            directory = root / name
            if directory.is_symlink():
                note(str(directory), "symlinked run directory", "a link, not a run directory: move the run here")
                continue
            if not directory.is_dir():
                continue
        if not is_uuid(name):
            note(str(root / name), "stray directory", "not named like a run uuid")
            continue
        seen.add(name)
        batch.append(name)
        if len(batch) >= size:
            _check_batch(index, root, batch, note, checksums, report)
            if report.checked - saved_at >= CHECKPOINT_EVERY:
                # only directories already checked are behind the checkpoint, and
                # what they showed is saved with it, so a resumed pass loses nothing
                saved = {
                    "last": batch[-1],
                    "checked": report.checked,
                    "findings": [asdict(f) for f in report.findings],
                    "unchecked": report.unchecked,
                }
                atomic_write(checkpoint, json.dumps(saved))
                saved_at = report.checked
            batch = []
    if batch:
        _check_batch(index, root, batch, note, checksums, report)

    # rows of directories that are gone (after a resumed pass too: seen or isdir is exact)
    prefix = str(root) + os.sep
    for directory, run_uuid in _located(index, str(root)):
        if directory.startswith(prefix) and directory[len(prefix) :] in seen or os.path.isdir(directory):
            continue
        with _settled(Path(directory)) as free:
            if free is False:  # an eviction under way: its lock is held
                report.in_flight.append(run_uuid)
                continue
            if os.path.isdir(directory) or not _still_located(index, run_uuid, directory):
                continue  # changed before the lock was ours: nothing is wrong
            note(
                run_uuid,
                "directory missing",
                f"indexed at {directory}, which is gone",
                lambda d=directory, u=run_uuid: _drop_missing(index, u, d),
            )
    for undone in index.unfinished_bulk_load():
        note(
            "index",
            "unfinished reindex",
            f"{undone} (a reindex was stopped between two batches); --repair or a reindex completes it",
            index.finish_bulk_load,
        )
    if checkpoint.exists():
        checkpoint.unlink()
    return report


def _located(index: Index, storage: str, page: int = 5000) -> Any:
    """(directory, run uuid) of every location in ``storage``, in directory order, page by page."""
    last = ("", "")
    while True:
        with index.engine.connect() as conn:
            rows = conn.execute(
                select(LOCATIONS.c.directory, LOCATIONS.c.run_uuid)
                .where(LOCATIONS.c.storage == storage, tuple_(LOCATIONS.c.directory, LOCATIONS.c.run_uuid) > last)
                .order_by(LOCATIONS.c.directory, LOCATIONS.c.run_uuid)
                .limit(page)
            ).all()
        yield from rows
        if len(rows) < page:
            return
        last = tuple(rows[-1])


def _among(column: Any, names: list[str], dialect: str) -> Any:
    """``column IN names``: one array parameter on PostgreSQL (a list of 500 parameters
    makes a new statement text, parsed again by the driver, for every batch)."""
    if dialect == "postgresql":
        return column == any_(bindparam(None, names, type_=postgresql.ARRAY(String)))
    return column.in_(names)


def _check_batch(index: Index, root: Path, names: list[str], note: Any, checksums: bool, report: VerifyReport) -> None:
    dialect = index.dialect
    with index.engine.connect() as conn:
        rows = {
            row["uuid"]: row
            for row in conn.execute(select(*_COMPARED).where(_among(RUNS.c.uuid, names, dialect))).mappings()
        }
        located = {
            (run_uuid, directory)
            for run_uuid, directory in conn.execute(
                select(LOCATIONS.c.run_uuid, LOCATIONS.c.directory).where(
                    _among(LOCATIONS.c.run_uuid, names, dialect)
                )
            )
        }
        conflicts: dict[str, list[tuple[str, str, str]]] = {}
        for run_uuid, store, state, theirs in conn.execute(
            select(AVAILABILITY.c.run_uuid, REMOTES.c.name, AVAILABILITY.c.state, AVAILABILITY.c.checksum)
            .join(REMOTES, REMOTES.c.id == AVAILABILITY.c.remote_id)
            .where(
                _among(AVAILABILITY.c.run_uuid, names, dialect),
                AVAILABILITY.c.state.in_(("present", "conflict")),
                AVAILABILITY.c.checksum.is_not(None),
            )
        ):
            conflicts.setdefault(run_uuid, []).append((store, state, theirs))
        stored: set[str] = set()
        if checksums:  # one query per batch, not one per run, for who has a store copy
            stored = set(
                conn.execute(
                    select(AVAILABILITY.c.run_uuid).where(
                        _among(AVAILABILITY.c.run_uuid, names, dialect), AVAILABILITY.c.state == "present"
                    )
                ).scalars()
            )
    for name in names:
        directory = root / name
        report.checked += 1
        pending: list[tuple[Any, ...]] = []
        if not _check_run(index, directory, name, rows.get(name), located, lambda *a, p=pending: p.append(a)):
            continue
        if pending:
            # Something looks wrong: look again with the run's lock held. A launch or an
            # eviction in another process holds it from start to finish, so a held lock
            # means in flight, and what is still wrong under the lock is a real problem.
            with _settled(directory) as free:
                if free is False:
                    report.in_flight.append(name)
                    continue
                if free is True:
                    row, here = _fresh_row(index, name)
                    _check_run(index, directory, name, row, here, note, holding=True)
                else:  # no run was ever launched here: no lock to look under
                    for finding in pending:
                        note(*finding)
        row = rows.get(name)
        for store, state, theirs in conflicts.get(name, []):
            recorded = row["digest"] if row is not None else None
            if state == "conflict" or (recorded is not None and theirs != recorded):
                ours = f"the run's digest is {recorded}" if recorded else "the local copy differs"
                note(name, "conflicting copy", f"{store} holds digest {theirs}; {ours}")
        if checksums:
            before = len(report.findings)
            if name not in stored or not _check_contents(index, directory, name, note):
                report.unchecked.append(name)
            if row is not None and len(report.findings) == before:  # no file named yet
                _check_digest(index, directory, name, row["digest"], note)


def _check_run(
    index: Index, directory: Path, name: str, row: Any, located: set[tuple[str, str]], note: Any, holding: bool = False
) -> bool:
    """Note what is wrong with one run directory; False when it is gone."""
    try:
        header, model, entries = read_record(directory)
    except RecordError as exc:
        note(str(directory), "invalid record", str(exc).replace(f"{directory}: ", ""))
        return True
    except FileNotFoundError:
        return False
    ingest = lambda d=directory: index.ingest_directory(d)  # noqa: E731
    disk_status = status_of(entries)
    if row is None:
        note(name, "not indexed", f"{directory} holds a run the index does not know", ingest)
    else:
        differing = [k for k in ("project", "module", "config_key", "predicate_key") if row[k] != header[k]]
        if differing:
            note(name, "identity collision", f"the index row has a different {', '.join(differing)}")
            return True
        if row["status"] != disk_status:
            expected = row_values(header, model, read_markers(directory, entries))["status"]
            note(name, "stale row", f"index says {row['status']!r}, the directory says {expected!r}", ingest)
        elif (name, str(directory)) not in located:
            note(name, "location missing", f"the index does not list {directory}", ingest)
    if disk_status == "started":
        try:
            if holding or _dead(directory):
                note(name, "dead run", "started but never finished, and no process holds its lock; relaunch it")
        except UnsafeFileError as exc:
            note(name, "unsafe lock", f"{exc}; remove it")
    return True


def _fresh_row(index: Index, name: str) -> tuple[Any, set[tuple[str, str]]]:
    with index.engine.connect() as conn:
        row = conn.execute(select(*_COMPARED).where(RUNS.c.uuid == name)).mappings().first()
        located = {
            (run_uuid, directory)
            for run_uuid, directory in conn.execute(
                select(LOCATIONS.c.run_uuid, LOCATIONS.c.directory).where(LOCATIONS.c.run_uuid == name)
            )
        }
    return row, located


def _still_located(index: Index, uuid: str, directory: str) -> bool:
    with index.engine.connect() as conn:
        return (
            conn.execute(
                select(LOCATIONS.c.id).where(LOCATIONS.c.run_uuid == uuid, LOCATIONS.c.directory == directory)
            ).first()
            is not None
        )


@contextlib.contextmanager
def _settled(directory: Path) -> Iterator[bool | None]:
    """Hold the run's launch lock if it is free: yields True while holding it, False
    when another process holds it, None when no run was ever launched in this storage."""
    path = directory.parent / LOCKS_DIR / f"{directory.name}.lock"
    if not path.parent.is_dir():
        yield None
        return
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except LockTimeout:
        yield False
        return
    except UnsafeFileError:  # a linked lock: nothing to look under; report what was seen
        yield None
        return
    try:
        yield True
    finally:
        lock.release()


def _dead(directory: Path) -> bool:
    """No process holds the run's launch lock (a linked lock file is an UnsafeFileError)."""
    path = directory.parent / LOCKS_DIR / f"{directory.name}.lock"
    if not path.parent.is_dir():
        return True
    return not is_held(path)


def _check_digest(index: Index, directory: Path, uuid: str, recorded: str | None, note: Any) -> None:
    """Compute the local copy's digest: record it when first computed, else compare."""
    try:
        digest = manifest_digest(build_manifest(directory))
    except FileNotFoundError:
        return
    if recorded is None:
        index.set_digest(uuid, digest, only_if_unset=True)
    elif digest != recorded:
        note(uuid, "content changed", f"the local copy has digest {digest}, the index recorded {recorded}")


def _check_contents(index: Index, directory: Path, uuid: str, note: Any) -> bool:
    """Compare local files with the manifest of a verified store copy; False if none."""

    for copy in copies(index, uuid):
        if copy.state != "present":
            continue
        try:
            raw = resolve_store(index, copy.url).read(uuid, [MANIFEST_NAME])[MANIFEST_NAME]
        except (StoreError, OSError):
            continue
        if raw is None:
            continue
        try:
            manifest = json.loads(raw)["files"]
        except (ValueError, KeyError, TypeError):
            continue
        for rel, entry in sorted(manifest.items()):
            path = directory / rel
            if not path.is_file():
                note(uuid, "file missing", f"{rel} is in the manifest of the copy in {copy.store} but not here")
            elif _sha256(str(path)) != entry.get("sha256"):
                note(uuid, "content changed", f"{rel} differs from the verified copy in {copy.store}")
        return True
    return False


def _drop_missing(index: Index, uuid: str, directory: str) -> None:
    """Forget a gone directory; drop the run too when no copy exists anywhere."""


    def write() -> None:
        with index.engine.execution_options(machinable_write=True).begin() as conn:
            conn.execute(
                delete(LOCATIONS).where(LOCATIONS.c.run_uuid == uuid, LOCATIONS.c.directory == directory)
            )
            others = conn.execute(select(LOCATIONS.c.directory).where(LOCATIONS.c.run_uuid == uuid)).scalars().all()
            stored = conn.execute(
                select(AVAILABILITY.c.id).where(AVAILABILITY.c.run_uuid == uuid, AVAILABILITY.c.state == "present")
            ).first()
            if not any(os.path.isdir(other) for other in others) and stored is None:
                conn.execute(delete(RUNS).where(RUNS.c.uuid == uuid))

    retry_busy(write)
