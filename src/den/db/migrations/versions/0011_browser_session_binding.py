"""browser sessions signed in on den's own TCP listener are bound to the client
address they signed in from (their cookie reaches every port of that host);
sessions from before are signed out (which door made them is not known)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-12
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from den.db.models import UTCDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("browser_sessions") as batch:
        batch.add_column(sa.Column("bound_client", sa.String(length=64), nullable=True))
    # An older TCP listener's session would stay good from anywhere: sign every one out.
    sessions = sa.table("browser_sessions", sa.column("revoked_at", UTCDateTime()))
    op.execute(
        sessions.update()
        .where(sessions.c.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )


def downgrade() -> None:
    with op.batch_alter_table("browser_sessions") as batch:
        batch.drop_column("bound_client")
