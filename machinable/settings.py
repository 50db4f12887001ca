"""Environment variables, read in one place and at call time."""

from __future__ import annotations

import os
import signal


def index_setting() -> str | None:
    """``MACHINABLE_INDEX``: a path to a SQLite file or a SQLAlchemy URL."""
    return os.environ.get("MACHINABLE_INDEX") or None


def storage_setting() -> str | None:
    """``MACHINABLE_STORAGE``: the default storage directory."""
    return os.environ.get("MACHINABLE_STORAGE") or None


def remote_timeout() -> float:
    """``MACHINABLE_REMOTE_TIMEOUT``: seconds before a remote download gives up."""
    return float(os.environ.get("MACHINABLE_REMOTE_TIMEOUT") or 30)


def kill_point(name: str, count: int) -> None:
    """A test hook, inert unless ``MACHINABLE_TEST_KILL_AT`` is ``name:N``: then the
    process SIGKILLs itself when ``count`` reaches N (tests kill a child at a named
    point instead of polling for a window to kill it in)."""
    wanted = os.environ.get("MACHINABLE_TEST_KILL_AT")
    if wanted and wanted.startswith(name + ":") and wanted[len(name) + 1 :].isdigit():
        if count >= int(wanted[len(name) + 1 :]):
            os.kill(os.getpid(), signal.SIGKILL)


def kill_at() -> str | None:
    """``MACHINABLE_TEST_KILL_AT``: tests only (see ``kill_point``)."""
    return os.environ.get("MACHINABLE_TEST_KILL_AT") or None
