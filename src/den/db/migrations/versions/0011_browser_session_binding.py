"""browser sessions signed in on den's own TCP listener are bound to the client
address they signed in from (their cookie reaches every port of that host)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-12
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("browser_sessions") as batch:
        batch.add_column(sa.Column("bound_client", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("browser_sessions") as batch:
        batch.drop_column("bound_client")
