"""task: ix_task_queue, one line's waiting tasks in queue order per status

Dispatch reads a line's first waiting tasks in queue order (priority DESC, star DESC,
due_at, id). With only ix_task_dispatch (business_line, status, due_at) MariaDB sorted
the line's whole backlog on every read; this index lets it walk each status in that
order and stop after the few rows it needs (descending key parts: MariaDB >= 10.8).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_task_queue",
        "task",
        [
            "business_line",
            "status",
            sa.text("priority DESC"),
            sa.text("star DESC"),
            "due_at",
            "id",
        ],
    )


def downgrade() -> None:
    op.drop_index("ix_task_queue", table_name="task")
