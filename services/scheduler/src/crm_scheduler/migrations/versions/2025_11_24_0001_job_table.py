"""job table: the record of every delayed job

Revision ID: 0001
Revises:
Create Date: 2025-11-24 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def _ts(name: str, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, mysql.DATETIME(fsp=6), nullable=nullable)


def _ascii(name: str, length: int, nullable: bool = False, **kw: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.String(length, collation="ascii_bin"), nullable=nullable, **kw)


def upgrade() -> None:
    op.create_table(
        "job",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        _ascii("uid", 36, comment="UUID v5 of the key"),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        _ascii("spec_hash", 64),
        _ascii("name", 128),
        _ascii("target_method", 255),
        _ascii("target_address", 255),
        sa.Column("payload", mysql.MEDIUMBLOB(), nullable=False),
        _ts("eta"),
        _ascii("state", 16),
        _ts("due_at", nullable=True),
        _ts("lease_until", nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, comment="in the current run"),
        sa.Column("total_attempts", sa.Integer(), nullable=False),
        sa.Column("max_retries", sa.Integer(), nullable=False),
        sa.Column("backoff_initial_ms", sa.Integer(), nullable=False),
        sa.Column("backoff_max_ms", sa.Integer(), nullable=False),
        sa.Column("attempt_deadline_ms", sa.Integer(), nullable=False),
        sa.Column("dispatches", sa.Integer(), nullable=False, comment="messages sent"),
        sa.Column(
            "resends",
            sa.Integer(),
            nullable=False,
            comment="re-sends since the last claim (lease backoff)",
        ),
        sa.Column("reruns", sa.Integer(), nullable=False),
        _ascii("last_error_code", 32, nullable=True),
        sa.Column("last_error_message", sa.String(1024), nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("finished_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_job"),
        sa.UniqueConstraint("uid", name="uq_job_uid"),
        sa.UniqueConstraint("idempotency_key", name="uq_job_idempotency_key"),
        **TABLE,
    )
    op.create_index("ix_job_due_at", "job", ["due_at"])
    op.create_index("ix_job_lease_until", "job", ["lease_until"])
    op.create_index("ix_job_state_id", "job", ["state", "id"])
    op.create_index("ix_job_name_id", "job", ["name", "id"])
    op.create_index("ix_job_target_method_id", "job", ["target_method", "id"])


def downgrade() -> None:
    op.drop_table("job")
