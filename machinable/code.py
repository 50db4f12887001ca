"""Code fingerprints: which code computed a run.

Two projects that share a name share runs by design, even when their code differs. A
fingerprint recorded in each run's ``model.json`` says which code computed it: the
module file's sha256, and the git commit and dirty flag when the file is in a git
working tree. A fingerprint is computed once per module file per process (a module is
imported once per process, so the code that runs is the code first fingerprinted).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

GIT_TIMEOUT = 5.0  # seconds for each git command; a slow or hung git leaves git out

_cache: dict[str, dict[str, Any] | None] = {}
_lock = threading.Lock()


class CodeChangedWarning(UserWarning):
    """A cached run was computed by code that differs from the code resolving its module now."""


def module_file(cls: type) -> str | None:
    """The file that defines ``cls``, or None (a class typed into a REPL)."""
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    return os.path.abspath(file) if isinstance(file, str) else None


def fingerprint(file: str | None, root: Path | None = None) -> dict[str, Any] | None:
    """``{"file", "sha256"[, "git": {"commit", "dirty"}]}`` for a module file, or None.

    ``file`` is recorded relative to ``root`` (the project) when it lies inside it.
    """
    if file is None:
        return None
    with _lock:
        if file in _cache:
            return _cache[file]
    try:
        with open(file, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        found = None
    else:
        shown = file
        if root is not None:
            relative = os.path.relpath(file, root)
            if not relative.startswith(os.pardir):
                shown = relative
        found = {"file": shown, "sha256": digest}
        git = _git(os.path.dirname(file))
        if git is not None:
            found["git"] = git
    with _lock:
        _cache[file] = found
    return found


def _git(directory: str) -> dict[str, Any] | None:
    head = _run_git(directory, "rev-parse", "--verify", "--quiet", "HEAD")
    if not head:
        return None  # no git, not a working tree, no commit yet, or git hung
    status = _run_git(directory, "status", "--porcelain", "--untracked-files=no")
    return {"commit": head.strip(), "dirty": None if status is None else bool(status.strip())}


def _run_git(directory: str, *args: str) -> str | None:
    """git's stdout, or None when it fails or outlives GIT_TIMEOUT (it and anything it
    started, like a credential helper, are killed: they share a new process group)."""
    try:
        process = subprocess.Popen(
            ["git", "-C", directory, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
    except OSError:  # git is not installed
        return None
    try:
        out, _ = process.communicate(timeout=GIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None
    return out if process.returncode == 0 else None


def describe(found: Any) -> str:
    """A short form for listings: ``sha256:1a2b3c4d5e6f git:0123456789ab+dirty``."""
    if not isinstance(found, dict) or not isinstance(found.get("sha256"), str):
        return ""
    text = f"sha256:{found['sha256'][:12]}"
    git = found.get("git")
    if isinstance(git, dict) and isinstance(git.get("commit"), str):
        text += f" git:{git['commit'][:12]}{'+dirty' if git.get('dirty') else ''}"
    return text


def warn_if_changed(recorded: Any, current: dict[str, Any] | None, uuid: str, module: str) -> None:
    """Warn when the run's recorded module sha256 differs from the current one."""
    if not isinstance(recorded, dict) or current is None:
        return
    then = recorded.get("sha256")
    if not isinstance(then, str) or then == current["sha256"]:
        return
    warnings.warn(
        f"run {uuid} ({module}) was computed by different code: {describe(recorded) or then[:12]} "
        f"then, {describe(current)} now ({current['file']}); its results come from the old code. "
        "Change the config (or the project name) to compute it again with this code.",
        CodeChangedWarning,
        stacklevel=3,
    )


def forget() -> None:
    """Drop the per-process cache (tests)."""
    with _lock:
        _cache.clear()
