"""egress rules: admin exceptions to the default egress policy

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

from den.db.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "egress_rules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("dest", sa.String(length=64), nullable=False),
        sa.Column("proto", sa.String(length=8), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("workspace_id", sa.String(length=32), nullable=True),
        sa.Column("note", sa.String(length=200), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("egress_rules", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_egress_rules_user_id"), ["user_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_egress_rules_workspace_id"), ["workspace_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("egress_rules", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_egress_rules_workspace_id"))
        batch_op.drop_index(batch_op.f("ix_egress_rules_user_id"))
    op.drop_table("egress_rules")
