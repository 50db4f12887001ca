"""The index: SQLAlchemy models, the engine, migrations and queries."""
