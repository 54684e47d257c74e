"""idle policy and metrics

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

from den.db.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "metric_samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("workspace_id", sa.String(length=32), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("cpu_seconds", sa.Double(), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("pids", sa.Integer(), nullable=False),
        sa.Column("net_rx_bytes", sa.BigInteger(), nullable=False),
        sa.Column("net_tx_bytes", sa.BigInteger(), nullable=False),
        sa.Column("disk_bytes", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("metric_samples", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_metric_samples_at"), ["at"], unique=False)
        batch_op.create_index("ix_metric_samples_ws_at", ["workspace_id", "at"], unique=False)

    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("idle_suspend", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("idle_stop", sa.Integer(), nullable=True))

    with op.batch_alter_table("workspaces", schema=None) as batch_op:
        batch_op.add_column(sa.Column("idle_suspend", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("idle_stop", sa.Integer(), nullable=True))


def downgrade() -> None:

    with op.batch_alter_table("workspaces", schema=None) as batch_op:
        batch_op.drop_column("idle_stop")
        batch_op.drop_column("idle_suspend")

    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("idle_stop")
        batch_op.drop_column("idle_suspend")

    with op.batch_alter_table("metric_samples", schema=None) as batch_op:
        batch_op.drop_index("ix_metric_samples_ws_at")
        batch_op.drop_index(batch_op.f("ix_metric_samples_at"))

    op.drop_table("metric_samples")
