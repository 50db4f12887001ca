"""Indexes that also serve ordering by uuid: (project, module, uuid) and (status, uuid).

With the old single-purpose indexes, a filter on status or module made SQLite collect
every match and sort it by uuid before applying a limit or the next page of all().

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_project_module")
        batch_op.drop_index("ix_runs_status")
        batch_op.create_index("ix_runs_project_module_uuid", ["project", "module", "uuid"], unique=False)
        batch_op.create_index("ix_runs_status_uuid", ["status", "uuid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_status_uuid")
        batch_op.drop_index("ix_runs_project_module_uuid")
        batch_op.create_index("ix_runs_status", ["status"], unique=False)
        batch_op.create_index("ix_runs_project_module", ["project", "module"], unique=False)
