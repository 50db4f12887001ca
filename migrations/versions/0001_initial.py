"""Initial schema: runs, their local locations, remote stores and availability.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "remotes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("url", sa.String(length=4096), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_remotes")),
        sa.UniqueConstraint("name", name=op.f("uq_remotes_name")),
        sa.UniqueConstraint("url", name=op.f("uq_remotes_url")),
    )
    op.create_table(
        "runs",
        sa.Column("uuid", sa.String(length=32), nullable=False),
        sa.Column("project", sa.String(length=255), nullable=False),
        sa.Column("module", sa.String(length=255), nullable=False),
        sa.Column("config_key", sa.String(length=32), nullable=False),
        sa.Column("predicate_key", sa.String(length=32), nullable=False),
        sa.Column(
            "config",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "canonical",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "predicate",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "version",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("uuid", name=op.f("pk_runs")),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index("ix_runs_created_at", ["created_at"], unique=False)
        batch_op.create_index("ix_runs_project_module", ["project", "module"], unique=False)
        batch_op.create_index("ix_runs_status", ["status"], unique=False)

    op.create_table(
        "availability",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_uuid", sa.String(length=32), nullable=False),
        sa.Column("remote_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("checksum", sa.String(length=64), nullable=True),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["remote_id"],
            ["remotes.id"],
            name=op.f("fk_availability_remote_id_remotes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_uuid"],
            ["runs.uuid"],
            name=op.f("fk_availability_run_uuid_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_availability")),
        sa.UniqueConstraint("run_uuid", "remote_id", name="uq_availability_run_uuid_remote_id"),
    )
    with op.batch_alter_table("availability", schema=None) as batch_op:
        batch_op.create_index("ix_availability_remote_id", ["remote_id"], unique=False)

    op.create_table(
        "locations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_uuid", sa.String(length=32), nullable=False),
        sa.Column("storage", sa.String(length=4096), nullable=False),
        sa.Column("directory", sa.String(length=4096), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_uuid"], ["runs.uuid"], name=op.f("fk_locations_run_uuid_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_locations")),
        sa.UniqueConstraint("run_uuid", "directory", name="uq_locations_run_uuid_directory"),
    )
    with op.batch_alter_table("locations", schema=None) as batch_op:
        batch_op.create_index("ix_locations_storage", ["storage"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("locations", schema=None) as batch_op:
        batch_op.drop_index("ix_locations_storage")

    op.drop_table("locations")
    with op.batch_alter_table("availability", schema=None) as batch_op:
        batch_op.drop_index("ix_availability_remote_id")

    op.drop_table("availability")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_status")
        batch_op.drop_index("ix_runs_project_module")
        batch_op.drop_index("ix_runs_created_at")

    op.drop_table("runs")
    op.drop_table("remotes")
