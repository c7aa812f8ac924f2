"""job: request id and W3C traceparent of the Schedule call (issue #9)

The target call of a job carries them, so the request id and the trace of the caller
go on through the scheduler. Nullable: jobs scheduled before (or without) them have none.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 18:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "job",
        sa.Column(
            "request_id",
            sa.String(128, collation="ascii_bin"),
            nullable=True,
            comment="x-request-id of the Schedule call, sent on the target call",
        ),
    )
    op.add_column(
        "job",
        sa.Column(
            "traceparent",
            sa.String(64, collation="ascii_bin"),
            nullable=True,
            comment="W3C traceparent of the Schedule call: the target call continues it",
        ),
    )


def downgrade() -> None:
    op.drop_column("job", "traceparent")
    op.drop_column("job", "request_id")
