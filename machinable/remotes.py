"""Fetching layer for remotes: shareable modules that a project pulls in by source.

A remote is declared as ``{name: source}``. The source says where the module's code
comes from:

    url+https://host/path/mod.py   downloaded over HTTP(S) with requests
    url+http://host/path/mod.py
    file+PATH                      copied from a local file
    link+PATH                      symlinked to a local file

Relative ``PATH``s are taken relative to the project directory. Any source may end in
``#sha256=<64 hex digits>`` to pin the exact bytes it must deliver.

A fetched remote lands in ``<project>/interface/remotes/<name>.py``. Once there it is
never fetched again; updating means deleting the file (and usually changing the
source). Every successful fetch is recorded in ``<project>/interface/remotes.lock``.

This module only *fetches*: payloads are decoded and compiled to reject garbage, but
nothing is ever executed or imported here. Writes go through a temporary file in the
target directory followed by ``os.replace``, so a failed fetch leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import keyword
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3

from machinable.errors import LockTimeout, RemoteError
from machinable.locks import FileLock
from machinable.redact import has_credentials, redact
from machinable.settings import remote_deadline, remote_max_bytes, remote_timeout

__all__ = [
    "REMOTES_DIR",
    "LOCK_FILE",
    "SCHEMES",
    "Source",
    "FetchedRemote",
    "validate_name",
    "parse_source",
    "remote_path",
    "lock_path",
    "read_lock",
    "sha256_file",
    "fetch_remote",
    "fetch_all",
    "check_lock",
    "split_declaration",
    "with_dependencies",
]

#: Cache directory, relative to the project directory.
REMOTES_DIR: tuple[str, ...] = ("interface", "remotes")
#: Lock file, relative to the project directory.
LOCK_FILE: tuple[str, ...] = ("interface", "remotes.lock")
#: Supported source schemes.
SCHEMES: frozenset[str] = frozenset({"url", "file", "link"})

_PIN_RE = re.compile(r"sha256=([0-9a-fA-F]{64})")
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Source:
    """A parsed remote source.

    ``target`` is the URL for ``url`` sources and the absolute local path (as a string)
    for ``file`` and ``link`` sources. ``sha256`` is the lowercase pin, if any.
    """

    scheme: str
    target: str
    sha256: str | None = None


@dataclass(frozen=True)
class FetchedRemote:
    """The outcome of fetching one remote; ``fetched`` is False if it was already cached."""

    name: str
    source: str
    path: Path
    sha256: str
    fetched: bool


# --------------------------------------------------------------------------- parsing


def validate_name(name: str) -> str:
    """Return ``name`` if it can be a module name, else raise ``RemoteError``."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise RemoteError(
            f"invalid remote name {name!r}: it must be a Python identifier "
            "(letters, digits and underscores, not starting with a digit) and not a keyword",
            name=name if isinstance(name, str) else None,
        )
    return name


def parse_source(source: str, project_dir: Path) -> Source:
    """Parse ``scheme+target[#sha256=<hex>]``; local paths resolve against ``project_dir``."""
    if not isinstance(source, str) or not source.strip():
        raise RemoteError(f"empty or invalid remote source {source!r}", source=None)
    scheme, plus, rest = source.partition("+")
    if not plus or scheme not in SCHEMES:
        raise RemoteError(
            f"unknown remote source {source!r}: expected one of "
            "'url+https://...', 'url+http://...', 'file+PATH', 'link+PATH'",
            source=source,
        )

    pin: str | None = None
    if "#" in rest:
        rest, _, fragment = rest.rpartition("#")
        match = _PIN_RE.fullmatch(fragment)
        if match is None:
            raise RemoteError(
                f"malformed pin {('#' + fragment)!r} in remote source {source!r}: "
                "expected '#sha256=' followed by 64 hex digits",
                source=source,
            )
        pin = match.group(1).lower()

    if not rest:
        raise RemoteError(f"remote source {source!r} names no location", source=source)

    if scheme == "url":
        parts = urlsplit(rest)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RemoteError(
                f"remote source {source!r}: 'url+' needs an http:// or https:// URL",
                source=source,
            )
        return Source(scheme, rest, pin)

    path = Path(rest).expanduser()
    if not path.is_absolute():
        path = Path(project_dir) / path
    return Source(scheme, str(path.resolve()), pin)


# --------------------------------------------------------------------------- paths & lock


def remote_path(project_dir: Path, name: str) -> Path:
    """Where the remote ``name`` is cached: ``<project>/interface/remotes/<name>.py``."""
    return Path(project_dir).joinpath(*REMOTES_DIR, f"{validate_name(name)}.py")


def lock_path(project_dir: Path) -> Path:
    """The lock file: ``<project>/interface/remotes.lock``."""
    return Path(project_dir).joinpath(*LOCK_FILE)


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path`` (following symlinks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_lock(project_dir: Path) -> dict[str, dict[str, str]]:
    """Read the lock file (``{}`` if absent); raise ``RemoteError`` if it is malformed."""
    path = lock_path(project_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise RemoteError(f"cannot read remotes lock file {path}: {e}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise RemoteError(f"remotes lock file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise RemoteError(f"remotes lock file {path} must hold a JSON object")
    for name, entry in data.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("source"), str)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise RemoteError(
                f"remotes lock file {path}: entry {name!r} must have string 'source' and 'sha256'",
                name=name,
            )
    return data


def _write_lock(project_dir: Path, data: Mapping[str, Mapping[str, str]]) -> None:
    path = lock_path(project_dir)
    text = json.dumps(data, sort_keys=True, indent=2) + "\n"
    _atomic_write(path, text.encode("utf-8"), prefix=".remotes.lock.")


def _record_lock(project_dir: Path, name: str, source: str, sha256: str, *, replace: bool) -> None:
    """Add (or, with ``replace``, overwrite) the lock entry for ``name``.

    The read-modify-write runs under a file lock so that processes fetching
    different remotes at once never drop each other's entries.
    """
    try:
        with FileLock(lock_path(project_dir).with_name(".remotes.lock.flock"), timeout=60):
            data = read_lock(project_dir)
            # The lock is committed with the project: it never holds a credential
            # (entries written by older versions are cleaned on the next write).
            entry = {"source": redact(source), "sha256": sha256}
            leaked = any(has_credentials(item["source"]) for item in data.values())
            if not replace and name in data and not leaked:
                return
            if data.get(name) == entry and not leaked:
                return
            if replace or name not in data:
                data[name] = entry
            data = {key: {**item, "source": redact(item["source"])} for key, item in data.items()}
            _write_lock(project_dir, data)
    except (OSError, LockTimeout) as e:
        raise RemoteError(
            f"remote {name!r}: cannot write lock file {lock_path(project_dir)}: {e}",
            name=name,
            source=source,
        ) from e


# --------------------------------------------------------------------------- writing


def _atomic_write(path: Path, data: bytes, *, prefix: str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _atomic_symlink(path: Path, target: str) -> None:
    """Point ``path`` at ``target`` via a temporarily named symlink and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # reserve a unique name, then swap the placeholder file for the link
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".link")
    os.close(fd)
    try:
        os.unlink(tmp)
        os.symlink(target, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- fetching


def _download_url(
    url: str, *, name: str, source: str, timeout: float, deadline: float, max_bytes: int
) -> bytes:
    """GET ``url`` and return the complete body, or raise ``RemoteError``.

    Each wait for the server is bounded by ``timeout``, the whole download by
    ``deadline`` (a body that drips a byte a second ends there), and the body by
    ``max_bytes`` (read in pieces, never held past the limit).
    """
    started = time.monotonic()
    shown = redact(url)
    wait = min(timeout, deadline)
    try:
        response = requests.get(url, timeout=wait, stream=True)
    except requests.exceptions.RequestException as e:
        raise _request_failed(e, name=name, source=source, url=shown, wait=wait) from e

    with response:
        if not 200 <= response.status_code < 300:
            raise RemoteError(
                f"remote {name!r}: {shown} answered HTTP {response.status_code}"
                + (f" {response.reason}" if response.reason else ""),
                name=name,
                source=redact(source),
            )
        declared = response.headers.get("Content-Length")
        try:
            expected = int(declared) if declared is not None else None
        except ValueError:
            expected = None
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if expected is not None and expected > max_bytes:
            raise _too_large(name, source, shown, expected, max_bytes)
        body = bytearray()
        while True:
            if time.monotonic() - started > deadline:
                raise RemoteError(
                    f"remote {name!r}: download from {shown} did not finish within {deadline:g}s "
                    f"({len(body)} bytes so far; MACHINABLE_REMOTE_DEADLINE sets the limit)",
                    name=name,
                    source=redact(source),
                )
            try:
                # read1 returns what one read of the socket brings: the deadline is
                # checked between reads however slowly the bytes come.
                chunk = response.raw.read1(_CHUNK, decode_content=True)
            except (urllib3.exceptions.HTTPError, OSError) as e:
                raise _request_failed(e, name=name, source=source, url=shown, wait=wait) from e
            if not chunk:
                break
            body += chunk
            if len(body) > max_bytes:
                raise _too_large(name, source, shown, None, max_bytes)
        if expected is not None and encoding in ("", "identity") and expected != len(body):
            raise RemoteError(
                f"remote {name!r}: download from {shown} was truncated: got {len(body)} "
                f"of {expected} bytes",
                name=name,
                source=redact(source),
            )
    return bytes(body)


def _too_large(name: str, source: str, url: str, size: int | None, limit: int) -> RemoteError:
    what = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return RemoteError(
        f"remote {name!r}: {url} sends {what}; a remote module may be at most {limit} bytes "
        "(MACHINABLE_REMOTE_MAX_BYTES sets the limit)",
        name=name,
        source=redact(source),
    )


def _request_failed(e: BaseException, *, name: str, source: str, url: str, wait: float) -> RemoteError:
    """One message for every way a request can fail, with credentials redacted."""
    text = redact(str(e))
    lowered = text.lower()
    if isinstance(e, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError)) or "timed out" in lowered:
        message = f"request to {url} timed out after {wait:g}s"
    elif isinstance(
        e,
        (
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError,
            urllib3.exceptions.ProtocolError,
            urllib3.exceptions.DecodeError,
        ),
    ):
        message = f"download from {url} was truncated or corrupt ({text})"
    else:
        message = f"request to {url} failed ({text})"
    return RemoteError(f"remote {name!r}: {message}", name=name, source=redact(source))


def _read_local(src: Source, *, name: str, source: str) -> bytes:
    path = Path(src.target)
    if not path.is_file():
        state = "does not exist" if not path.exists() else "is not a regular file"
        raise RemoteError(f"remote {name!r}: local source {path} {state}", name=name, source=source)
    limit = remote_max_bytes()
    if path.stat().st_size > limit:
        raise RemoteError(
            f"remote {name!r}: local source {path} is larger than {limit} bytes "
            "(MACHINABLE_REMOTE_MAX_BYTES sets the limit)",
            name=name,
            source=source,
        )
    try:
        return path.read_bytes()
    except OSError as e:
        raise RemoteError(
            f"remote {name!r}: cannot read local source {path}: {e}", name=name, source=source
        ) from e


def _check_payload(data: bytes, *, name: str, source: str, pin: str | None) -> str:
    """Verify pin, encoding and syntax of ``data``; return its sha256. Never executes it."""
    digest = hashlib.sha256(data).hexdigest()
    if pin is not None and digest != pin:
        raise RemoteError(
            f"remote {name!r}: sha256 mismatch for {source}: expected {pin}, got {digest}",
            name=name,
            source=source,
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RemoteError(
            f"remote {name!r}: payload from {source} is not valid UTF-8 ({e})",
            name=name,
            source=source,
        ) from e
    try:
        # compile only: syntax check without running anything; don't inherit our
        # own __future__ flags so the check matches what an import would see
        compile(text.removeprefix("\ufeff"), f"<remote {name}>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise RemoteError(
            f"remote {name!r}: payload from {source} is not valid Python ({e})",
            name=name,
            source=source,
        ) from e
    return digest


def fetch_remote(
    project_dir: Path,
    name: str,
    source: str,
    *,
    timeout: float | None = None,
    deadline: float | None = None,
    max_bytes: int | None = None,
) -> FetchedRemote:
    """Fetch remote ``name`` from ``source`` into the cache unless it is already there.

    A cached file is never fetched again; if ``source`` pins a sha256 the cached file
    must match it. Nothing is imported or executed. Raises ``RemoteError`` on failure,
    in which case the cache is left untouched. ``timeout``, ``deadline`` and
    ``max_bytes`` default to the settings (``MACHINABLE_REMOTE_*``).
    """
    project_dir = Path(project_dir)
    validate_name(name)
    src = parse_source(source, project_dir)
    path = remote_path(project_dir, name)
    read_lock(project_dir)  # a malformed lock file fails before anything is fetched

    if path.is_symlink() and not path.exists():
        raise RemoteError(
            f"remote {name!r}: cached {path} is a broken symlink (to {os.readlink(path)}); "
            "delete it to fetch again",
            name=name,
            source=source,
        )
    if path.exists():
        if not path.is_file():
            raise RemoteError(
                f"remote {name!r}: cached {path} is not a file", name=name, source=source
            )
        digest = sha256_file(path)
        if src.sha256 is not None and digest != src.sha256:
            raise RemoteError(
                f"remote {name!r}: cached {path} has sha256 {digest}, but the source pins "
                f"{src.sha256}; delete the file to fetch it again",
                name=name,
                source=source,
            )
        _record_lock(project_dir, name, source, digest, replace=False)
        return FetchedRemote(name, redact(source), path, digest, fetched=False)

    if src.scheme == "url":
        data = _download_url(
            src.target,
            name=name,
            source=source,
            timeout=remote_timeout() if timeout is None else timeout,
            deadline=remote_deadline() if deadline is None else deadline,
            max_bytes=remote_max_bytes() if max_bytes is None else max_bytes,
        )
    else:
        data = _read_local(src, name=name, source=source)
    digest = _check_payload(data, name=name, source=source, pin=src.sha256)
    locked = read_lock(project_dir).get(name)
    if (
        src.scheme == "url"
        and locked is not None
        and locked.get("source") == redact(source)
        and locked.get("sha256") != digest
    ):
        # Same URL, different bytes than when it was locked: the host now serves other
        # code than was reviewed. Refuse rather than silently re-locking.
        raise RemoteError(
            f"remote {name!r}: {src.target} now serves sha256 {digest}, but "
            f"{lock_path(project_dir)} locked {locked.get('sha256')}; inspect the change, "
            "then remove the lock entry to accept it",
            name=name,
            source=source,
        )

    try:
        if src.scheme == "link":
            _atomic_symlink(path, src.target)
        else:
            _atomic_write(path, data, prefix=f".{name}.")
    except OSError as e:
        raise RemoteError(
            f"remote {name!r}: cannot write {path}: {e}", name=name, source=source
        ) from e
    _record_lock(project_dir, name, source, digest, replace=True)
    return FetchedRemote(name, redact(source), path, digest, fetched=True)


def split_declaration(
    declared: Mapping[str, object],
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """A provider's ``{name: source}`` or ``{name: [source, dependency, ...]}`` as
    ``(sources, dependencies)``; every dependency must name another declared remote."""
    sources: dict[str, str] = {}
    dependencies: dict[str, list[str]] = {}
    for name, entry in declared.items():
        if isinstance(entry, (list, tuple)):
            if not entry:
                raise RemoteError(f"remote {name!r} is declared as an empty list", name=str(name))
            source, *needs = entry
        else:
            source, needs = entry, []
        if not isinstance(source, str):
            raise RemoteError(f"remote {name!r}: the source must be a string, not {source!r}", name=str(name))
        bad = [need for need in needs if not isinstance(need, str)]
        if bad:
            raise RemoteError(f"remote {name!r}: dependency {bad[0]!r} is not a name", name=str(name))
        sources[name] = source
        dependencies[name] = list(needs)
    for name, needs in dependencies.items():
        unknown = [need for need in needs if need not in sources]
        if unknown:
            raise RemoteError(
                f"remote {name!r} depends on {', '.join(map(repr, unknown))}, which the project "
                "does not declare",
                name=name,
            )
    return sources, dependencies


def with_dependencies(names: list[str], dependencies: Mapping[str, list[str]]) -> list[str]:
    """``names`` and everything they depend on, transitively, dependencies first, each once."""
    order: list[str] = []
    seen: set[str] = set()
    for start in names:
        stack: list[tuple[str, bool]] = [(start, False)]
        while stack:
            name, expanded = stack.pop()
            if expanded:
                if name not in order:
                    order.append(name)
                continue
            if name in seen:
                continue
            seen.add(name)
            stack.append((name, True))
            stack.extend((need, False) for need in reversed(dependencies.get(name, [])))
    return order


def fetch_all(
    project_dir: Path,
    remotes: Mapping[str, str],
    *,
    timeout: float | None = None,
    deadline: float | None = None,
    max_bytes: int | None = None,
) -> list[FetchedRemote]:
    """Fetch every declared remote, in declaration order.

    Names and sources are all validated before anything is fetched; the first failing
    fetch raises (remotes fetched before it stay cached).
    """
    project_dir = Path(project_dir)
    for name, source in remotes.items():
        validate_name(name)
        try:
            parse_source(source, project_dir)
        except RemoteError as e:
            raise RemoteError(f"remote {name!r}: {e}", name=name, source=source) from e
    return [
        fetch_remote(
            project_dir, name, source, timeout=timeout, deadline=deadline, max_bytes=max_bytes
        )
        for name, source in remotes.items()
    ]


def check_lock(project_dir: Path, remotes: Mapping[str, str]) -> list[str]:
    """Compare declared remotes, the cache and the lock file; return readable problems.

    An empty list means every declared remote is cached, locked with its declared
    source, and its cached bytes match the lock (and the pin, if the source has one).
    """
    project_dir = Path(project_dir)
    try:
        lock = read_lock(project_dir)
    except RemoteError as e:
        return [str(e)]

    problems: list[str] = []
    problems += [
        f"{name!r}: the lock file holds a credential in its source; fetch any remote to clean it"
        for name, entry in lock.items()
        if has_credentials(entry["source"])
    ]
    for name, source in remotes.items():
        try:
            validate_name(name)
            src = parse_source(source, project_dir)
        except RemoteError as e:
            problems.append(f"{name!r}: {e}")
            continue
        path = remote_path(project_dir, name)
        entry = lock.get(name)
        if path.is_symlink() and not path.exists():
            problems.append(f"{name!r}: cached {path} is a broken symlink")
            continue
        if not path.is_file():
            problems.append(f"{name!r}: declared but not fetched yet (no {path})")
            continue
        digest = sha256_file(path)
        if entry is None:
            problems.append(f"{name!r}: cached {path} has no entry in the lock file")
        else:
            if entry["source"] != redact(source):
                problems.append(
                    f"{name!r}: lock records source {entry['source']!r} but the project "
                    f"declares {redact(source)!r}"
                )
            if entry["sha256"] != digest:
                problems.append(
                    f"{name!r}: cached {path} has sha256 {digest}, but the lock records "
                    f"{entry['sha256']} (modified since it was fetched?)"
                )
        if src.sha256 is not None and src.sha256 != digest:
            problems.append(
                f"{name!r}: cached {path} has sha256 {digest}, but the source pins {src.sha256}"
            )
    for name in sorted(set(lock) - set(remotes)):
        problems.append(f"{name!r}: lock entry for a remote that is no longer declared")
    return problems
