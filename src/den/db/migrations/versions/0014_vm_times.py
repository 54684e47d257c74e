"""started and stopped times of workspaces (the compute manager's VM model)

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

from den.db.models import UTCDateTime

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workspaces", schema=None) as batch_op:
        batch_op.add_column(sa.Column("started_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("stopped_at", UTCDateTime(), nullable=True))
    # A workspace running or suspended now has been up since at least its
    # creation (the closest den knew before it kept the time).
    op.execute(
        "UPDATE workspaces SET started_at = created_at WHERE state IN ('running', 'suspended')"
    )


def downgrade() -> None:
    with op.batch_alter_table("workspaces", schema=None) as batch_op:
        batch_op.drop_column("stopped_at")
        batch_op.drop_column("started_at")
