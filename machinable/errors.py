"""Errors raised by machinable.

Every error the library raises on purpose derives from ``MachinableError``, so a
caller (and the CLI) can catch one class. Storage failures stay in the ``OSError``
family (``FileNotFoundError``, ``FileExistsError``) where that is what they are.

    MachinableError
    ├── ConfigError              a config failed validation or cannot be hashed
    ├── ModuleResolutionError    a module name does not resolve to an Interface
    ├── RecordError              a record directory is unreadable or inconsistent
    │   └── IdentityCollision    two different runs claim one uuid
    ├── PathEscapeError          a file name points outside the run directory
    ├── IndexError_              the index cannot be opened, migrated or queried
    │   └── IndexNewerThanCode   the index schema is newer than this version
    ├── QueryError               a search expression is malformed
    ├── StoreError               a remote store transfer or check failed
    │   ├── NotMountedError      the run's files are not present locally
    │   └── EvictionRefused      no other verified copy exists
    └── RemoteError              a shareable module could not be fetched or trusted

    IdentityWarning (a UserWarning)  runs that differ only in non-identifying fields
                                     would share one uuid
"""

from __future__ import annotations

from pathlib import Path


class MachinableError(Exception):
    """Base class of every error machinable raises on purpose."""


class ConfigError(MachinableError, ValueError):
    """A config failed validation or holds a value that cannot be hashed."""

    def __init__(self, message: str, *, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module


class ModuleResolutionError(MachinableError, LookupError):
    """A module name does not resolve to an importable Interface."""

    def __init__(self, message: str, *, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module


class RecordError(MachinableError):
    """A record directory is unreadable, incomplete or inconsistent."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class IdentityCollision(RecordError):
    """A directory claims a uuid that the index already holds with another identity."""

    def __init__(self, message: str, *, uuid: str, path: str | Path | None = None) -> None:
        super().__init__(message, path=path)
        self.uuid = uuid


class PathEscapeError(MachinableError, ValueError):
    """A file name would resolve outside the run directory."""

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name


class IndexError_(MachinableError):
    """The index cannot be opened, migrated or queried."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class IndexNewerThanCode(IndexError_):
    """The index was migrated by a newer machinable than this one."""


class QueryError(MachinableError, ValueError):
    """A search expression is malformed or names an unknown field."""


class StoreError(MachinableError):
    """A remote store transfer or verification failed."""

    def __init__(self, message: str, *, uuid: str | None = None, store: str | None = None) -> None:
        super().__init__(message)
        self.uuid = uuid
        self.store = store


class NotMountedError(StoreError, FileNotFoundError):
    """The run's files are not present on this machine."""


class EvictionRefused(StoreError):
    """Evicting would leave no other verified copy of the run."""


class RemoteError(MachinableError):
    """A shareable module could not be fetched, verified or trusted."""

    def __init__(self, message: str, *, name: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.source = source


class IdentityWarning(UserWarning):
    """Runs that differ only in non-identifying fields would share one uuid."""
