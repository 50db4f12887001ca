"""A run directory's files as the server shows them: listed and opened, never left.

A path from a request is checked twice: as text (no absolute path, no ``..``, no
backslash, no NUL) and after resolving every link, which must still lie inside the run
directory. A symlink inside a run that points elsewhere is neither listed nor served.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath

from machinable.record import LOCK_FILE, LOCKS_DIR, SENTINEL

HIDDEN = frozenset({SENTINEL, LOCK_FILE, LOCKS_DIR})
MAX_LISTED = 100_000


class Refused(ValueError):
    """A file path that is not a file inside the run directory."""


def list_files(directory: str, limit: int, offset: int) -> tuple[list[dict[str, object]], int]:
    """Regular files below ``directory`` (links only when they stay inside), sorted by path."""
    root = os.path.realpath(directory)
    found: list[tuple[str, int]] = []
    for base, dirs, names in os.walk(root):
        relative_base = os.path.relpath(base, root)
        if relative_base == ".":
            dirs[:] = [d for d in dirs if d not in HIDDEN]
            names = [n for n in names if n not in HIDDEN]
        dirs.sort()
        for name in names:
            path = os.path.join(base, name)
            try:
                real = os.path.realpath(path)
                if not _inside(real, root):
                    continue
                info = os.stat(real)
            except OSError:
                continue
            if not os.path.isfile(real):
                continue
            relative = name if relative_base == "." else f"{relative_base}/{name}"
            found.append((relative.replace(os.sep, "/"), info.st_size))
            if len(found) >= MAX_LISTED:
                break
        if len(found) >= MAX_LISTED:
            break
    found.sort()
    page = found[offset : offset + limit]
    return [{"path": path, "size": size} for path, size in page], len(found)


def resolve_file(directory: str, path: str) -> str:
    """The real path of the file ``path`` names inside ``directory``, or raise Refused."""
    if not path or "\x00" in path or "\\" in path or path.startswith("/"):
        raise Refused(f"invalid file path {path[:200]!r}")
    parts = PurePosixPath(path).parts
    if any(part in ("..", ".") for part in path.split("/")) or not parts:
        raise Refused(f"file path {path[:200]!r} leaves the run directory")
    if parts[0] in HIDDEN:
        raise Refused(f"{parts[0]!r} is machinable's own marker, not a run file")
    root = os.path.realpath(directory)
    real = os.path.realpath(os.path.join(root, *parts))
    if not _inside(real, root):
        raise Refused(f"file path {path[:200]!r} resolves outside the run directory")
    if not os.path.isfile(real):
        raise FileNotFoundError(path)
    return real


def _inside(real: str, root: str) -> bool:
    return real.startswith(root.rstrip(os.sep) + os.sep)
