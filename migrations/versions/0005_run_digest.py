"""A run's content digest: sha256 of its manifest, recorded when first computed.

Nullable: a run gets its digest when it is first pushed, evicted or verified with
checksums (DESIGN.md, "Copies and their content"). ``availability.checksum`` holds each
store copy's digest from now on.

Revision ID: 0005
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("digest", sa.String(length=64), nullable=True))
    # availability.checksum now holds a copy's digest; what older versions stored there
    # (a checksum that covered the status markers too) would read as a conflict.
    op.execute("UPDATE availability SET checksum = NULL")


def downgrade() -> None:
    # Not batch mode: on SQLite that copies and drops ``runs``, and dropping the parent
    # table cascades into locations and availability. SQLite >= 3.35 drops a column
    # in place.
    op.execute("ALTER TABLE runs DROP COLUMN digest")
