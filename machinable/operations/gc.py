"""Garbage collection: find what nothing needs, delete it only when asked.

Candidates are index rows with no copy anywhere, availability rows of copies that are
missing, temporary files left by killed writes, half-fetched directories, incomplete
store copies left by interrupted pushes, and (when asked) failed runs. A finished run's
data is never a candidate, so gc can never delete the last verified copy of a run.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from machinable.catalog.engine import retry_busy
from machinable.catalog.index import LOCATIONS, RUNS, Index
from machinable.errors import LockTimeout, MachinableError, StoreError, UnsafeFileError
from machinable.locks import FileLock
from machinable.record import LOCKS_DIR, TRASH_PREFIX, is_uuid, remove_record
from machinable.storage import Storage
from machinable.stores import AVAILABILITY, REMOTES, known_stores, resolve_store

_TEMP = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")
_PARTIAL = re.compile(r"^\.[0-9a-f]{32}\.partial-")
MIN_AGE_SECONDS = 600


class Kept(Exception):
    """Raised by a deletion that found, on its second look, that the item is needed."""


@dataclass
class Garbage:
    """One thing gc would delete (or did, or kept after a second look)."""

    kind: str
    target: str
    detail: str
    action: Any = field(repr=False, default=None)
    deleted: bool = False
    kept: str | None = None

    def __str__(self) -> str:
        if self.kept is not None:
            return f"kept {self.kind}: {self.target} ({self.detail}; {self.kept})"
        return f"{'deleted' if self.deleted else 'would delete'} {self.kind}: {self.target} ({self.detail})"


def collect(
    index: Index,
    storage: str | os.PathLike[str] | None = None,
    *,
    stores: bool = False,
    failed: bool = False,
) -> list[Garbage]:
    """List what nothing needs; nothing is deleted here."""

    root = Path(os.path.abspath(storage if storage is not None else Storage.get().directory()))
    if storage is not None and not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise MachinableError(f"storage {root} {what}")
    found: list[Garbage] = []

    with index.engine.connect() as conn:
        located = {u: d for u, d in conn.execute(select(LOCATIONS.c.run_uuid, LOCATIONS.c.directory))}
        present = set(
            conn.execute(select(AVAILABILITY.c.run_uuid).where(AVAILABILITY.c.state == "present")).scalars()
        )
        for uuid, module, status in conn.execute(select(RUNS.c.uuid, RUNS.c.module, RUNS.c.status)):
            if uuid not in located and uuid not in present:
                found.append(
                    Garbage("orphan row", uuid, f"{module}, {status}, no copy anywhere", lambda u=uuid: _drop_row(index, u))
                )
        for row_id, uuid, url, _state in conn.execute(
            select(AVAILABILITY.c.id, AVAILABILITY.c.run_uuid, REMOTES.c.url, AVAILABILITY.c.state)
            .join(REMOTES, REMOTES.c.id == AVAILABILITY.c.remote_id)
            .where(AVAILABILITY.c.state == "missing")
        ):
            found.append(
                Garbage("missing copy", uuid, f"{url} no longer has it", lambda i=row_id: _drop_availability(index, i))
            )
        if failed:
            for uuid, directory in conn.execute(
                select(RUNS.c.uuid, LOCATIONS.c.directory)
                .join(LOCATIONS, LOCATIONS.c.run_uuid == RUNS.c.uuid)
                .where(RUNS.c.status == "failed", LOCATIONS.c.storage == str(root))
            ):
                found.append(
                    Garbage("failed run", uuid, directory, lambda u=uuid, d=directory: _drop_failed(index, u, d, root))
                )

    if root.is_dir():
        for entry in os.scandir(root):
            if entry.name.startswith(TRASH_PREFIX) and entry.is_dir(follow_symlinks=False):
                found.append(Garbage("half-deleted directory", entry.path, "left by an interrupted evict or gc", lambda p=entry.path: shutil.rmtree(p)))
            elif _PARTIAL.match(entry.name) and entry.is_dir(follow_symlinks=False) and _old(entry.path):
                found.append(Garbage("half-fetched directory", entry.path, "left by an interrupted fetch", lambda p=entry.path: shutil.rmtree(p)))
            elif is_uuid(entry.name) and entry.is_dir(follow_symlinks=False):
                for temp in os.scandir(entry.path):
                    if _TEMP.match(temp.name) and temp.is_file(follow_symlinks=False) and _old(temp.path):
                        found.append(Garbage("temporary file", temp.path, "left by a killed write", lambda p=temp.path: os.unlink(p)))
        locks = root / LOCKS_DIR
        if locks.is_dir():
            for lock in os.scandir(locks):
                run_dir = root / lock.name.removesuffix(".lock")
                if not run_dir.is_dir():
                    found.append(Garbage("stale lock", lock.path, "its run directory is gone", lambda p=lock.path, d=run_dir: _drop_stale_lock(p, d)))

    if stores:

        for _name, url in known_stores(index):
            try:
                store = resolve_store(index, url)
                for uuid, _header, complete in store.headers():
                    if not complete and uuid not in present:
                        found.append(
                            Garbage("incomplete store copy", f"{url}/{uuid}", "no manifest: an interrupted push", lambda s=store, u=uuid: s.delete(u))
                        )
            except (StoreError, OSError) as exc:
                found.append(Garbage("unreachable store", url, f"not checked: {exc}"))
    return found


def _old(path: str) -> bool:
    """Leftovers younger than this may belong to a write or fetch still in progress."""
    try:
        return time.time() - os.lstat(path).st_mtime > MIN_AGE_SECONDS
    except FileNotFoundError:
        return False


def _drop_lock(path: str, run_dir: Path) -> str | None:
    """Delete a launch lock whose run directory is gone, unless a launch took it since.
    Returns why it was kept, or None."""

    if run_dir.is_dir():
        return "a launch created its run directory since the listing"
    if not os.path.lexists(path):
        return None  # gone already
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except LockTimeout:
        return "a launch holds it"
    except UnsafeFileError:
        if os.path.islink(path):
            os.unlink(path)  # removes the link itself, never what it points at
        return None
    try:
        if run_dir.is_dir():
            return "a launch created its run directory since the listing"
        os.unlink(path)
    finally:
        lock.release()
    return None


def _drop_stale_lock(path: str, run_dir: Path) -> None:
    reason = _drop_lock(path, run_dir)
    if reason is not None:
        raise Kept(reason)


def run(items: list[Garbage]) -> list[Garbage]:
    """Delete what ``collect`` found; each item says whether it was deleted."""
    for item in items:
        if item.action is None:
            continue
        try:
            item.action()
            item.deleted = True
        except Kept as kept:
            item.kept = str(kept)
        except FileNotFoundError:
            item.deleted = True
        except (MachinableError, OSError) as exc:
            item.detail += f"; not deleted: {exc}"
    return items


def _drop_row(index: Index, uuid: str) -> None:

    def write() -> None:
        with index.engine.execution_options(machinable_write=True).begin() as conn:
            if conn.execute(select(LOCATIONS.c.id).where(LOCATIONS.c.run_uuid == uuid)).first():
                raise Kept("a copy appeared since the listing")
            if conn.execute(
                select(AVAILABILITY.c.id).where(AVAILABILITY.c.run_uuid == uuid, AVAILABILITY.c.state == "present")
            ).first():
                raise Kept("a store copy appeared since the listing")
            conn.execute(delete(AVAILABILITY).where(AVAILABILITY.c.run_uuid == uuid))
            conn.execute(delete(RUNS).where(RUNS.c.uuid == uuid))

    retry_busy(write)


def _drop_availability(index: Index, row_id: int) -> None:

    def write() -> None:
        with index.engine.execution_options(machinable_write=True).begin() as conn:
            conn.execute(delete(AVAILABILITY).where(AVAILABILITY.c.id == row_id, AVAILABILITY.c.state == "missing"))

    retry_busy(write)


def _drop_failed(index: Index, uuid: str, directory: str, root: Path) -> None:

    if index.status(uuid) != "failed" or os.path.isfile(os.path.join(directory, "finished_at")):
        raise Kept("relaunched since the listing")
    path = Path(directory)
    if os.path.lexists(path):
        # The row may lie: only a record of this run directly under the storage goes.
        remove_record(path, uuid, root)
    index.drop_location(uuid, path)
    _drop_lock(str(path.parent / LOCKS_DIR / f"{path.name}.lock"), path)

    def write() -> None:
        with index.engine.execution_options(machinable_write=True).begin() as conn:
            conn.execute(delete(RUNS).where(RUNS.c.uuid == uuid, RUNS.c.status == "failed"))

    retry_busy(write)
