"""What runs do with stores: push, mirror, fetch, evict, whereis.

A run is a ``RunRef``: its uuid, the index that knows it and the storage directory it
belongs in. Nothing here imports user code or knows about ``Interface``; the user's
``run.push()``/``fetch()``/``evict()`` build a ``RunRef`` and call these functions, as
the CLI does for runs it knows by uuid alone.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from machinable.errors import CopyConflict, EvictionRefused, NotMountedError, StoreError
from machinable.progress import enabled
from machinable.record import SENTINEL, removal_problem, remove_record
from machinable.stores import transfer
from machinable.stores.availability import Copy, copies, known_stores, record_copies, register
from machinable.stores.manifest import build_manifest, manifest_digest
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
        _record_digests(index, error.results)
        record_copies(
            index,
            remote_id,
            {uuid: {"state": "partial"} for uuid in error.problems if uuid not in error.conflicts},
        )
        if error.conflicts:
            # The store's copy is complete, with other content: known as a conflict. The
            # local digest is not recorded, so that pulling the store's copy stays possible.
            record_copies(
                index,
                remote_id,
                {uuid: {"state": "conflict", "checksum": theirs} for uuid, (theirs, _) in error.conflicts.items()},
            )
            raise CopyConflict(
                f"{error} (see `machinable whereis UUID`; README, 'Trust', says how to resolve it)",
                uuid=error.uuid,
                store=store.uri,
                conflicts=error.conflicts,
            ) from error
        raise
    _record_results(index, remote_id, results)
    _record_digests(index, results)
    return results


def _record_digests(index: Index, results: dict[str, transfer.TransferResult]) -> None:
    """A verified copy of the local content: that is the run's digest now."""
    for uuid, result in results.items():
        index.set_digest(uuid, result.checksum)


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


def _fetch_checked(
    store: RemoteStore, items: list[tuple[str, Path]], digests: dict[str, str | None], progress: bool
) -> dict[str, transfer.TransferResult]:
    """``store.fetch`` that lands only copies with the recorded digests.

    The built-in backend checks the digest before downloading. A custom backend whose
    ``fetch`` predates the ``digests`` argument is checked after landing: a copy with
    other content is moved out of the storage again and refused.
    """
    if "digests" in inspect.signature(store.fetch).parameters:
        return store.fetch(items, progress=progress, digests=digests)
    results = store.fetch(items, progress=progress)
    for uuid, dest in items:
        expected = digests.get(uuid)
        if uuid not in results or expected is None:
            continue
        landed = manifest_digest(build_manifest(dest))
        if landed != expected:
            remove_record(dest, uuid, Path(dest).parent)
            raise StoreError(
                f"{store.name} delivered run {uuid} with digest {landed}, but the index recorded "
                f"digest {expected}: refused",
                uuid=uuid,
                store=store.uri,
            )
    return results


def fetch(run: RunRef, store: RemoteStore | str | None = None, *, progress: bool | None = None) -> Path:
    """Bring a run's directory here from a store with a verified copy."""

    if run.is_mounted():
        return run.local_directory()
    index = run.index
    dest = run.default_directory()
    problems: list[str] = []
    expected = index.digest(run.uuid)
    for candidate in candidate_stores(index, run.uuid, store):
        try:  # a store that cannot be opened here (unknown protocol) must not stop the others
            remote_id = register(index, candidate)
            result = _fetch_checked(candidate, [(run.uuid, dest)], {run.uuid: expected}, enabled(progress))[
                run.uuid
            ]
        except (StoreError, OSError) as exc:
            problems.append(f"{candidate._name or candidate.url}: {exc}")
            continue
        # The run's row first: the store's availability row refers to it (an index
        # that never knew the run would refuse it otherwise).
        _take_in(index, run.uuid, dest)
        _record_results(index, remote_id, {run.uuid: result})
        index.set_digest(run.uuid, result.checksum, only_if_unset=True)
        return dest
    detail = "; ".join(problems) if problems else "no store is known to hold it"
    raise NotMountedError(
        f"cannot fetch run {run.uuid}: {detail}. Connect the store that has it "
        "(with RemoteStore(url): or `machinable pull UUID --from URL`)",
        uuid=run.uuid,
    )


def _take_in(index: Index, uuid: str, directory: Path) -> None:
    """Index a fetched directory: a new row when the index does not know the run."""
    if index.status(uuid) is None:
        index.ingest_directory(directory)
    else:
        index.add_location(uuid, directory)


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
            results = _fetch_checked(
                candidate,
                [(run.uuid, run.default_directory()) for run in members],
                {run.uuid: index.digest(run.uuid) for run in members},
                enabled(progress),
            )
        except transfer.TransferError as error:
            results = error.results
        except (StoreError, OSError):
            continue
        for run in members:
            if run.uuid in results:
                dest = run.default_directory()
                _take_in(index, run.uuid, dest)
                done[run.uuid] = dest
        _record_results(index, remote_id, results)
        for uuid in done.keys() & results.keys():
            index.set_digest(uuid, results[uuid].checksum, only_if_unset=True)
    for run in wanted:
        if run.uuid not in done:
            done[run.uuid] = fetch(run, store, progress=progress)
    return done


def evict(run: RunRef, *, max_age: timedelta = VERIFY_WINDOW) -> Path:
    """Delete the local copy once a store holds a copy with the same digest.

    Checked now, at the moment of eviction: each candidate store's manifest is read
    again (its digest must equal the local copy's), and a copy last verified longer
    ago than ``max_age`` is re-verified file by file. The directory must be a record
    of this run directly under the storage root; it leaves in one rename.
    """
    directory = run.local_directory()
    if not os.path.isfile(os.path.join(directory, SENTINEL)):
        raise NotMountedError(f"run {run.uuid} has no local copy to evict", uuid=run.uuid)
    if run.index.status(run.uuid) != "finished":
        raise EvictionRefused(
            f"run {run.uuid} is not finished; only finished runs can be evicted", uuid=run.uuid
        )
    root = run.default_directory().parent
    problem = removal_problem(directory, run.uuid, root)
    if problem is not None:
        raise EvictionRefused(f"refusing to evict run {run.uuid}: {problem}", uuid=run.uuid)
    index = run.index
    manifest = build_manifest(directory)
    if manifest.get("skipped"):
        raise EvictionRefused(
            f"run {run.uuid} has links that point outside its directory "
            f"({', '.join(manifest['skipped'])}); a store copy would not hold them",
            uuid=run.uuid,
        )
    digest = manifest_digest(manifest)
    now = datetime.now(timezone.utc)
    recent = {
        copy.url: copy.verified_at
        for copy in copies(index, run.uuid)
        if copy.state == "present" and copy.checksum == digest and copy.verified_at is not None
    }
    verified_copy = None
    notes: list[str] = []
    for candidate in candidate_stores(index, run.uuid):
        try:
            remote_id = register(index, candidate)
            verified_at = recent.get(candidate.uri)
            state = None
            if verified_at is not None and now - verified_at <= max_age:
                # verified recently: the manifest, read again now, must still say so
                # (a custom backend without manifests is verified in full instead)
                try:
                    remote = candidate.manifest(run.uuid)
                except (StoreError, NotImplementedError):
                    remote = None
                if remote is not None:
                    theirs = manifest_digest(remote)
                    state = transfer.RemoteState(
                        "present" if theirs == digest else "conflict",
                        size=manifest["size"],
                        checksum=theirs,
                        verified_at=verified_at,
                    )
            if state is None:
                state = candidate.verify(run.uuid, manifest)
        except (StoreError, OSError) as exc:
            notes.append(f"{candidate._name or candidate.url} could not be checked ({exc})")
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
        if state.state == "present" and state.checksum == digest:
            verified_copy = Copy(candidate.name, candidate.uri, "present", state.size, digest, state.verified_at)
            break
        if state.checksum and state.checksum != digest:
            notes.append(f"{candidate.name} holds digest {state.checksum}")
    if verified_copy is None:
        hint = f" ({'; '.join(notes)})" if notes else ""
        raise EvictionRefused(
            f"refusing to evict run {run.uuid}: no store holds a verified copy with its digest "
            f"{digest}{hint}. Make one first with `machinable push {run.uuid} --to <store URL>` "
            "(or run.push(store))",
            uuid=run.uuid,
        )
    index.set_digest(run.uuid, digest)
    remove_record(directory, run.uuid, root)
    index.drop_location(run.uuid, directory)
    return directory


def whereis(run: RunRef) -> list[Copy]:
    """Every known copy of a run: the local one first, then each store's."""
    directory = run.local_directory()
    here = os.path.isfile(os.path.join(directory, SENTINEL))
    size = _tree_size(directory) if here else None
    recorded = run.index.digest(run.uuid)
    local = Copy("local", str(directory), "present" if here else "evicted", size, recorded)
    found = [
        replace(copy, state="conflict")
        if copy.state == "present" and recorded and copy.checksum and copy.checksum != recorded
        else copy
        for copy in copies(run.index, run.uuid)
    ]
    return [local, *found]


def _tree_size(directory: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


