"""task_event as the outbox of BI events: published_at, publish_error

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-30 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows written before this migration are history, not pending BI events: they get
    # published_at = at, so the relay does not flood bilog with the whole audit trail.
    op.add_column(
        "task_event",
        sa.Column(
            "published_at",
            mysql.DATETIME(fsp=6),
            nullable=True,
            comment="when bilog acknowledged the BI event; NULL: not yet",
        ),
    )
    op.add_column(
        "task_event",
        sa.Column(
            "publish_error",
            sa.String(500),
            nullable=True,
            comment="why bilog rejected the BI event (it is skipped until cleared)",
        ),
    )
    op.execute("UPDATE task_event SET published_at = at")
    op.create_index("ix_task_event_outbox", "task_event", ["published_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_task_event_outbox", table_name="task_event")
    op.drop_column("task_event", "publish_error")
    op.drop_column("task_event", "published_at")
