"""task: ix_task_queue replaces ix_task_dispatch (one line's tasks in queue order)

Dispatch reads a line's first waiting tasks in queue order (priority DESC, star DESC,
due_at, id). With ix_task_dispatch (business_line, status, due_at) MariaDB sorted the
line's whole backlog on every read; ix_task_queue lets it walk each status in that order
and stop after the few rows it needs (descending key parts: MariaDB >= 10.8). Nothing
else used ix_task_dispatch: it goes, so a task write maintains as many indexes as before.

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
    op.drop_index("ix_task_dispatch", table_name="task")
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
    op.create_index("ix_task_dispatch", "task", ["business_line", "status", "due_at"])
    op.drop_index("ix_task_queue", table_name="task")
