"""Remote stores: mirror runs to any fsspec filesystem, evict safely, fetch back.

``RemoteStore(url, **storage_options)`` is a context: every run that finishes inside it
is also pushed to the store. The index's ``remotes`` and ``availability`` tables record
which store holds which run, in which state (present, partial, missing), with its size,
content checksum and when that was last verified; they can be rebuilt by listing the
stores. Credentials come from the environment or fsspec's configuration and are never
written to the index or to a record.

A backend that fsspec lacks subclasses ``RemoteStore`` and overrides the protocol
methods ``push``, ``fetch``, ``verify``, ``delete``, ``headers`` and ``read`` (and
``uri`` when it has no fsspec URL).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, func, select
from sqlalchemy.dialects import postgresql, sqlite

from machinable import transfer
from machinable.catalog.engine import retry_busy
from machinable.catalog.index import aware as _aware
from machinable.catalog.models import Availability, Remote
from machinable.context import Context, active
from machinable.errors import EvictionRefused, NotMountedError, StoreError
from machinable.record import SENTINEL

if TYPE_CHECKING:
    from machinable.catalog.index import Index
    from machinable.interface import Interface

REMOTES = Remote.__table__
AVAILABILITY = Availability.__table__
VERIFY_WINDOW = timedelta(hours=24)


class RemoteStore(Context):
    """A remote store for run data: an fsspec URL plus storage options."""

    def __init__(self, url: str, *, name: str | None = None, **storage_options: Any):
        if not isinstance(url, str) or not url:
            raise StoreError(f"a remote store needs a URL, not {url!r}")
        self.url = url
        self._name = name
        self.storage_options = storage_options
        self._opened: tuple[Any, str] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    @classmethod
    def connected(cls) -> list[RemoteStore]:
        """The stores connected as contexts, outermost first."""
        return active(RemoteStore)

    def _fs(self) -> tuple[Any, str]:
        if self._opened is None:
            try:
                # A fresh filesystem object per store: fsspec's instance cache would hand
                # back one made earlier with other credentials or environment.
                options = {"skip_instance_cache": True, **self.storage_options}
                self._opened = transfer.open_store(self.url, **options)
            except (ImportError, ValueError) as exc:
                raise StoreError(f"cannot open store {self.url!r}: {exc}", store=self.url) from exc
        return self._opened

    @property
    def uri(self) -> str:
        """Canonical URI of the store (protocol and root; never options or credentials)."""
        fs, root = self._fs()
        return transfer.store_uri(fs, root)

    @property
    def name(self) -> str:
        return self._name or self.uri

    # The protocol a custom backend implements.

    def push(self, items: list[tuple[str, Path]], *, progress: bool = False) -> dict[str, transfer.TransferResult]:
        """Copy run directories into the store, verified; returns each run's copy."""
        fs, root = self._fs()
        return transfer.push_runs(items, fs, root, progress=progress)

    def fetch(self, items: list[tuple[str, Path]], *, progress: bool = False) -> dict[str, transfer.TransferResult]:
        """Download runs to local directories that do not exist yet, verified."""
        fs, root = self._fs()
        return transfer.fetch_runs(items, fs, root, progress=progress)

    def verify(self, uuid: str, expected_manifest: dict | None = None) -> transfer.RemoteState:
        """Check the store's copy of a run by checksum."""
        fs, root = self._fs()
        return transfer.verify_remote(fs, root, uuid, expected_manifest)

    def delete(self, uuid: str) -> None:
        fs, root = self._fs()
        transfer.delete_remote(fs, root, uuid)

    def headers(self) -> Iterator[tuple[str, dict, bool]]:
        """(uuid, id.json, complete) for every run in the store."""
        fs, root = self._fs()
        return transfer.list_remote_headers(fs, root)

    def read(self, uuid: str, names: list[str]) -> dict[str, bytes | None]:
        """Small files of one run's copy (headers, markers); missing ones read as None."""
        fs, root = self._fs()
        paths = {name: transfer._join(root, uuid, name) for name in names}
        got = transfer._read_many(fs, list(paths.values()))
        return {name: got[path] for name, path in paths.items()}


@dataclass(frozen=True)
class Copy:
    """One known copy of a run: local or in a store."""

    store: str
    url: str
    state: str
    size: int | None = None
    checksum: str | None = None
    verified_at: datetime | None = None


@dataclass
class RunRef:
    """A run known by uuid alone (the CLI's view): no user code is imported."""

    uuid: str
    index: Index
    storage: Path

    def _default_directory(self) -> Path:
        return self.storage / self.uuid

    def local_directory(self) -> Path:
        found = self.index.local_directory(self.uuid)
        return found if found is not None else self._default_directory()

    def is_mounted(self) -> bool:
        return os.path.isfile(os.path.join(self.local_directory(), SENTINEL))


# Index bookkeeping.


def _insert(index: Index, table: Any) -> Any:
    return postgresql.insert(table) if index.dialect == "postgresql" else sqlite.insert(table)


def register(index: Index, store: RemoteStore) -> int:
    """The store's id in the index's ``remotes`` table (added on first use)."""
    uri, name = store.uri, store.name

    def write() -> int:
        with index.engine.execution_options(machinable_write=True).begin() as conn:
            found = conn.execute(select(REMOTES.c.id, REMOTES.c.name).where(REMOTES.c.url == uri)).first()
            if found is not None:
                return int(found[0])
            clash = conn.execute(select(REMOTES.c.url).where(REMOTES.c.name == name)).scalar()
            if clash is not None:
                raise StoreError(
                    f"a store named {name!r} is already registered for {clash}; pick another name",
                    store=uri,
                )
            return int(
                conn.execute(
                    REMOTES.insert().values(name=name, url=uri, created_at=datetime.now(timezone.utc))
                ).inserted_primary_key[0]
            )

    return retry_busy(write)


def record_copies(index: Index, remote_id: int, states: dict[str, dict[str, Any]]) -> None:
    """Upsert availability rows: {uuid: {state, size, checksum, verified_at}}."""
    if not states:
        return
    rows = [
        {
            "run_uuid": uuid,
            "remote_id": remote_id,
            "state": values["state"],
            "size": values.get("size"),
            "checksum": values.get("checksum"),
            "verified_at": values.get("verified_at"),
        }
        for uuid, values in states.items()
    ]

    def write() -> None:
        with index.engine.execution_options(machinable_write=True).begin() as conn:
            stmt = _insert(index, AVAILABILITY)
            # A listing says "present" without checksums: keep what an earlier
            # verification learned, unless the copy is no longer present.
            keep = {
                k: case(
                    (stmt.excluded.state == "present", func.coalesce(stmt.excluded[k], AVAILABILITY.c[k])),
                    else_=stmt.excluded[k],
                )
                for k in ("size", "checksum", "verified_at")
            }
            stmt = stmt.on_conflict_do_update(
                index_elements=[AVAILABILITY.c.run_uuid, AVAILABILITY.c.remote_id],
                set_={"state": stmt.excluded.state, **keep},
            )
            for start in range(0, len(rows), 2000):
                conn.execute(stmt, rows[start : start + 2000])

    retry_busy(write)


def copies(index: Index, uuid: str) -> list[Copy]:
    """Every store copy of a run the index knows of, most recently verified first."""
    with index.engine.connect() as conn:
        rows = conn.execute(
            select(
                REMOTES.c.name,
                REMOTES.c.url,
                AVAILABILITY.c.state,
                AVAILABILITY.c.size,
                AVAILABILITY.c.checksum,
                AVAILABILITY.c.verified_at,
            )
            .join(REMOTES, REMOTES.c.id == AVAILABILITY.c.remote_id)
            .where(AVAILABILITY.c.run_uuid == uuid)
        ).all()
    found = [
        Copy(name, url, state, size, checksum, _aware(verified))
        for name, url, state, size, checksum, verified in rows
    ]
    epoch = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(found, key=lambda c: (c.state != "present", -(c.verified_at or epoch).timestamp()))


def known_stores(index: Index) -> list[tuple[str, str]]:
    with index.engine.connect() as conn:
        return [(name, url) for name, url in conn.execute(select(REMOTES.c.name, REMOTES.c.url).order_by(REMOTES.c.id))]


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
    from machinable.progress import enabled

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


def mirror(run: Interface | RunRef, directory: Path) -> None:
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


def fetch(run: Interface | RunRef, store: RemoteStore | str | None = None, *, progress: bool | None = None) -> Path:
    """Bring a run's directory here from a store with a verified copy."""
    from machinable.progress import enabled

    if run.is_mounted():
        return run.local_directory()
    index = run.index
    dest = run._default_directory()
    problems: list[str] = []
    for candidate in candidate_stores(index, run.uuid, store):
        try:  # a store that cannot be opened here (unknown protocol) must not stop the others
            remote_id = register(index, candidate)
            result = candidate.fetch([(run.uuid, dest)], progress=enabled(progress))[run.uuid]
        except (StoreError, OSError) as exc:
            problems.append(f"{candidate._name or candidate.url}: {exc}")
            continue
        # The run's row first: the store's availability row refers to it (an index
        # that never knew the run would refuse it otherwise).
        _take_in(index, run.uuid, dest)
        _record_results(index, remote_id, {run.uuid: result})
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
    runs: list[Interface | RunRef], store: RemoteStore | str | None = None, *, progress: bool | None = None
) -> dict[str, Path]:
    """Fetch many evicted runs: one bulk transfer per store, then one run at a time
    (trying every store that may hold it) for whatever the bulk pass did not bring."""
    from machinable.progress import enabled

    wanted = [run for run in runs if not run.is_mounted()]
    done: dict[str, Path] = {}
    if not wanted:
        return done
    index = wanted[0].index
    groups: dict[str, tuple[RemoteStore, list[Interface | RunRef]]] = {}
    for run in wanted:
        candidates = candidate_stores(index, run.uuid, store)
        if candidates:
            first = candidates[0]
            groups.setdefault(first.url, (first, []))[1].append(run)
    for candidate, members in groups.values():
        try:
            remote_id = register(index, candidate)
            results = candidate.fetch(
                [(run.uuid, run._default_directory()) for run in members], progress=enabled(progress)
            )
        except transfer.TransferError as error:
            results = error.results
        except (StoreError, OSError):
            continue
        for run in members:
            if run.uuid in results:
                dest = run._default_directory()
                _take_in(index, run.uuid, dest)
                done[run.uuid] = dest
        _record_results(index, remote_id, results)
    for run in wanted:
        if run.uuid not in done:
            done[run.uuid] = fetch(run, store, progress=progress)
    return done


def evict(run: Interface | RunRef, *, max_age: timedelta = VERIFY_WINDOW) -> Path:
    """Delete the local copy once another copy is verified (within ``max_age``, or now)."""
    directory = run.local_directory()
    if not os.path.isfile(os.path.join(directory, SENTINEL)):
        raise NotMountedError(f"run {run.uuid} has no local copy to evict", uuid=run.uuid)
    if run.index.status(run.uuid) != "finished":
        raise EvictionRefused(
            f"run {run.uuid} is not finished; only finished runs can be evicted", uuid=run.uuid
        )
    index = run.index
    manifest = transfer.build_manifest(directory)
    if manifest.get("skipped"):
        raise EvictionRefused(
            f"run {run.uuid} has links that point outside its directory "
            f"({', '.join(manifest['skipped'])}); a store copy would not hold them",
            uuid=run.uuid,
        )
    checksum = transfer.manifest_checksum(manifest)
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
    _remove_tree(directory)
    index.drop_location(run.uuid, directory)
    return directory


def _remove_tree(directory: Path) -> None:
    """Delete a run directory without following any link inside it."""
    if directory.is_symlink():
        directory.unlink()
        return
    shutil.rmtree(directory)


def whereis(run: Interface | RunRef) -> list[Copy]:
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


def reindex_store(index: Index, store: RemoteStore) -> dict[str, int]:
    """Rebuild the availability rows of one store by listing its id.json headers.

    Runs the index does not know yet are added from the store's model.json and markers
    (without a local location: they are evicted here until fetched).
    """
    from machinable.catalog.index import row_values
    from machinable.record import MODEL_FILE, parse_timestamp, validate_headers

    remote_id = register(index, store)
    listed = list(store.headers())
    unknown = [uuid for uuid, _, _ in listed if index.status(uuid) is None]
    headers = {uuid: header for uuid, header, _ in listed}
    added = 0
    rows = []
    for uuid in unknown:
        names = [MODEL_FILE, "started_at", "finished_at", "failed_at", "updated_at"]
        raw = store.read(uuid, names)
        try:
            model = json.loads(raw[MODEL_FILE] or b"null")
        except ValueError:
            continue
        if validate_headers(headers[uuid], model, uuid):
            continue
        markers = {
            name: parse_timestamp(raw[name].decode("utf-8", "replace"))
            for name in names[1:]
            if raw.get(name) is not None
        }
        rows.append(row_values(headers[uuid], model, markers))
    if rows:
        index.add_rows(rows)
        added = len(rows)
    valid = {row["uuid"] for row in rows} | {uuid for uuid, _, _ in listed if uuid not in unknown}
    states = {
        uuid: {"state": "present" if complete else "partial"}
        for uuid, _, complete in listed
        if uuid in valid
    }
    record_copies(index, remote_id, states)
    return {"listed": len(listed), "added": added, "present": sum(1 for s in states.values() if s["state"] == "present")}
