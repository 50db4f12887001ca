"""Alembic environment for machinable's index.

Reuses ``config.attributes["connection"]`` when machinable migrates on first use;
otherwise connects to ``MACHINABLE_INDEX`` (path or URL) or the ini's URL.
"""

from __future__ import annotations

from alembic import context

from machinable.catalog.engine import make_engine, to_url
from machinable.catalog.models import Base
from machinable.settings import index_setting

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    """An index named by the caller (machinable's alembic_config) wins over the
    environment, which wins over alembic.ini."""
    explicit = config.get_main_option("machinable.url")
    if explicit:
        return explicit
    setting = index_setting()
    return to_url(setting) if setting else config.get_main_option("sqlalchemy.url")


def include_object(obj, name, type_, reflected, compare_to) -> bool:  # type: ignore[no-untyped-def]
    """Search indexes (Index.add_search_index) are the user's, not the schema's."""
    return not (type_ == "index" and str(name or "").startswith("ix_search_"))


def _configure(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        include_object=include_object,
    )


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    with engine.connect() as connection:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
