"""Manifests: what a run directory holds, file by file, and its content digest.

A manifest lists every regular file of a run directory with its size, sha256 and md5,
sorted by relative path; its checksum is the sha256 of that files map in canonical JSON
(the manifest's own integrity), and the run's *digest* is the sha256 of the sorted
(path, size, sha256) entries of every file but the status markers: the content every
copy of the run must have (DESIGN.md, "Copies and their content").
Links that point outside the directory and special files are listed as skipped. A store
copy carries its manifest as ``.manifest.json``, written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from machinable.record import ID_FILE, MARKERS, MODEL_FILE, SENTINEL, now

MANIFEST_NAME = ".manifest.json"
MANIFEST_FORMAT = 1
CHUNK = 1 << 20


def hash_file(path: Path) -> tuple[int, str, str]:
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest(), md5.hexdigest()


def scan_directory(directory: Path) -> tuple[dict, dict[str, Path]]:
    """Build the manifest of a run directory and map each relpath to the file to read."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"run directory {directory} does not exist")
    real_root = os.path.realpath(directory)
    files: dict[str, dict] = {}
    sources: dict[str, Path] = {}
    skipped: list[str] = []

    def vanished(error: OSError) -> None:  # a directory evicted or moved during the scan
        raise FileNotFoundError(f"run directory {directory} vanished during the scan") from error

    for current, dirnames, filenames in os.walk(directory, onerror=vanished, followlinks=False):
        rel_dir = os.path.relpath(current, directory)
        for name in list(dirnames):
            if os.path.islink(os.path.join(current, name)):
                # never descend into a linked directory (cycles, escapes, duplicates)
                skipped.append(_relpath(rel_dir, name))
                dirnames.remove(name)
        for name in filenames:
            rel = _relpath(rel_dir, name)
            if rel == MANIFEST_NAME:
                skipped.append(rel)
                continue
            full = os.path.join(current, name)
            source = full
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                target = os.path.realpath(full)
                inside = os.path.commonpath([real_root, target]) == real_root
                if not inside or not os.path.isfile(target) or os.path.islink(target):
                    skipped.append(rel)
                    continue
                source = target
            elif not stat.S_ISREG(mode):
                skipped.append(rel)
                continue
            size, sha, md5 = hash_file(Path(source))
            files[rel] = {"size": size, "sha256": sha, "md5": md5}
            sources[rel] = Path(source)
    files = dict(sorted(files.items()))
    manifest = {
        "format": MANIFEST_FORMAT,
        "files": files,
        "skipped": sorted(skipped),
        "size": sum(entry["size"] for entry in files.values()),
        "checksum": manifest_checksum({"files": files}),
        "digest": manifest_digest({"files": files}),
    }
    return manifest, {rel: sources[rel] for rel in files}


def _relpath(rel_dir: str, name: str) -> str:
    return name if rel_dir == "." else Path(rel_dir, name).as_posix()


def build_manifest(directory: Path) -> dict:
    """Checksum every regular file of a run directory; linked files outside it are skipped."""
    return scan_directory(directory)[0]


def manifest_checksum(manifest: dict) -> str:
    """Return the run's content checksum: sha256 of the canonical JSON of the files map."""
    files = manifest["files"] if "files" in manifest else manifest
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def manifest_digest(manifest: dict) -> str:
    """The run's content digest: sha256 of the sorted (path, size, sha256) entries of
    every file except the status markers (they change without the content changing)."""
    files = manifest["files"] if "files" in manifest else manifest
    entries = sorted(
        [rel, entry["size"], entry["sha256"]] for rel, entry in files.items() if rel not in MARKERS
    )
    canonical = json.dumps(entries, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


HEADER_FILES = (SENTINEL, ID_FILE, MODEL_FILE)


def header_problems(manifest: dict) -> list[str]:
    """A copy without its headers is no copy of a run: say which are not in the record."""
    return [
        f"{name} is not a regular file inside the run directory (a link outside it?)"
        for name in HEADER_FILES
        if name not in manifest["files"]
    ]


def manifest_problems(manifest: Any) -> list[str]:
    """Say what is wrong with a manifest read from a store (it is untrusted input)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return ["manifest has no files map"]
    problems = []
    for rel, entry in manifest["files"].items():
        if not safe_relpath(rel):
            problems.append(f"manifest names an unsafe path {rel!r}")
        elif (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            problems.append(f"manifest entry for {rel!r} is malformed")
    if not problems and manifest.get("checksum") != manifest_checksum(manifest):
        problems.append("manifest checksum does not match its files")
    return problems


def safe_relpath(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") for p in parts) and rel != MANIFEST_NAME


def manifest_bytes(uuid: str, manifest: dict) -> bytes:
    document = {
        "format": MANIFEST_FORMAT,
        "uuid": uuid,
        "checksum": manifest_checksum(manifest),
        "digest": manifest_digest(manifest),
        "size": sum(entry["size"] for entry in manifest["files"].values()),
        "files": manifest["files"],
        "skipped": manifest.get("skipped", []),
        "written_at": now().isoformat(),
    }
    return json.dumps(document, sort_keys=True, indent=1).encode("utf-8")
