"""The record directory: atomic writes, headers, status markers, safe file names.

A record directory is named by its run's uuid and holds ``.machinable`` (sentinel),
``id.json`` (identity header), ``model.json`` (module, config, version, predicate,
created time), status markers and the run's own files. Every write goes to a temporary
name first and is renamed into place, so a crash leaves the old or the new file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import shutil
import stat
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from machinable.errors import PathEscapeError, PickleRefused, RecordError, UnsafeFileError
from machinable.identity import FORMAT_VERSION, UUID_LENGTH, compute_uuid
from machinable.locks import open_regular
from machinable.settings import key_file

SENTINEL = ".machinable"
ID_FILE = "id.json"
MODEL_FILE = "model.json"
MARKERS = ("started_at", "finished_at", "failed_at", "updated_at")
ERROR_FILE = "error.txt"
LOCK_FILE = ".lock"
LOCKS_DIR = ".locks"
RESERVED = frozenset({SENTINEL, ID_FILE, MODEL_FILE, ERROR_FILE, LOCK_FILE, *MARKERS})
_HEX = frozenset("0123456789abcdef")


def now() -> datetime:
    return datetime.now(timezone.utc)


def timestamp(moment: datetime | None = None) -> str:
    return (moment or now()).isoformat()


def parse_timestamp(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def is_uuid(name: str) -> bool:
    return len(name) == UUID_LENGTH and set(name) <= _HEX


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename."""
    head, name = os.path.split(os.fspath(path))  # string paths: a launch writes seven files
    tmp = os.path.join(head, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def dump_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)


def id_header(uuid: str, project: str, module: str, config_key: str, predicate_key: str) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "uuid": uuid,
        "project": project,
        "module": module,
        "config_key": config_key,
        "predicate_key": predicate_key,
    }


def write_record(directory: Path, header: dict[str, Any], model: dict[str, Any]) -> bool:
    """Create the directory and its immutable headers (idempotent for the same run).

    Returns True when the headers were written now, False when they already existed.
    """
    try:
        directory.mkdir(parents=True)
        fresh = True
    except FileExistsError:
        fresh = False
    id_path = directory / ID_FILE
    if not fresh and id_path.exists():
        existing = read_json(id_path)
        if existing != header:
            raise RecordError(
                f"{directory} already holds a different run (its id.json disagrees)", path=directory
            )
        created = False
    else:
        atomic_write(directory / MODEL_FILE, dump_json(model))
        atomic_write(id_path, dump_json(header))
        created = True
    sentinel = directory / SENTINEL
    if created or not sentinel.exists():
        atomic_write(sentinel, "")
    return created


def launch_lock(directory: Path) -> str:
    """The lock a launch holds from start to finish: ``<storage>/.locks/<uuid>.lock``.

    It lives beside the records, not in them, so a record holds only what DESIGN.md
    lists; a process that dies releases its lock, which is how a dead run is told
    from a running one.
    """
    parent, name = os.path.split(os.fspath(directory))
    locks = os.path.join(parent, LOCKS_DIR)
    if locks not in _LOCK_DIRS:
        try:
            os.makedirs(locks)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(locks).st_mode):  # a link would put locks elsewhere
                raise UnsafeFileError(
                    f"{locks} is not a directory (a link?); machinable keeps its launch locks "
                    "in a real directory there: remove it",
                    path=Path(locks),
                ) from None
        _LOCK_DIRS.add(locks)
    return os.path.join(locks, f"{name}.lock")


_LOCK_DIRS: set[str] = set()


def mark(directory: Path, marker: str, moment: datetime | None = None) -> str:
    text = timestamp(moment)
    atomic_write(directory / marker, text)
    if marker != "updated_at":
        atomic_write(directory / "updated_at", text)
    return text


def clear(directory: Path, *names: str) -> None:
    for name in names:
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            pass


MAX_HEADER_BYTES = 16 * 2**20
MAX_MARKER_BYTES = 4096


def read_bytes(path: str | Path, dir_fd: int | None = None, limit: int = MAX_HEADER_BYTES) -> bytes:
    """Read a small file of a record with plain syscalls (reindex reads millions of them).

    Only a regular file that is not a link is read, and at most ``limit`` bytes: a FIFO
    named ``id.json`` or a ``model.json`` linked to ``/dev/zero`` is an error, never a hang.
    """
    fd = open_regular(path, dir_fd=dir_fd)
    try:
        chunk = os.read(fd, 65536)
        if len(chunk) < 65536:  # a regular file read short of the buffer is complete
            return chunk
        chunks = [chunk]
        size = len(chunk)
        while chunk:
            chunk = os.read(fd, 65536)
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise UnsafeFileError(
                    f"{os.fspath(path)} is larger than {limit} bytes; a record header is never that large",
                    path=path,
                )
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_json(path: str | Path, dir_fd: int | None = None) -> Any:
    try:
        raw = read_bytes(path, dir_fd)
    except OSError as exc:  # read() of a directory says EISDIR without naming it
        if exc.filename is None:
            exc.filename = os.fspath(path)
        raise
    try:
        return json.loads(raw)
    except ValueError as exc:  # name the file: "unreadable header" alone says too little
        raise ValueError(f"{os.path.basename(path)} is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # "[[[[..." thousands deep: corrupt, never fatal
        raise ValueError(f"{os.path.basename(path)} is not valid JSON: nested too deeply") from exc


def read_marker(directory: Path, marker: str) -> datetime | None:
    try:
        return parse_timestamp(read_bytes(directory / marker, limit=MAX_MARKER_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError):  # missing, a FIFO, a link, too large: no marker
        return None


def status_of(markers: Iterable[str]) -> str:
    """The run status implied by the marker files present."""
    present = set(markers)
    if "finished_at" in present:
        return "finished"
    if "failed_at" in present:
        return "failed"
    if "started_at" in present:
        return "started"
    return "created"


HEADER_KEYS = ("format", "uuid", "project", "module", "config_key", "predicate_key")
MODEL_KEYS = ("module", "config", "canonical", "version", "predicate", "created_at")


def _is_text(value: Any) -> bool:
    """A string that can be stored: not a lone surrogate from a ``"\\udc80"`` escape."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_headers(header: Any, model: Any, directory_name: str | None = None) -> str | None:
    """Why ``header``/``model`` are not a valid record, or None when they are."""
    if not isinstance(header, dict):
        return "id.json is not a JSON object"
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        return f"id.json lacks {', '.join(missing)}"
    if header["format"] != FORMAT_VERSION:
        return f"id.json has format {header['format']!r}; this machinable reads {FORMAT_VERSION}"
    uuid = header["uuid"]
    if not isinstance(uuid, str) or not is_uuid(uuid):
        return f"id.json uuid {uuid!r} is not a machinable uuid"
    if directory_name is not None and directory_name != uuid:
        return f"directory is named {directory_name!r} but id.json says uuid {uuid!r}"
    if not isinstance(model, dict):
        return "model.json is not a JSON object"
    missing = [k for k in MODEL_KEYS if k not in model]
    if missing:
        return f"model.json lacks {', '.join(missing)}"
    for key in ("project", "module", "config_key", "predicate_key"):
        if not _is_text(header[key]):
            return f"id.json {key} {header[key]!r} is not a valid string"
    if model["module"] != header["module"]:
        return "model.json and id.json name different modules"
    if not isinstance(model["config"], dict):
        return "model.json config is not an object"
    if not isinstance(model["canonical"], dict) or not isinstance(model["predicate"], dict):
        return "model.json canonical config or predicate is not an object"
    try:
        expected = compute_uuid(
            str(header["project"]), str(header["module"]), model["canonical"], model["predicate"]
        )
    except Exception as exc:  # a header that cannot be hashed is invalid, never fatal
        return f"model.json cannot be hashed: {exc}"
    if expected != uuid:
        return f"model.json hashes to {expected}, not to id.json's uuid {uuid}"
    return None


def read_record(directory: Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Read and check a record's headers; returns (id, model, entry names)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        raise
    except NotADirectoryError as exc:
        raise RecordError(f"{directory} is not a directory", path=directory) from exc
    if SENTINEL not in names:
        raise RecordError(f"{directory} is not a machinable record (no {SENTINEL})", path=directory)
    base = os.fspath(directory)  # plain strings: verify reads millions of records
    try:
        header = read_json(os.path.join(base, ID_FILE))
        model = read_json(os.path.join(base, MODEL_FILE))
    except FileNotFoundError as exc:
        raise RecordError(f"{directory}: {os.path.basename(exc.filename or '?')} is missing", path=directory) from exc
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise RecordError(f"{directory}: unreadable header: {exc}", path=directory) from exc
    problem = validate_headers(header, model, os.path.basename(base))
    if problem:
        raise RecordError(f"{directory}: {problem}", path=directory)
    return header, model, names


TRASH_PREFIX = ".trash-"


def removal_problem(directory: str | os.PathLike[str], uuid: str, root: str | os.PathLike[str]) -> str | None:
    """Why ``directory`` must not be deleted as run ``uuid``'s record, or None.

    Only a real directory (not a link) directly under the storage ``root``, named
    ``uuid``, holding the sentinel and an ``id.json`` that names ``uuid`` may go: an
    index row, a store or a collaborator may point anywhere.
    """
    path = Path(os.path.abspath(directory))
    base = Path(os.path.abspath(root))
    if path.parent != base or os.path.realpath(path.parent) != os.path.realpath(base):
        return f"{path} is not directly under the storage root {base}"
    if path.name != uuid:
        return f"{path} is not named after run {uuid}"
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is {'a symbolic link' if stat.S_ISLNK(info.st_mode) else 'not a directory'}"
    try:
        sentinel = os.lstat(path / SENTINEL)
    except FileNotFoundError:
        return f"{path} has no {SENTINEL} sentinel"
    if not stat.S_ISREG(sentinel.st_mode):
        return f"{path}/{SENTINEL} is not a regular file"
    try:
        header = read_json(path / ID_FILE)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"{path}/{ID_FILE} cannot be read ({exc})"
    if not isinstance(header, dict) or header.get("uuid") != uuid:
        named = header.get("uuid") if isinstance(header, dict) else None
        return f"{path}/{ID_FILE} names run {named!r}, not {uuid}"
    return None


def remove_record(directory: str | os.PathLike[str], uuid: str, root: str | os.PathLike[str]) -> None:
    """Delete run ``uuid``'s record directory under ``root``, after checking it is one.

    The directory leaves the storage in one rename (to a hidden name beside it that
    reindex ignores) before anything in it is deleted, so a reader sees the whole run
    or none of it, never a half-deleted directory. Raises ``RecordError`` when
    ``removal_problem`` finds a reason not to.
    """
    problem = removal_problem(directory, uuid, root)
    if problem is not None:
        raise RecordError(f"refusing to delete {directory}: {problem}", path=directory)
    path = Path(os.path.abspath(directory))
    trash = path.with_name(f"{TRASH_PREFIX}{uuid}-{os.urandom(6).hex()}")
    os.rename(path, trash)
    shutil.rmtree(trash)


def safe_path(directory: Path, name: str) -> Path:
    """The path of a run file, refusing names that leave the run directory."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise PathEscapeError(f"invalid file name {name!r}", name=str(name))
    relative = Path(name)
    if relative.is_absolute() or name.startswith(("/", "\\")) or ".." in relative.parts:
        raise PathEscapeError(f"file name {name!r} points outside the run directory", name=name)
    if not relative.parts:  # "." or "./": the run directory itself is no file
        raise PathEscapeError(f"file name {name!r} names the run directory, not a file in it", name=name)
    if relative.parts[0] in RESERVED:
        raise PathEscapeError(f"{name!r} is reserved for machinable's own records", name=name)
    target = directory / relative
    root = directory.resolve()
    resolved = target.resolve()
    if resolved != root and root not in resolved.parents:
        raise PathEscapeError(f"file name {name!r} resolves outside the run directory", name=name)
    return target


def encode_file(path: Path, data: Any) -> bytes:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return json.dumps(data, ensure_ascii=False, default=_json_default).encode("utf-8")
    if suffix == ".jsonl":
        rows = data if isinstance(data, (list, tuple)) else [data]
        return "".join(
            json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in rows
        ).encode("utf-8")
    if suffix == ".p":
        return sign_pickle(pickle.dumps(data))
    if suffix == ".npy":
        import io

        import numpy

        buffer = io.BytesIO()
        numpy.save(buffer, numpy.asarray(data), allow_pickle=False)
        return buffer.getvalue()
    if isinstance(data, bytes):
        return data
    return str(data).encode("utf-8")


def decode_file(path: Path, raw: bytes, *, allow_pickle: bool = False) -> Any:
    """Decode a run file by its extension. Nothing read here executes code, except a
    pickle that this user's key signed or that the caller allows (``allow_pickle``)."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return json.loads(raw)
    if suffix == ".jsonl":
        return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    if suffix == ".p":
        if not allow_pickle and not pickle_is_signed(raw):
            raise PickleRefused(
                f"{path}: this pickle was not written with your key ({key_file()}), and "
                "unpickling runs code; load it with allow_pickle=True only if you trust "
                "whoever wrote it",
                path=path,
            )
        return pickle.loads(raw)
    if suffix == ".npy":
        import io

        import numpy

        return numpy.load(io.BytesIO(raw), allow_pickle=False)
    return raw.decode("utf-8")


# Pickles carry a trailer after the pickle's STOP opcode, which pickle.loads ignores
# (so other tools still read them): an HMAC of the pickle under this user's key.
_SIGNATURE = b"\n#machinable-hmac-sha256:"
_SIGNATURE_LENGTH = len(_SIGNATURE) + 64
_KEY_DOMAIN = b"machinable pickle v1\0"


def user_key(create: bool = False) -> bytes | None:
    """This user's pickle signing key (from ``settings.key_file()``); made on first need."""
    path = key_file()
    try:
        return bytes.fromhex(read_bytes(path, limit=4096).decode("ascii").strip())
    except FileNotFoundError:
        if not create:
            return None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"the pickle key {path} is malformed: {exc}", path=path) from exc
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(os.urandom(32).hex() + "\n")
    try:
        os.link(tmp, path)  # never replaces a key another process made meanwhile
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return user_key(create=False)


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, _KEY_DOMAIN + payload, hashlib.sha256).hexdigest().encode("ascii")


def sign_pickle(payload: bytes) -> bytes:
    key = user_key(create=True)
    assert key is not None
    return payload + _SIGNATURE + _mac(key, payload)


def pickle_is_signed(raw: bytes) -> bool:
    """Did this user's key sign ``raw`` (a pickle with its trailer)?"""
    if len(raw) < _SIGNATURE_LENGTH or raw[-_SIGNATURE_LENGTH:-64] != _SIGNATURE:
        return False
    key = user_key()
    if key is None:
        return False
    payload, mac = raw[:-_SIGNATURE_LENGTH], raw[-64:]
    return hmac.compare_digest(mac, _mac(key, payload))


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")
