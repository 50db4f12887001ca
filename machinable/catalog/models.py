"""Declarative models of the index. The index is a cache of the record directories."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Double,
    ForeignKey,
    Index,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


JSON_TYPE = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {
        dict[str, Any]: JSON_TYPE,
        Any: JSON_TYPE,
        datetime: DateTime(timezone=True),
    }


class Run(Base):
    """One run: its identity, config and status as its record directory states them."""

    __tablename__ = "runs"

    uuid: Mapped[str] = mapped_column(String(32), primary_key=True)
    project: Mapped[str] = mapped_column(String(255))
    module: Mapped[str] = mapped_column(String(255))
    config_key: Mapped[str] = mapped_column(String(32))
    predicate_key: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]]
    canonical: Mapped[dict[str, Any]]
    predicate: Mapped[dict[str, Any]]
    version: Mapped[Any]
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    updated_at: Mapped[datetime | None]
    # sha256 of the run's manifest (every file but the status markers), recorded when
    # first computed: the content every copy of this run must have.
    digest: Mapped[str | None] = mapped_column(String(64))

    locations: Mapped[list[Location]] = relationship(
        back_populates="run", lazy="raise", cascade="all, delete-orphan", passive_deletes=True
    )
    availability: Mapped[list[Availability]] = relationship(
        back_populates="run", lazy="raise", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        # uuid last: all() pages by uuid and search orders by uuid by default, so these
        # indexes serve the filter and the order together (no sort of every match).
        Index("ix_runs_project_module_uuid", "project", "module", "uuid"),
        Index("ix_runs_status_uuid", "status", "uuid"),
        Index("ix_runs_created_at", "created_at"),
    )


# Ordering and comparison of leaf text is by code point on both backends ("C" on PostgreSQL,
# SQLite's BINARY), whatever the database's default collation.
LEAF_TEXT = String(500).with_variant(String(500, collation="C"), "postgresql")


class Leaf(Base):
    """One value inside a run's config or predicate, typed (see ``catalog.leaves``).

    Written in the same transaction as its run's row, deleted with it (cascade). One
    index serves every kind: a number's ``text`` and a string's ``number`` are NULL,
    which both databases seek as an equality, so a filter or an order on any path
    seeks rather than scans. (One index, not one per kind: a launch's 20 leaves dirty
    about 20 index pages per index, which is most of a launch's database cost.)
    """

    __tablename__ = "leaves"

    run_uuid: Mapped[str] = mapped_column(
        String(32), ForeignKey("runs.uuid", ondelete="CASCADE"), primary_key=True
    )
    path: Mapped[str] = mapped_column(String(255), primary_key=True)
    kind: Mapped[str] = mapped_column(String(1))
    number: Mapped[float | None] = mapped_column(Double)
    text: Mapped[str | None] = mapped_column(LEAF_TEXT)
    scope: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        Index("ix_leaves_path_kind_number_text", "path", "kind", "number", "text", "scope", "run_uuid"),
        {"sqlite_with_rowid": False},
    )


class Location(Base):
    """Where a run's directory lies on this machine (a storage root and the full path)."""

    __tablename__ = "locations"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_uuid: Mapped[str] = mapped_column(ForeignKey("runs.uuid", ondelete="CASCADE"))
    storage: Mapped[str] = mapped_column(String(4096))
    directory: Mapped[str] = mapped_column(String(4096))
    # The directory's mtime when a reindex last read it: an unchanged mtime lets an
    # incremental reindex skip the directory (every record write renames into it).
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger)

    run: Mapped[Run] = relationship(back_populates="locations", lazy="raise")

    __table_args__ = (
        UniqueConstraint("run_uuid", "directory", name="uq_locations_run_uuid_directory"),
        Index("ix_locations_storage", "storage"),
    )


class Remote(Base):
    """A remote store: an fsspec URL. Credentials are never stored here."""

    __tablename__ = "remotes"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    url: Mapped[str] = mapped_column(String(4096), unique=True)
    created_at: Mapped[datetime]

    availability: Mapped[list[Availability]] = relationship(
        back_populates="remote", lazy="raise", cascade="all, delete-orphan", passive_deletes=True
    )


class Availability(Base):
    """The state of one run's data in one remote store, and when it was last verified."""

    __tablename__ = "availability"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_uuid: Mapped[str] = mapped_column(ForeignKey("runs.uuid", ondelete="CASCADE"))
    remote_id: Mapped[int] = mapped_column(ForeignKey("remotes.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16))
    size: Mapped[int | None] = mapped_column(BigInteger)
    checksum: Mapped[str | None] = mapped_column(String(64))
    verified_at: Mapped[datetime | None]

    run: Mapped[Run] = relationship(back_populates="availability", lazy="raise")
    remote: Mapped[Remote] = relationship(back_populates="availability", lazy="raise")

    __table_args__ = (
        UniqueConstraint("run_uuid", "remote_id", name="uq_availability_run_uuid_remote_id"),
        Index("ix_availability_remote_id", "remote_id"),
    )
