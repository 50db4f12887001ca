"""machinable: a content-addressed catalog of research runs."""

from __future__ import annotations

from machinable.catalog.index import Index
from machinable.catalog.query import Field
from machinable.errors import MachinableError
from machinable.identity import NotIdentifying
from machinable.interface import Interface, get
from machinable.project import Project
from machinable.scope import Scope
from machinable.storage import Storage
from machinable.stores import RemoteStore

__version__ = "0.1.0"

__all__ = [
    "Field",
    "Index",
    "Interface",
    "MachinableError",
    "NotIdentifying",
    "Project",
    "RemoteStore",
    "Scope",
    "Storage",
    "__version__",
    "get",
]
