"""dotfiles: a user's default repository, and each workspace's with how its last run went

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-13
"""

import sqlalchemy as sa
from alembic import op

from den.db.models import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("dotfiles_url", sa.String(length=2048), nullable=False, server_default="")
        )
    with op.batch_alter_table("workspaces", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("dotfiles_url", sa.String(length=2048), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("dotfiles_state", sa.String(length=16), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("dotfiles_log", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("dotfiles_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workspaces", schema=None) as batch_op:
        batch_op.drop_column("dotfiles_at")
        batch_op.drop_column("dotfiles_log")
        batch_op.drop_column("dotfiles_state")
        batch_op.drop_column("dotfiles_url")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("dotfiles_url")
