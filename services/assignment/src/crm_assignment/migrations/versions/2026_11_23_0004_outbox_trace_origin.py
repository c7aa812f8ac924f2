"""task_event, bi_outbox: request id and W3C traceparent of the request (issue #9)

The outbox relay sends each BI event with the request id of the request that made it
(bilog puts it on the Kafka record) and links its span to that request's trace.
Nullable: rows written before (or outside any request, by a background sweep) have none.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("task_event", "bi_outbox")


def upgrade() -> None:
    for table in _TABLES:
        op.add_column(
            table,
            sa.Column(
                "request_id",
                sa.String(128, collation="ascii_bin"),
                nullable=True,
                comment="x-request-id of the request that made the event (sent to bilog)",
            ),
        )
        op.add_column(
            table,
            sa.Column(
                "traceparent",
                sa.String(64, collation="ascii_bin"),
                nullable=True,
                comment="W3C traceparent of that request (tracing on): the relay links to it",
            ),
        )


def downgrade() -> None:
    for table in reversed(_TABLES):
        op.drop_column(table, "traceparent")
        op.drop_column(table, "request_id")
