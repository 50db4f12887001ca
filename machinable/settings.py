"""Environment variables, read in one place and at call time."""

from __future__ import annotations

import os


def index_setting() -> str | None:
    """``MACHINABLE_INDEX``: a path to a SQLite file or a SQLAlchemy URL."""
    return os.environ.get("MACHINABLE_INDEX") or None


def storage_setting() -> str | None:
    """``MACHINABLE_STORAGE``: the default storage directory."""
    return os.environ.get("MACHINABLE_STORAGE") or None


def remote_timeout() -> float:
    """``MACHINABLE_REMOTE_TIMEOUT``: seconds before a remote download gives up."""
    return float(os.environ.get("MACHINABLE_REMOTE_TIMEOUT") or 30)
