"""Environment variables, read in one place and at call time."""

from __future__ import annotations

import os
from pathlib import Path


def index_setting() -> str | None:
    """``MACHINABLE_INDEX``: a path to a SQLite file or a SQLAlchemy URL."""
    return os.environ.get("MACHINABLE_INDEX") or None


def storage_setting() -> str | None:
    """``MACHINABLE_STORAGE``: the default storage directory."""
    return os.environ.get("MACHINABLE_STORAGE") or None


def remote_timeout() -> float:
    """``MACHINABLE_REMOTE_TIMEOUT``: seconds a remote download may wait for the server
    to connect or to send the next bytes."""
    return float(os.environ.get("MACHINABLE_REMOTE_TIMEOUT") or 30)


def remote_deadline() -> float:
    """``MACHINABLE_REMOTE_DEADLINE``: seconds a remote download may take in all."""
    return float(os.environ.get("MACHINABLE_REMOTE_DEADLINE") or 120)


def remote_max_bytes() -> int:
    """``MACHINABLE_REMOTE_MAX_BYTES``: the largest module a remote may deliver."""
    return int(os.environ.get("MACHINABLE_REMOTE_MAX_BYTES") or 10 * 2**20)


def key_file() -> Path:
    """``MACHINABLE_KEY_FILE``: this user's signing key for pickles, kept outside every
    project (default ``$XDG_CONFIG_HOME/machinable/key``, else ``~/.config/machinable/key``)."""
    explicit = os.environ.get("MACHINABLE_KEY_FILE")
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "machinable" / "key"


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
