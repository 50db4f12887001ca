"""Storage: the directory that run directories are written into.

``Storage.get()`` is the innermost ``with Storage(...)``, else ``MACHINABLE_STORAGE``,
else ``storage/`` in the connected project. Relative paths resolve against the project
that is connected when the storage is used; absolute paths are used as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

from machinable.catalog.index import Defaults, set_defaults
from machinable.context import Context, innermost
from machinable.errors import MachinableError
from machinable.project import Project
from machinable.settings import storage_setting


class Storage(Context):
    """A location for run directories, usable as a context."""

    def __init__(self, path: str | os.PathLike[str]):
        spec = os.fspath(path)
        if not spec.strip():
            raise MachinableError("Storage(''): the storage path is empty")
        if "://" in spec:
            protocol, _, rest = spec.partition("://")
            if protocol != "file":
                raise MachinableError(
                    f"Storage({spec!r}): only local directories hold runs directly; "
                    "use RemoteStore to mirror runs to a remote filesystem"
                )
            spec = rest
        self.spec = spec

    def __repr__(self) -> str:
        return f"Storage({self.spec!r})"

    @classmethod
    def get(cls) -> Storage:
        return innermost(Storage) or Storage(storage_setting() or "storage")

    def directory(self, project: Project | None = None) -> Path:
        """The absolute storage directory (relative specs join the project path)."""
        spec = self.spec
        relative = not spec.startswith(("/", "~"))  # a guess only: the key stays exact
        root = (project or Project.get()).path if relative else None
        key = (spec, root)
        found = _directories.get(key)
        if found is None:
            path = Path(spec).expanduser()
            if not path.is_absolute():
                path = (root or (project or Project.get()).path) / path
            found = Path(os.path.abspath(path))
            if not spec.startswith("~") and len(_directories) < 1000:  # ~ follows $HOME
                _directories[key] = found
        return found


# (spec, project path or None) -> directory: a pure function of the spec and, for a
# relative spec, the project path ("~" aside); every get() asks.
_directories: dict[tuple[str, Path | None], Path] = {}


# The catalog knows no project: tell it where the connected project's index and
# storage are, for ``Index.get()`` and ``Index().reindex()`` without arguments.
set_defaults(
    Defaults(
        index_path=lambda: Project.get().index_path,
        storage_directory=lambda: Storage.get().directory(),
    )
)
