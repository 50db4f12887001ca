"""Errors raised by machinable.

Every error the library raises on purpose derives from ``MachinableError``, so a
caller (and the CLI) can catch one class. Storage failures stay in the ``OSError``
family (``FileNotFoundError``, ``FileExistsError``) where that is what they are.

    MachinableError
    ├── ConfigError              a config failed validation or cannot be hashed
    ├── ModuleResolutionError    a module name does not resolve to an Interface
    ├── ProjectNotFound          the named project directory does not exist
    ├── RecordError              a record directory is unreadable or inconsistent
    │   ├── IdentityCollision    two different runs claim one uuid
    │   ├── UnsafeFileError      a link, FIFO, device or oversized file where a small regular file belongs
    │   └── PickleRefused        a pickle this user did not write, loaded without allow_pickle=True
    ├── LockTimeout              a lock stayed held by another process
    ├── PathEscapeError          a file name points outside the run directory
    ├── IndexError_              the index cannot be opened, migrated or queried
    │   ├── IndexNewerThanCode   the index schema is newer than this version
    │   └── RemoteCatalogError   a catalog server refused a request or cannot be reached
    │       └── ReadOnlyCatalog  a remote catalog cannot launch or record runs
    ├── QueryError               a search expression is malformed
    ├── ReindexRefused           reindex of a missing or empty storage would drop every run there
    ├── StoreError               a remote store transfer or check failed
    │   ├── NotMountedError      the run's files are not present locally
    │   ├── CopyConflict         a store holds a complete copy of the run with another digest
    │   └── EvictionRefused      no other verified copy exists
    ├── RemoteError              a shareable module could not be fetched or trusted
    └── ServeError               the catalog server cannot start as asked

    IdentityWarning (a UserWarning)  runs that differ only in non-identifying fields
                                     would share one uuid
"""

from __future__ import annotations

import os
from pathlib import Path

from machinable.redact import redact


class MachinableError(Exception):
    """Base class of every error machinable raises on purpose.

    Its message never carries credentials: URL passwords and tokens are masked here,
    so no error, log line or CLI output built from one can leak them.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(arg) if isinstance(arg, str) else arg for arg in args))


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


class ProjectNotFound(MachinableError, FileNotFoundError):
    """The named project directory does not exist."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = path


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


class UnsafeFileError(RecordError, OSError):
    """A path machinable reads or locks is a link, a FIFO, a device, or too large."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        RecordError.__init__(self, message, path=path)
        self.message = redact(message)

    def __str__(self) -> str:  # not OSError's "[Errno None] ..." form
        return self.message


class PickleRefused(RecordError):
    """A pickle that this user's key did not sign was loaded without ``allow_pickle=True``."""


class LockTimeout(MachinableError, TimeoutError):
    """A lock file stayed held by another process past the timeout."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        MachinableError.__init__(self, message)
        self.path = path


class PathEscapeError(MachinableError, ValueError):
    """A file name would resolve outside the run directory."""

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name


class IndexError_(MachinableError):
    """The index cannot be opened, migrated or queried."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = redact(url) if url is not None else None


class IndexNewerThanCode(IndexError_):
    """The index was migrated by a newer machinable than this one."""


class RemoteCatalogError(IndexError_):
    """A catalog server refused a request, answered nonsense, or cannot be reached."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None) -> None:
        super().__init__(message, url=url)
        self.status = status


class ReadOnlyCatalog(RemoteCatalogError):
    """A remote catalog is read-only: runs cannot be launched or recorded through it."""


class QueryError(MachinableError, ValueError):
    """A search expression is malformed or names an unknown field."""

    def __init__(self, message: str, *, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


class ReindexRefused(MachinableError):
    """Reindexing a missing or empty storage root would drop every run the index holds there."""

    def __init__(self, message: str, *, storage: str) -> None:
        super().__init__(message)
        self.storage = storage


class StoreError(MachinableError):
    """A remote store transfer or verification failed."""

    def __init__(self, message: str, *, uuid: str | None = None, store: str | None = None) -> None:
        super().__init__(message)
        self.uuid = uuid
        self.store = redact(store) if store is not None else None


class NotMountedError(StoreError, FileNotFoundError):
    """The run's files are not present on this machine."""


class CopyConflict(StoreError):
    """A store holds a complete copy of the run whose digest differs from this copy's."""

    def __init__(
        self,
        message: str,
        *,
        uuid: str | None = None,
        store: str | None = None,
        conflicts: dict[str, tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message, uuid=uuid, store=store)
        #: uuid -> (the store's digest, this copy's digest)
        self.conflicts = dict(conflicts or {})


class EvictionRefused(StoreError):
    """Evicting would leave no other verified copy of the run."""


class RemoteError(MachinableError):
    """A shareable module could not be fetched, verified or trusted."""

    def __init__(self, message: str, *, name: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.source = redact(source) if source is not None else None


class ServeError(MachinableError):
    """The catalog server cannot start as asked (a bad flag, token file or project)."""


class IdentityWarning(UserWarning):
    """Runs that differ only in non-identifying fields would share one uuid."""
