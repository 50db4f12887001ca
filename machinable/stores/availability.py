"""Availability: which store holds which run, in which state, as rows of the index.

The ``remotes`` table names each store by its canonical URI (never its options or
credentials); ``availability`` holds one row per (run, store): present, partial,
missing or evicted, with the copy's size, content checksum and when it was last
verified. Every function here takes the ``Index`` and store identity as values.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, func, select

from machinable.catalog.engine import retry_busy
from machinable.catalog.index import aware
from machinable.catalog.models import Availability, Remote
from machinable.errors import StoreError

if TYPE_CHECKING:
    from machinable.catalog.index import Index
    from machinable.stores.protocol import RemoteStore

REMOTES = Remote.__table__
AVAILABILITY = Availability.__table__


@dataclass(frozen=True)
class Copy:
    """One known copy of a run: local or in a store."""

    store: str
    url: str
    state: str
    size: int | None = None
    checksum: str | None = None
    verified_at: datetime | None = None


def register(index: Index, store: RemoteStore) -> int:
    """The store's id in the index's ``remotes`` table (added on first use)."""
    uri, name = store.uri, store.name

    def write() -> int:
        with index.engine.execution_options(machinable_write=True).begin() as conn:
            found = conn.execute(select(REMOTES.c.id, REMOTES.c.name).where(REMOTES.c.url == uri)).first()
            if found is not None:
                return int(found[0])
            clash = conn.execute(select(REMOTES.c.url).where(REMOTES.c.name == name)).scalar()
            if clash is not None:
                raise StoreError(
                    f"a store named {name!r} is already registered for {clash}; pick another name",
                    store=uri,
                )
            return int(
                conn.execute(
                    REMOTES.insert().values(name=name, url=uri, created_at=datetime.now(timezone.utc))
                ).inserted_primary_key[0]
            )

    return retry_busy(write)


def record_copies(index: Index, remote_id: int, states: dict[str, dict[str, Any]]) -> None:
    """Upsert availability rows: {uuid: {state, size, checksum, verified_at}}."""
    if not states:
        return
    rows = [
        {
            "run_uuid": uuid,
            "remote_id": remote_id,
            "state": values["state"],
            "size": values.get("size"),
            "checksum": values.get("checksum"),
            "verified_at": values.get("verified_at"),
        }
        for uuid, values in states.items()
    ]

    def write() -> None:
        with index.engine.execution_options(machinable_write=True).begin() as conn:
            stmt = index.upsert(AVAILABILITY)
            # A listing says "present" without checksums: keep what an earlier
            # verification learned, unless the copy is no longer present.
            keep = {
                k: case(
                    (stmt.excluded.state == "present", func.coalesce(stmt.excluded[k], AVAILABILITY.c[k])),
                    else_=stmt.excluded[k],
                )
                for k in ("size", "checksum", "verified_at")
            }
            stmt = stmt.on_conflict_do_update(
                index_elements=[AVAILABILITY.c.run_uuid, AVAILABILITY.c.remote_id],
                set_={"state": stmt.excluded.state, **keep},
            )
            for start in range(0, len(rows), 2000):
                conn.execute(stmt, rows[start : start + 2000])

    retry_busy(write)


def copies(index: Index, uuid: str) -> list[Copy]:
    """Every store copy of a run the index knows of, most recently verified first."""
    with index.engine.connect() as conn:
        rows = conn.execute(
            select(
                REMOTES.c.name,
                REMOTES.c.url,
                AVAILABILITY.c.state,
                AVAILABILITY.c.size,
                AVAILABILITY.c.checksum,
                AVAILABILITY.c.verified_at,
            )
            .join(REMOTES, REMOTES.c.id == AVAILABILITY.c.remote_id)
            .where(AVAILABILITY.c.run_uuid == uuid)
        ).all()
    found = [
        Copy(name, url, state, size, checksum, aware(verified))
        for name, url, state, size, checksum, verified in rows
    ]
    epoch = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(found, key=lambda c: (c.state != "present", -(c.verified_at or epoch).timestamp()))


def known_stores(index: Index) -> list[tuple[str, str]]:
    with index.engine.connect() as conn:
        return [(name, url) for name, url in conn.execute(select(REMOTES.c.name, REMOTES.c.url).order_by(REMOTES.c.id))]
