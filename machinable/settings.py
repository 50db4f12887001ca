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


def token_setting() -> str | None:
    """``MACHINABLE_TOKEN``: the bearer token sent to a remote catalog server."""
    return (os.environ.get("MACHINABLE_TOKEN") or "").strip() or None


def cache_setting() -> str:
    """``MACHINABLE_CACHE``: where files read from remote catalogs are kept (default
    ``$XDG_CACHE_HOME/machinable`` or ``~/.cache/machinable``)."""
    explicit = os.environ.get("MACHINABLE_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "machinable")
