"""Config leaves: every value inside a run's config and predicate as a typed, indexed row.

Creates ``leaves`` and fills it from the runs already indexed, in batches. The runs
table is not touched, so search indexes a user added (``ix_search_*``) stay as they are.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from machinable.catalog.leaves import leaf_rows

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BATCH = 2000


def upgrade() -> None:
    leaves = op.create_table(
        "leaves",
        sa.Column("run_uuid", sa.String(length=32), nullable=False),
        sa.Column("path", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=1), nullable=False),
        sa.Column("number", sa.Double(), nullable=True),
        sa.Column(
            "text",
            sa.String(length=500).with_variant(sa.String(length=500, collation="C"), "postgresql"),
            nullable=True,
        ),
        sa.Column("scope", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_uuid"], ["runs.uuid"], name=op.f("fk_leaves_run_uuid_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_uuid", "path", name=op.f("pk_leaves")),
        sqlite_with_rowid=False,
    )
    runs = sa.table(
        "runs",
        sa.column("uuid", sa.String),
        sa.column("project", sa.String),
        sa.column("module", sa.String),
        sa.column("config", sa.JSON),
        sa.column("predicate", sa.JSON),
    )
    bind = op.get_bind()
    last = ""
    while True:
        batch = bind.execute(
            sa.select(runs.c.uuid, runs.c.project, runs.c.module, runs.c.config, runs.c.predicate)
            .where(runs.c.uuid > last)
            .order_by(runs.c.uuid)
            .limit(BATCH)
        ).all()
        if not batch:
            break
        rows = [row for values in batch for row in leaf_rows(*values)]
        if rows:
            bind.execute(leaves.insert(), rows)
        last = batch[-1][0]
    # Indexes after the fill: building them once is faster than maintaining them per row.
    with op.batch_alter_table("leaves", schema=None) as batch_op:
        batch_op.create_index(
            "ix_leaves_path_kind_number_text", ["path", "kind", "number", "text", "scope", "run_uuid"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("leaves", schema=None) as batch_op:
        batch_op.drop_index("ix_leaves_path_kind_number_text")
    op.drop_table("leaves")
