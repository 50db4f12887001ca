"""The index: SQLAlchemy models, the engine, migrations and queries."""

# Registers http(s) URLs with Index, so Index("http://...") reads a catalog server.
from machinable.catalog import remote as _remote  # noqa: F401
