"""audit rows of workspace.exec keep command input as names and lengths only

Rows written before den stopped storing exec env values, stdin and arguments
in clear are rewritten the way new rows are written (den.log.input_shapes).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from den.log import input_shapes

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_BATCH = 500


def upgrade() -> None:
    events = sa.table(
        "audit_events",
        sa.column("id", sa.Integer),
        sa.column("method"),
        sa.column("params", sa.JSON),
    )
    conn = op.get_bind()
    last = 0
    while True:
        rows = conn.execute(
            sa.select(events.c.id, events.c.params)
            .where(events.c.method == "workspace.exec", events.c.id > last)
            .order_by(events.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            return
        for row_id, params in rows:
            if isinstance(params, dict):
                shaped = input_shapes(params)
                if shaped != params:
                    conn.execute(events.update().where(events.c.id == row_id).values(params=shaped))
        last = rows[-1][0]


def downgrade() -> None:
    pass  # what was removed is gone on purpose
