"""workspace environment variables (sealed) and busy leases for the metadata service

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-20
"""

import sqlalchemy as sa
from alembic import op

from den.db.models import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "env_vars",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column(
            "ws_id",
            sa.String(length=32),
            sa.ForeignKey("workspaces.id", ondelete="CASCADE"),
            nullable=True,
        ),
        sa.Column(
            "user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True
        ),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("value_sealed", sa.Text(), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("scope", "key"),
    )
    op.create_index("ix_env_vars_ws_id", "env_vars", ["ws_id"])
    op.create_index("ix_env_vars_user_id", "env_vars", ["user_id"])
    op.create_table(
        "busy_leases",
        sa.Column(
            "ws_id",
            sa.String(length=32),
            sa.ForeignKey("workspaces.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("until", UTCDateTime(), nullable=False),
        sa.Column("by", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("busy_leases")
    op.drop_index("ix_env_vars_user_id", table_name="env_vars")
    op.drop_index("ix_env_vars_ws_id", table_name="env_vars")
    op.drop_table("env_vars")
