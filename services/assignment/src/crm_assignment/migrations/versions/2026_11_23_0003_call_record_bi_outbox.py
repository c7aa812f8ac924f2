"""call_record (RecordCall) and bi_outbox (call records, presence changes to the BI log)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def _ts(name: str, nullable: bool = False, comment: str | None = None) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, mysql.DATETIME(fsp=6), nullable=nullable, comment=comment)


def _name(name: str) -> sa.Column:  # type: ignore[type-arg]
    """An enum stored by its name (SQLAlchemy Enum with native_enum=False)."""
    return sa.Column(name, sa.String(24), nullable=False)


def upgrade() -> None:
    op.create_table(
        "call_record",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column(
            "call_id",
            sa.String(128, collation="ascii_nopad_bin"),
            nullable=False,
            comment="client idempotency key",
        ),
        sa.Column("request_hash", sa.String(64, collation="ascii_bin"), nullable=False),
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        sa.Column("agent_id", sa.BigInteger(), nullable=False),
        _name("call_type"),
        _name("provider"),
        _name("outcome"),
        _ts("started_at"),
        sa.Column("duration_s", sa.Integer(), nullable=False),
        sa.Column("note", sa.String(500), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(["task_id"], ["task.id"], name=op.f("fk_call_record_task_id_task")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_call_record")),
        sa.UniqueConstraint("call_id", name=op.f("uq_call_record_call_id")),
        **TABLE,
    )
    op.create_index("ix_call_record_task_id", "call_record", ["task_id", "id"])
    op.create_table(
        "bi_outbox",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column(
            "schema_name",
            sa.String(128, collation="ascii_bin"),
            nullable=False,
            comment="full name of the bilog schema",
        ),
        sa.Column("payload", sa.JSON(), nullable=False, comment="the event, as bilog takes it"),
        _ts("created_at"),
        _ts("published_at", True, "when bilog acknowledged the BI event; NULL: not yet"),
        sa.Column(
            "publish_error",
            sa.String(500),
            nullable=True,
            comment="why bilog rejected the BI event (it is skipped until cleared)",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bi_outbox")),
        **TABLE,
    )
    op.create_index("ix_bi_outbox_pending", "bi_outbox", ["published_at", "id"])


def downgrade() -> None:
    op.drop_table("bi_outbox")  # its indexes go with it
    op.drop_table("call_record")
