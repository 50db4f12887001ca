"""What runs do with stores: push, mirror, fetch, evict, whereis.

A run is a ``RunRef``: its uuid, the index that knows it and the storage directory it
belongs in. Nothing here imports user code or knows about ``Interface``; the user's
``run.push()``/``fetch()``/``evict()`` build a ``RunRef`` and call these functions, as
the CLI does for runs it knows by uuid alone.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import filelock

from machinable.errors import EvictionRefused, NotMountedError, StoreError
from machinable.progress import enabled
from machinable.record import SENTINEL, launch_lock
from machinable.stores import transfer
from machinable.stores.availability import Copy, copies, known_stores, record_copies, register
from machinable.stores.manifest import build_manifest, manifest_checksum
from machinable.stores.protocol import RemoteStore

if TYPE_CHECKING:
    from machinable.catalog.index import Index

VERIFY_WINDOW = timedelta(hours=24)


@dataclass
class RunRef:
    """A run known by uuid: the index that knows it and the storage it belongs in."""

    uuid: str
    index: Index
    storage: Path

    def default_directory(self) -> Path:
        """Where the run is written in its storage: ``<storage>/<uuid>``."""
        return self.storage / self.uuid

    def local_directory(self) -> Path:
        """The run's directory here: where it is stored, or where it will be."""
        default = self.default_directory()
        if os.path.isfile(os.path.join(default, SENTINEL)):
            return default
        found = self.index.local_directory(self.uuid)
        return found if found is not None else default

    def is_mounted(self) -> bool:
        return os.path.isfile(os.path.join(self.local_directory(), SENTINEL))


def resolve_store(index: Index, spec: RemoteStore | str) -> RemoteStore:
    """A store from an instance, a connected store's name or URL, or a known store."""
    if isinstance(spec, RemoteStore):
        return spec
    for store in reversed(RemoteStore.connected()):
        if spec in (store.name, store.url, store.uri):
            return store
    for name, url in known_stores(index):
        if spec in (name, url):
            return RemoteStore(url, name=name)
    if "://" in spec or os.path.isabs(spec):
        return RemoteStore(spec)
    raise StoreError(
        f"unknown store {spec!r}: give a URL (s3://bucket/prefix, file:///path) or the name of "
        "a store this index knows (machinable stores lists them)",
        store=spec,
    )


# What runs do with stores.


def push(index: Index, store: RemoteStore, runs: list[tuple[str, Path]], *, progress: bool | None = None) -> dict[str, transfer.TransferResult]:
    """Push local run directories to a store and record the verified copies."""
    remote_id = register(index, store)
    try:
        results = store.push(runs, progress=enabled(progress))
    except transfer.TransferError as error:
        _record_results(index, remote_id, error.results)
        record_copies(index, remote_id, {uuid: {"state": "partial"} for uuid in error.problems})
        raise
    _record_results(index, remote_id, results)
    return results


def _record_results(index: Index, remote_id: int, results: dict[str, transfer.TransferResult]) -> None:
    record_copies(
        index,
        remote_id,
        {
            uuid: {
                "state": result.state,
                "size": result.size,
                "checksum": result.checksum,
                "verified_at": result.verified_at,
            }
            for uuid, result in results.items()
        },
    )


def mirror(run: RunRef, directory: Path) -> None:
    """Push a just-finished run to every connected store (mirror-on-commit)."""
    for store in RemoteStore.connected():
        try:
            push(run.index, store, [(run.uuid, directory)], progress=False)
        except (StoreError, OSError) as exc:
            raise StoreError(
                f"run {run.uuid} finished and is stored locally, but mirroring it to {store.name} "
                f"failed: {exc}; retry with `machinable push {run.uuid} --to {store.uri}`",
                uuid=run.uuid,
                store=store.uri,
            ) from exc


def candidate_stores(index: Index, uuid: str, store: RemoteStore | str | None = None) -> list[RemoteStore]:
    if store is not None:
        return [resolve_store(index, store)]
    found: list[RemoteStore] = []
    seen: set[str] = set()
    for copy in copies(index, uuid):
        if copy.state == "present" and copy.url not in seen:
            seen.add(copy.url)
            found.append(resolve_store(index, copy.url))
    for connected in reversed(RemoteStore.connected()):
        if connected.uri not in seen:
            seen.add(connected.uri)
            found.append(connected)
    return found


def fetch(run: RunRef, store: RemoteStore | str | None = None, *, progress: bool | None = None) -> Path:
    """Bring a run's directory here from a store with a verified copy."""
    if run.is_mounted():
        return run.local_directory()
    index = run.index
    dest = run.default_directory()
    problems: list[str] = []
    for candidate in candidate_stores(index, run.uuid, store):
        try:  # a store that cannot be opened here (unknown protocol) must not stop the others
            remote_id = register(index, candidate)
            result = candidate.fetch([(run.uuid, dest)], progress=enabled(progress))[run.uuid]
        except (StoreError, OSError) as exc:
            problems.append(f"{candidate._name or candidate.url}: {exc}")
            continue
        _record_results(index, remote_id, {run.uuid: result})
        if index.status(run.uuid) is None:
            index.ingest_directory(dest)
        else:
            index.add_location(run.uuid, dest)
        return dest
    detail = "; ".join(problems) if problems else "no store is known to hold it"
    raise NotMountedError(
        f"cannot fetch run {run.uuid}: {detail}. Connect the store that has it "
        "(with RemoteStore(url): or `machinable pull UUID --from URL`)",
        uuid=run.uuid,
    )


def fetch_many(
    runs: list[RunRef], store: RemoteStore | str | None = None, *, progress: bool | None = None
) -> dict[str, Path]:
    """Fetch many evicted runs: one bulk transfer per store, then one run at a time
    (trying every store that may hold it) for whatever the bulk pass did not bring."""
    wanted = [run for run in runs if not run.is_mounted()]
    done: dict[str, Path] = {}
    if not wanted:
        return done
    index = wanted[0].index
    groups: dict[str, tuple[RemoteStore, list[RunRef]]] = {}
    for run in wanted:
        candidates = candidate_stores(index, run.uuid, store)
        if candidates:
            first = candidates[0]
            groups.setdefault(first.url, (first, []))[1].append(run)
    for candidate, members in groups.values():
        try:
            remote_id = register(index, candidate)
            results = candidate.fetch(
                [(run.uuid, run.default_directory()) for run in members], progress=enabled(progress)
            )
        except transfer.TransferError as error:
            results = error.results
        except (StoreError, OSError):
            continue
        _record_results(index, remote_id, results)
        for run in members:
            if run.uuid in results:
                dest = run.default_directory()
                if index.status(run.uuid) is None:
                    index.ingest_directory(dest)
                else:
                    index.add_location(run.uuid, dest)
                done[run.uuid] = dest
    for run in wanted:
        if run.uuid not in done:
            done[run.uuid] = fetch(run, store, progress=progress)
    return done


def evict(run: RunRef, *, max_age: timedelta = VERIFY_WINDOW) -> Path:
    """Delete the local copy once another copy is verified (within ``max_age``, or now)."""
    directory = run.local_directory()
    if not os.path.isfile(os.path.join(directory, SENTINEL)):
        raise NotMountedError(f"run {run.uuid} has no local copy to evict", uuid=run.uuid)
    if run.index.status(run.uuid) != "finished":
        raise EvictionRefused(
            f"run {run.uuid} is not finished; only finished runs can be evicted", uuid=run.uuid
        )
    index = run.index
    manifest = build_manifest(directory)
    if manifest.get("skipped"):
        raise EvictionRefused(
            f"run {run.uuid} has links that point outside its directory "
            f"({', '.join(manifest['skipped'])}); a store copy would not hold them",
            uuid=run.uuid,
        )
    checksum = manifest_checksum(manifest)
    now = datetime.now(timezone.utc)
    verified_copy = None
    for copy in copies(index, run.uuid):
        if (
            copy.state == "present"
            and copy.checksum == checksum
            and copy.verified_at is not None
            and now - copy.verified_at <= max_age
        ):
            verified_copy = copy
            break
    unreachable: list[str] = []
    if verified_copy is None:
        for candidate in candidate_stores(index, run.uuid):
            try:
                remote_id = register(index, candidate)
                state = candidate.verify(run.uuid, manifest)
            except (StoreError, OSError) as exc:
                unreachable.append(f"{candidate._name or candidate.url} could not be checked ({exc})")
                continue
            record_copies(
                index,
                remote_id,
                {
                    run.uuid: {
                        "state": state.state,
                        "size": state.size,
                        "checksum": state.checksum,
                        "verified_at": state.verified_at,
                    }
                },
            )
            if state.state == "present" and state.checksum == checksum:
                verified_copy = Copy(candidate.name, candidate.uri, "present", state.size, checksum, state.verified_at)
                break
    if verified_copy is None:
        hint = f" ({'; '.join(unreachable)}; connect it with its options to re-verify)" if unreachable else ""
        raise EvictionRefused(
            f"refusing to evict run {run.uuid}: no other copy with the same content is verified{hint}. "
            f"Make one first with `machinable push {run.uuid} --to <store URL>` (or run.push(store))",
            uuid=run.uuid,
        )
    # Under the run's launch lock: verify reports a run being evicted as in flight.
    with filelock.FileLock(launch_lock(Path(directory))):
        _remove_tree(directory)
        index.drop_location(run.uuid, directory)
    return directory


def _remove_tree(directory: Path) -> None:
    """Delete a run directory without following any link inside it."""
    if directory.is_symlink():
        directory.unlink()
        return
    shutil.rmtree(directory)


def whereis(run: RunRef) -> list[Copy]:
    """Every known copy of a run: the local one first, then each store's."""
    directory = run.local_directory()
    here = os.path.isfile(os.path.join(directory, SENTINEL))
    size = _tree_size(directory) if here else None
    local = Copy("local", str(directory), "present" if here else "evicted", size)
    return [local, *copies(run.index, run.uuid)]


def _tree_size(directory: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


