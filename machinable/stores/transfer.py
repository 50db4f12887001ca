"""Verified, bulk transfer of run directories to and from remote stores.

A remote store is any fsspec filesystem plus a root path. A run lives in the store at
``<root>/<uuid>/`` holding the run's files, and ``<root>/<uuid>/.manifest.json``, which
is written last and only after every file was verified against the manifest. A copy
without a manifest, or whose files disagree with it, is *partial*; no directory at all
is *missing*. Only a copy whose files match its manifest is *present*.

This module is the pure transfer layer: it knows nothing about the index. It moves many
runs with one bulk ``put``/``get`` call (which async filesystems such as s3fs run
concurrently), verifies by checksum (the S3 ETag of a single-part upload is the md5 of
the object; other filesystems are read back and hashed) and lands fetched runs under a
temporary sibling name that is renamed into place only after every byte was checked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import posixpath
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec
from fsspec.callbacks import Callback

from machinable.errors import StoreError
from machinable.locks import FileLock
from machinable.progress import transfer_callback
from machinable.record import SENTINEL
from machinable.settings import kill_at, kill_point
from machinable.stores.manifest import (
    CHUNK,
    MANIFEST_NAME,
    hash_file,
    header_problems,
    manifest_bytes,
    manifest_digest,
    manifest_problems,
    now,
    scan_directory,
)

PARTIAL_MARKER = ".partial-"
LOCK_NAME = ".machinable-transfer.lock"

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_MD5_HEX = re.compile(r"[0-9a-f]{32}")
_GLOB = re.compile(r"[*?\[]")
_LIST_CONCURRENCY = 64
ROOT_LISTING_MIN_RUNS = 32


@dataclass
class TransferResult:
    """Outcome of moving one run: the copy it left behind and when it was verified."""

    uuid: str
    state: str
    size: int
    checksum: str
    verified_at: datetime | None


@dataclass
class RemoteState:
    """What a store holds for one run: present, partial or missing, and why."""

    state: str
    size: int | None = None
    checksum: str | None = None
    verified_at: datetime | None = None
    problems: list[str] = field(default_factory=list)


class TransferError(StoreError):
    """Some runs of a bulk transfer failed; ``results`` holds those that succeeded."""

    def __init__(
        self,
        message: str,
        *,
        results: dict[str, TransferResult],
        problems: dict[str, list[str]],
        store: str | None = None,
        conflicts: dict[str, tuple[str, str]] | None = None,
    ) -> None:
        failed = sorted(problems)
        super().__init__(message, uuid=failed[0] if len(failed) == 1 else None, store=store)
        self.results = results
        self.problems = problems
        #: uuid -> (the store's digest, this copy's digest) for copies left untouched
        self.conflicts = dict(conflicts or {})


# -- stores -----------------------------------------------------------------------------


def open_store(url: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem and root path of a store URL plus fsspec storage options."""
    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    return fs, _normalize_root(fs, root)


def store_uri(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """Return the canonical URI of a store (protocol plus root, no options)."""
    return fs.unstrip_protocol(_normalize_root(fs, root))


def _normalize_root(fs: fsspec.AbstractFileSystem, root: str) -> str:
    root = fs._strip_protocol(root)
    stripped = root.rstrip("/")
    if stripped:
        return stripped
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "memory" in protocols or root.startswith("/"):
        return "/"
    return stripped


def join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts) if root else posixpath.join(*parts)


def _check_uuid(uuid: str) -> str:
    if not isinstance(uuid, str) or not _NAME.fullmatch(uuid) or uuid in (".", ".."):
        raise StoreError(f"{uuid!r} is not a valid run directory name", uuid=str(uuid))
    return uuid


# -- remote listing and checks -----------------------------------------------------------


def _is_async(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(getattr(fs, "async_impl", False)) and hasattr(fs, "_find")


def _use_root_listing(fs: fsspec.AbstractFileSystem, root: str, runs: int, files: int) -> bool:
    """Decide whether one listing of the whole root is cheaper than one listing per run.

    A root listing pages through every object in the store (1,000 a request on S3) while
    per-run listings cost one concurrent request each. Only worth it on object stores, for
    many runs, when the store is not much bigger than what is being transferred; the size
    of the store is estimated from one delimited listing of its run directories.
    """
    if not _is_async(fs) or runs < ROOT_LISTING_MIN_RUNS:
        return False
    fs.invalidate_cache(root)
    try:
        stored_runs = len(fs.ls(root, detail=False))
    except FileNotFoundError:
        return True
    finally:
        fs.invalidate_cache(root)
    files_per_run = max(1, files // runs)
    return stored_runs * files_per_run / 1000 <= runs / 16


def _list_runs(
    fs: fsspec.AbstractFileSystem, root: str, uuids: Iterable[str], *, whole_root: bool = False
) -> dict[str, dict[str, dict]]:
    """List each run directory once: {uuid: {relpath: info}} (files only, fresh)."""
    uuids = list(dict.fromkeys(uuids))
    paths = {uuid: join(root, uuid) for uuid in uuids}
    for path in paths.values():
        fs.invalidate_cache(path)
    if whole_root:
        fs.invalidate_cache(root)
        try:
            everything = fs.find(root, detail=True)
        except FileNotFoundError:
            everything = {}
        prefix = root.rstrip("/") + "/" if root else ""
        listed: dict[str, Any] = {uuid: {} for uuid in uuids}
        for name, info in everything.items():
            name = fs._strip_protocol(name)
            uuid = name[len(prefix) :].split("/", 1)[0] if name.startswith(prefix) else None
            if uuid in listed:
                listed[uuid][name] = info
    elif _is_async(fs):

        async def gather() -> list[Any]:
            limit = asyncio.Semaphore(_LIST_CONCURRENCY)

            async def one(path: str) -> Any:
                async with limit:
                    return await fs._find(path, detail=True)

            return await asyncio.gather(
                *(one(paths[uuid]) for uuid in uuids), return_exceptions=True
            )

        listed = dict(zip(uuids, fsspec.asyn.sync(fs.loop, gather), strict=True))
    else:
        listed = {}
        for uuid in uuids:
            try:
                listed[uuid] = fs.find(paths[uuid], detail=True)
            except Exception as exc:  # reported per run below
                listed[uuid] = exc
    out: dict[str, dict[str, dict]] = {}
    for uuid, found in listed.items():
        if isinstance(found, FileNotFoundError):
            found = {}
        elif isinstance(found, BaseException):
            raise StoreError(
                f"cannot list run {uuid} in {store_uri(fs, root)}: {found}",
                uuid=uuid,
                store=store_uri(fs, root),
            ) from found
        prefix = paths[uuid].rstrip("/") + "/"
        entries = {}
        for name, info in found.items():
            name = fs._strip_protocol(name)
            if info.get("type", "file") != "file" or not name.startswith(prefix):
                continue
            entries[name[len(prefix) :]] = info
        out[uuid] = entries
    return out


def read_many(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, bytes | None]:
    """Read many small files in one batched call; a missing file reads as None."""
    if not paths:
        return {}
    for path in paths:
        fs.invalidate_cache(path)
    got = fs.cat(list(paths), on_error="return")
    if not isinstance(got, dict):  # a single path may come back bare
        got = {paths[0]: got}
    out: dict[str, bytes | None] = {}
    for path in paths:
        value = got.get(path, got.get(fs._strip_protocol(path), FileNotFoundError(path)))
        if isinstance(value, FileNotFoundError):
            out[path] = None
        elif isinstance(value, BaseException):
            raise StoreError(f"cannot read {fs.unstrip_protocol(path)}: {value}") from value
        else:
            out[path] = value
    return out


def _parse_manifest(data: bytes | None) -> tuple[dict | None, list[str]]:
    if data is None:
        return None, ["no manifest: the copy is incomplete"]
    try:
        manifest = json.loads(data)
    except ValueError:
        return None, ["manifest is not valid JSON"]
    problems = manifest_problems(manifest)
    return (manifest if not problems else None), problems


def _info_md5(info: dict) -> str | None:
    """Return the md5 a filesystem reports for an object, if it reports one cheaply."""
    etag = info.get("ETag") or info.get("etag")
    if isinstance(etag, str):
        etag = etag.strip('"').lower()
        if _MD5_HEX.fullmatch(etag):
            return etag
    md5_b64 = info.get("md5Hash")  # gcsfs
    if isinstance(md5_b64, str):
        with contextlib.suppress(ValueError):
            return base64.b64decode(md5_b64).hex()
    return None


def _remote_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    sha = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _file_problems(
    fs: fsspec.AbstractFileSystem, run_path: str, files: dict, listing: dict[str, dict]
) -> tuple[list[str], list[str]]:
    """Compare a run's remote files with a files map: (problems, extra relpaths)."""
    problems: list[str] = []
    for rel, entry in files.items():
        info = listing.get(rel)
        if info is None:
            problems.append(f"{rel}: missing")
            continue
        if info.get("size") != entry["size"]:
            problems.append(f"{rel}: size {info.get('size')} != {entry['size']}")
            continue
        if _info_md5(info) == entry.get("md5"):
            continue
        # no cheap checksum (or an ETag that is not a plain md5): read it back
        try:
            digest = _remote_sha256(fs, join(run_path, rel))
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            continue
        if digest != entry["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    extras = sorted(rel for rel in listing if rel != MANIFEST_NAME and rel not in files)
    return problems, extras


def verify_remote(
    fs: fsspec.AbstractFileSystem, root: str, uuid: str, expected_manifest: dict | None = None
) -> RemoteState:
    """Check a run's copy in a store, file by file, against the store's own manifest.

    ``checksum`` of the result is the copy's digest. With ``expected_manifest`` (the
    local copy's), a complete copy with another digest is a ``conflict``.
    """
    _check_uuid(uuid)
    root = _normalize_root(fs, root)
    run_path = join(root, uuid)
    listing = _list_runs(fs, root, [uuid])[uuid]
    if not listing:
        return RemoteState(state="missing", problems=["no copy in the store"])
    manifest_path = join(run_path, MANIFEST_NAME)
    remote, problems = _parse_manifest(read_many(fs, [manifest_path])[manifest_path])
    if remote is None:
        return RemoteState("partial", problems=problems)
    digest = manifest_digest(remote)
    size = sum(e["size"] for e in remote["files"].values())
    file_problems, extras = _file_problems(fs, run_path, remote["files"], listing)
    problems += file_problems + [f"{rel}: not in the manifest" for rel in extras]
    if problems:
        return RemoteState("partial", size=size, checksum=digest, problems=problems)
    if expected_manifest is not None and manifest_digest(expected_manifest) != digest:
        return RemoteState(
            "conflict",
            size=size,
            checksum=digest,
            verified_at=now(),
            problems=[f"the store's copy has digest {digest}, this copy {manifest_digest(expected_manifest)}"],
        )
    return RemoteState("present", size=size, checksum=digest, verified_at=now())


def read_manifest(fs: fsspec.AbstractFileSystem, root: str, uuid: str) -> dict | None:
    """The store's manifest of a run, read now (None when missing or unreadable)."""
    _check_uuid(uuid)
    root = _normalize_root(fs, root)
    path = join(root, uuid, MANIFEST_NAME)
    manifest, _ = _parse_manifest(read_many(fs, [path])[path])
    return manifest


# -- push -------------------------------------------------------------------------------


def push_runs(
    items: list[tuple[str, Path]],
    fs: fsspec.AbstractFileSystem,
    root: str,
    *,
    progress: bool = False,
    verify: bool = True,
) -> dict[str, TransferResult]:
    """Copy run directories to a store in bulk, verify them, then write their manifests.

    A complete copy in the store (a valid manifest) is never changed: one with the same
    digest is kept as it is, one with another digest is a conflict (``TransferError``
    with ``conflicts``). A run whose directory vanished (evicted meanwhile) is left out
    of the results; a run whose headers are not files inside it is refused.
    """
    root = _normalize_root(fs, root)
    uri = store_uri(fs, root)
    uuids = [_check_uuid(uuid) for uuid, _ in items]
    if len(set(uuids)) != len(uuids):
        raise ValueError("push_runs got the same uuid twice")
    sources = {uuid: Path(path) for uuid, path in items}
    problems: dict[str, list[str]] = {}
    scanned: dict[str, tuple[dict, dict[str, Path]]] = {}
    for uuid in uuids:
        try:
            scanned[uuid] = scan_directory(sources[uuid])
        except FileNotFoundError:
            continue  # evicted or moved since it was listed: nothing to push
        missing = header_problems(scanned[uuid][0])
        if missing:
            problems[uuid] = missing
    uuids = [uuid for uuid in uuids if uuid in scanned and uuid not in problems]
    manifests = {uuid: scanned[uuid][0] for uuid in uuids}
    digests = {uuid: manifest_digest(manifests[uuid]) for uuid in uuids}
    manifest_paths = {uuid: join(root, uuid, MANIFEST_NAME) for uuid in uuids}

    files = sum(len(manifest["files"]) for manifest in manifests.values())
    whole_root = _use_root_listing(fs, root, len(uuids), files)

    # runs whose store copy already claims this exact content need no upload
    landed: dict[str, set[str]] = {}
    if whole_root:
        before = _list_runs(fs, root, uuids, whole_root=True)
        claimants = [manifest_paths[uuid] for uuid in uuids if MANIFEST_NAME in before[uuid]]
        existing = dict.fromkeys(manifest_paths.values()) | read_many(fs, claimants)
        # files an interrupted push already landed intact (by ETag) need not go again
        for uuid in uuids:
            landed[uuid] = {
                rel
                for rel, entry in manifests[uuid]["files"].items()
                if (info := before[uuid].get(rel)) is not None
                and info.get("size") == entry["size"]
                and _info_md5(info) == entry["md5"]
            }
    else:
        existing = read_many(fs, list(manifest_paths.values()))
    claimed: dict[str, dict] = {}
    conflicts: dict[str, tuple[str, str]] = {}
    stale: list[str] = []
    for uuid in uuids:
        data = existing[manifest_paths[uuid]]
        if data is None:
            continue
        remote, found = _parse_manifest(data)
        if found or remote is None:
            stale.append(uuid)  # an unreadable manifest: the copy is incomplete
        elif manifest_digest(remote) == digests[uuid]:
            claimed[uuid] = remote
        else:
            conflicts[uuid] = (manifest_digest(remote), digests[uuid])
    uuids = [uuid for uuid in uuids if uuid not in conflicts]
    # a manifest that cannot be read must go before any file changes under it
    _remove(fs, [manifest_paths[uuid] for uuid in stale])

    results: dict[str, TransferResult] = {}
    to_upload = [uuid for uuid in uuids if uuid not in claimed]
    verified: dict[str, datetime | None] = {}
    for attempt in range(2):
        to_upload = _upload_present(fs, root, to_upload, scanned, sources, progress, landed if attempt == 0 else {})
        uuids = [uuid for uuid in uuids if uuid in to_upload or uuid in claimed or uuid in verified]
        if not verify:
            verified.update({uuid: None for uuid in uuids})
            break
        check = to_upload + [uuid for uuid in claimed if uuid not in verified]
        listings = _list_runs(fs, root, check, whole_root=whole_root)
        retry: list[str] = []
        extras: list[str] = []
        for uuid in check:
            run_path = join(root, uuid)
            # a claimed copy is checked against its own manifest, and never changed
            reference = claimed[uuid]["files"] if uuid in claimed else manifests[uuid]["files"]
            found, extra = _file_problems(fs, run_path, reference, listings[uuid])
            if not found:
                # files outside the copy's manifest (stale uploads, intruders) are no part
                # of its content: removing them repairs the copy, never changes its digest
                extras += [join(run_path, rel) for rel in extra]
                verified[uuid] = now()
                problems.pop(uuid, None)
            elif uuid in claimed and attempt == 0:
                # the store claimed this content but does not hold it: upload it again
                del claimed[uuid]
                retry.append(uuid)
            else:
                problems[uuid] = found
        # files the run no longer has (deleted locally since an earlier push) go too
        _remove(fs, extras + [manifest_paths[uuid] for uuid in retry])
        to_upload = retry
        if not retry:
            break

    fresh = {
        manifest_paths[uuid]: manifest_bytes(uuid, manifests[uuid])
        for uuid in uuids
        if uuid in verified and uuid not in claimed
    }
    if fresh:
        fs.pipe(fresh)
    for uuid in uuids:
        if uuid in verified:
            results[uuid] = TransferResult(
                uuid=uuid,
                state="present",
                size=manifests[uuid]["size"],
                checksum=digests[uuid],
                verified_at=verified[uuid],
            )
    if problems or conflicts:
        lines = [
            f"conflict: {uri} holds a complete copy of run {uuid} with digest {theirs}, "
            f"this copy has digest {ours}; nothing in the store was changed"
            for uuid, (theirs, ours) in sorted(conflicts.items())
        ]
        if problems:
            detail = "; ".join(f"{uuid}: {', '.join(p[:3])}" for uuid, p in sorted(problems.items()))
            lines.append(f"{len(problems)} run(s) could not be pushed to {uri} and verified: {detail}")
        raise TransferError(
            "; ".join(lines),
            results=results,
            problems={**problems, **{uuid: ["conflict"] for uuid in conflicts}},
            store=uri,
            conflicts=conflicts,
        )
    return results


def _upload_present(
    fs: fsspec.AbstractFileSystem,
    root: str,
    uuids: list[str],
    scanned: dict[str, tuple[dict, dict[str, Path]]],
    sources: dict[str, Path],
    progress: bool,
    skip: dict[str, set[str]],
) -> list[str]:
    """Upload, leaving out runs whose directory vanished meanwhile; returns the rest."""
    while True:
        try:
            _upload(fs, root, uuids, scanned, progress, skip)
            return uuids
        except FileNotFoundError:
            # An eviction moves a run's directory away in one rename: those runs have
            # a verified copy elsewhere, so the push goes on without them.
            gone = {uuid for uuid in uuids if not os.path.isfile(sources[uuid] / SENTINEL)}
            if not gone:
                raise
            uuids = [uuid for uuid in uuids if uuid not in gone]
def _with_kill_point(callback: Callback, name: str) -> Callback:
    """The callback itself, unless a test asked to be killed after ``name:N`` files."""
    if kill_at() is None:
        return callback
    return _CountingCallback(callback, name)


class _CountingCallback(Callback):
    """Forwards to ``inner`` and passes kill_point(name, files done) after each file."""

    def __init__(self, inner: Callback, name: str) -> None:
        super().__init__()
        self._inner, self._name = inner, name

    def set_size(self, size: int) -> None:
        self._inner.set_size(size)
        super().set_size(size)

    def relative_update(self, inc: int = 1) -> None:
        self._inner.relative_update(inc)
        super().relative_update(inc)
        kill_point(self._name, self.value)

    def branched(self, path_1: str, path_2: str, **kwargs: Any) -> Any:
        return self._inner.branched(path_1, path_2, **kwargs)


def _remove(fs: fsspec.AbstractFileSystem, paths: list[str]) -> None:
    """Delete files in bulk (one request per 1,000 keys on S3)."""
    if not paths:
        return
    plain = [p for p in paths if not _GLOB.search(p)]
    if plain:
        fs.rm(plain)
    for path in paths:
        if _GLOB.search(path):  # a glob character in a file name: no expansion
            fs.rm_file(path)
    for path in paths:
        fs.invalidate_cache(path)


def _upload(
    fs: fsspec.AbstractFileSystem,
    root: str,
    uuids: list[str],
    scanned: dict[str, tuple[dict, dict[str, Path]]],
    progress: bool,
    skip: dict[str, set[str]],
) -> None:
    """Put the files of many runs with one bulk call."""
    local: list[str] = []
    remote: list[str] = []
    for uuid in uuids:
        for rel, source in scanned[uuid][1].items():
            if rel in skip.get(uuid, ()):
                continue
            local.append(os.fspath(source))
            remote.append(join(root, uuid, rel))
    if not local:
        return
    if not _is_async(fs):
        # object stores need no directories; file-like ones do
        for parent in sorted({posixpath.dirname(path) for path in remote}):
            fs.makedirs(parent, exist_ok=True)
    with transfer_callback(progress, f"push {len(uuids)} run(s)") as callback:
        try:
            fs.put(local, remote, callback=_with_kill_point(callback, "push-file"))
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise StoreError(
                f"upload to {store_uri(fs, root)} failed: {exc}", store=store_uri(fs, root)
            ) from exc
    for path in {posixpath.dirname(path) for path in remote}:
        fs.invalidate_cache(path)


# -- fetch ------------------------------------------------------------------------------


def fetch_run(
    fs: fsspec.AbstractFileSystem, root: str, uuid: str, dest: Path, *, progress: bool = False
) -> TransferResult:
    """Download one run into dest (which must not exist), verified, landing atomically."""
    try:
        return fetch_runs([(uuid, Path(dest))], fs, root, progress=progress)[uuid]
    except TransferError as error:
        raise StoreError(
            f"cannot fetch run {uuid} from {error.store}: {'; '.join(error.problems[uuid])}",
            uuid=uuid,
            store=error.store,
        ) from error


def fetch_runs(
    items: list[tuple[str, Path]],
    fs: fsspec.AbstractFileSystem,
    root: str,
    *,
    progress: bool = False,
    digests: dict[str, str | None] | None = None,
) -> dict[str, TransferResult]:
    """Download many runs with one bulk get; each lands at its dest only once verified.

    ``digests`` holds the digest the index recorded for a run: a store copy whose
    manifest describes other content is refused before anything is downloaded (its
    files are then checked against that manifest, so the bytes match the digest).
    """
    root = _normalize_root(fs, root)
    uri = store_uri(fs, root)
    dests = {_check_uuid(uuid): Path(dest) for uuid, dest in items}
    if len(dests) != len(items):
        raise ValueError("fetch_runs got the same uuid twice")
    for uuid, dest in dests.items():
        if os.path.lexists(dest):
            raise FileExistsError(f"cannot fetch run {uuid}: {dest} already exists")

    manifest_paths = {uuid: join(root, uuid, MANIFEST_NAME) for uuid in dests}
    raw = read_many(fs, list(manifest_paths.values()))
    manifests: dict[str, dict] = {}
    for uuid in dests:
        manifest, problems = _parse_manifest(raw[manifest_paths[uuid]])
        if manifest is None:
            raise StoreError(
                f"{uri} has no complete copy of run {uuid} ({'; '.join(problems)})",
                uuid=uuid,
                store=uri,
            )
        expected = (digests or {}).get(uuid)
        if expected is not None and manifest_digest(manifest) != expected:
            raise StoreError(
                f"{uri} holds run {uuid} with digest {manifest_digest(manifest)}, but the index "
                f"recorded digest {expected}: refusing a copy with other content",
                uuid=uuid,
                store=uri,
            )
        manifests[uuid] = manifest

    with contextlib.ExitStack() as stack:
        for parent in sorted({dest.parent for dest in dests.values()}):
            parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_parent_lock(parent))
        for uuid, dest in dests.items():
            _reclaim_partials(dest.parent, uuid)
            if os.path.lexists(dest):
                raise FileExistsError(f"cannot fetch run {uuid}: {dest} already exists")
        staging: dict[str, Path] = {}
        try:
            for uuid, dest in dests.items():
                staging[uuid] = _make_partial(dest.parent, uuid)
            _download_runs(fs, root, manifests, staging, progress)
            return _land(uri, manifests, staging, dests)
        finally:
            for tmp in staging.values():
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    """Serialize fetches into one directory so a retry may reclaim leftovers safely."""
    with FileLock(parent / LOCK_NAME):
        yield


def _reclaim_partials(parent: Path, uuid: str) -> None:
    """Remove temporary directories that an interrupted fetch of this run left behind."""
    for leftover in parent.glob(f".{uuid}{PARTIAL_MARKER}*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def _make_partial(parent: Path, uuid: str) -> Path:
    while True:
        tmp = parent / f".{uuid}{PARTIAL_MARKER}{secrets.token_hex(6)}"
        try:
            tmp.mkdir()  # honours the umask, unlike mkdtemp
            return tmp
        except FileExistsError:
            continue


def _download_runs(
    fs: fsspec.AbstractFileSystem,
    root: str,
    manifests: dict[str, dict],
    staging: dict[str, Path],
    progress: bool,
) -> None:
    """Get the files of many runs with one bulk call."""
    remote: list[str] = []
    local: list[str] = []
    for uuid, manifest in manifests.items():
        for rel in manifest["files"]:
            remote.append(join(root, uuid, rel))
            target = staging[uuid].joinpath(*rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            local.append(os.fspath(target))
    if not remote:
        return
    with transfer_callback(progress, f"fetch {len(manifests)} run(s)") as callback:
        try:
            fs.get(remote, local, callback=_with_kill_point(callback, "fetch-file"))
        except FileNotFoundError as exc:
            raise StoreError(
                f"{store_uri(fs, root)} lost a file during the fetch: {exc}",
                store=store_uri(fs, root),
            ) from exc
        except Exception as exc:
            raise StoreError(
                f"download from {store_uri(fs, root)} failed: {exc}", store=store_uri(fs, root)
            ) from exc


def _land(
    uri: str, manifests: dict[str, dict], staging: dict[str, Path], dests: dict[str, Path]
) -> dict[str, TransferResult]:
    """Check every downloaded byte, then rename each verified run into place."""
    results: dict[str, TransferResult] = {}
    problems: dict[str, list[str]] = {}
    for uuid, manifest in manifests.items():
        found = []
        for rel, entry in manifest["files"].items():
            path = staging[uuid].joinpath(*rel.split("/"))
            try:
                size, sha, _ = hash_file(path)
            except FileNotFoundError:
                found.append(f"{rel}: not downloaded")
                continue
            if size != entry["size"] or sha != entry["sha256"]:
                found.append(f"{rel}: checksum mismatch, the store's copy is corrupt")
        if found:
            problems[uuid] = found
            continue
        if os.path.lexists(dests[uuid]):
            problems[uuid] = [f"{dests[uuid]} appeared during the fetch"]
            continue
        os.rename(staging[uuid], dests[uuid])
        kill_point("fetch-run", len(results) + 1)  # tests: die once N runs have landed
        results[uuid] = TransferResult(
            uuid=uuid,
            state="present",
            size=sum(e["size"] for e in manifest["files"].values()),
            checksum=manifest_digest(manifest),
            verified_at=now(),
        )
    if problems:
        detail = "; ".join(f"{uuid}: {', '.join(p[:3])}" for uuid, p in sorted(problems.items()))
        raise TransferError(
            f"{len(problems)} run(s) could not be fetched from {uri}: {detail}",
            results=results,
            problems=problems,
            store=uri,
        )
    return results


# -- listing and deletion ---------------------------------------------------------------


def list_remote_headers(
    fs: fsspec.AbstractFileSystem, root: str
) -> Iterator[tuple[str, dict, bool]]:
    """Yield (uuid, id.json header, has_manifest) for each run in a store, in uuid order."""
    root = _normalize_root(fs, root)
    fs.invalidate_cache(root)
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return
    prefix = root.rstrip("/") + "/" if root else ""
    headers: dict[str, str] = {}
    manifests: set[str] = set()
    for name in found:
        name = fs._strip_protocol(name)
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split("/")
        if len(parts) != 2 or not _NAME.fullmatch(parts[0]):
            continue
        if parts[1] == "id.json":
            headers[parts[0]] = name
        elif parts[1] == MANIFEST_NAME:
            manifests.add(parts[0])
    contents = read_many(fs, [headers[uuid] for uuid in sorted(headers)])
    for uuid in sorted(headers):
        data = contents.get(headers[uuid])
        if data is None:
            continue
        try:
            header = json.loads(data)
        except ValueError:
            continue
        if not isinstance(header, dict):
            continue
        if "uuid" in header and header["uuid"] != uuid:
            continue  # a header copied under another run's name
        yield uuid, header, uuid in manifests


def delete_remote(fs: fsspec.AbstractFileSystem, root: str, uuid: str) -> None:
    """Delete a run's copy from a store, manifest first so no half-deleted copy looks present."""
    _check_uuid(uuid)
    root = _normalize_root(fs, root)
    run_path = join(root, uuid)
    listing = _list_runs(fs, root, [uuid])[uuid]
    if not listing:
        raise FileNotFoundError(f"{store_uri(fs, root)} holds no copy of run {uuid}")
    if MANIFEST_NAME in listing:
        fs.rm_file(join(run_path, MANIFEST_NAME))
    fs.rm(run_path, recursive=True)
    fs.invalidate_cache(run_path)
