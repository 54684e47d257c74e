"""ui allow-list: addresses and networks allowed to reach the dashboard and API
over TCP (an empty list: every address)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-10
"""

import sqlalchemy as sa
from alembic import op

from den.db.models import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ui_allow",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("network", sa.String(length=64), nullable=False),
        sa.Column("note", sa.String(length=200), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("network"),
    )


def downgrade() -> None:
    op.drop_table("ui_allow")
