"""Remote stores: copies of runs on any fsspec filesystem, and what the index knows of them.

- ``protocol``: ``RemoteStore``, the store a user connects or subclasses.
- ``manifest``: the per-file checksums that bind a copy to its content.
- ``transfer``: verified bulk push and fetch over fsspec (knows no index).
- ``availability``: the index rows of stores and of the copies they hold.
- ``runs``: push, mirror, fetch, evict and whereis for runs known by uuid.
"""

from __future__ import annotations

from machinable.stores.availability import (
    AVAILABILITY,
    REMOTES,
    Copy,
    copies,
    known_stores,
    record_copies,
    register,
)
from machinable.stores.protocol import RemoteStore
from machinable.stores.runs import (
    VERIFY_WINDOW,
    RunRef,
    candidate_stores,
    evict,
    fetch,
    fetch_many,
    mirror,
    push,
    resolve_store,
    whereis,
)

__all__ = [
    "AVAILABILITY",
    "REMOTES",
    "VERIFY_WINDOW",
    "Copy",
    "RemoteStore",
    "RunRef",
    "candidate_stores",
    "copies",
    "evict",
    "fetch",
    "fetch_many",
    "known_stores",
    "mirror",
    "push",
    "record_copies",
    "register",
    "resolve_store",
    "whereis",
]
