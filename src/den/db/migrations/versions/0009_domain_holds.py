"""domain holds: a verified custom domain stays its owner's for a while after
its claim went, so another owner cannot take it over meanwhile

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

from den.db.models import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "domain_holds",
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("until", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("domain"),
    )
    op.create_index("ix_domain_holds_user_id", "domain_holds", ["user_id"])


def downgrade() -> None:
    op.drop_table("domain_holds")
