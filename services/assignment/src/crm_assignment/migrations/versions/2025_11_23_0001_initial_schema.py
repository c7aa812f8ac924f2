"""initial schema: customer, task, clue, task_event, agent

Revision ID: 0001
Revises:
Create Date: 2025-11-23 09:00:00
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


def _name(name: str, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    """An enum stored by its name (SQLAlchemy Enum with native_enum=False)."""
    return sa.Column(name, sa.String(24), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "customer",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column(
            "phone_hash",
            sa.String(64, collation="ascii_bin"),
            nullable=False,
            comment="HMAC-SHA256 of the number (hex)",
        ),
        sa.Column(
            "phone_encrypted",
            mysql.VARBINARY(128),
            nullable=False,
            comment="AES-GCM nonce+ciphertext+tag",
        ),
        sa.Column("phone_masked", sa.String(32, collation="ascii_bin"), nullable=False),
        sa.Column("star", sa.Boolean(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customer")),
        sa.UniqueConstraint("phone_hash", name=op.f("uq_customer_phone_hash")),
        **TABLE,
    )
    op.create_table(
        "agent",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        _name("business_line"),
        sa.Column("cities", sa.JSON(), nullable=False),
        sa.Column("categories", sa.JSON(), nullable=False, comment="category names"),
        sa.Column("brands", sa.JSON(), nullable=False),
        sa.Column("capacity", sa.SmallInteger(), nullable=False),
        _name("presence"),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent")),
        **TABLE,
    )
    op.create_index("ix_agent_line_presence", "agent", ["business_line", "presence"])
    op.create_table(
        "task",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        _name("business_line"),
        _name("category"),
        _name("status"),
        sa.Column("customer_id", sa.BigInteger(), nullable=False),
        sa.Column("city", sa.String(64, collation="ascii_bin"), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("star", sa.Boolean(), nullable=False),
        sa.Column("agent_id", sa.BigInteger(), nullable=True),
        sa.Column("preferred_agent_id", sa.BigInteger(), nullable=True),
        sa.Column("last_lost_agent_id", sa.BigInteger(), nullable=True),
        sa.Column("parent_task_id", sa.BigInteger(), nullable=True),
        sa.Column("brands", sa.JSON(), nullable=False),
        _ts("created_at"),
        _ts("due_at"),
        _ts("offer_deadline", nullable=True),
        sa.Column("recycle_count", sa.Integer(), nullable=False),
        sa.Column("clue_count", sa.Integer(), nullable=False),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customer.id"], name=op.f("fk_task_customer_id_customer")
        ),
        sa.ForeignKeyConstraint(
            ["parent_task_id"], ["task.id"], name=op.f("fk_task_parent_task_id_task")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task")),
        **TABLE,
    )
    op.create_index("ix_task_dispatch", "task", ["business_line", "status", "due_at"])
    op.create_index("ix_task_merge", "task", ["customer_id", "business_line", "status"])
    op.create_index("ix_task_listing", "task", ["created_at", "id"])
    op.create_index("ix_task_recycle", "task", ["status", "offer_deadline"])
    op.create_index("ix_task_agent", "task", ["agent_id", "status"])
    op.create_table(
        "clue",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(128, collation="ascii_nopad_bin"), nullable=False),
        sa.Column("request_hash", sa.String(64, collation="ascii_bin"), nullable=False),
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        sa.Column("customer_id", sa.BigInteger(), nullable=False),
        sa.Column("merged", sa.Boolean(), nullable=False),
        _name("business_line"),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("city", sa.String(64, collation="ascii_bin"), nullable=False),
        sa.Column("intent_car_ids", sa.JSON(), nullable=False),
        sa.Column("brands", sa.JSON(), nullable=False),
        sa.Column("budget_min_yuan", sa.BigInteger(), nullable=False),
        sa.Column("budget_max_yuan", sa.BigInteger(), nullable=False),
        sa.Column(
            "priority", sa.SmallInteger(), nullable=False, comment="as requested; 0: line default"
        ),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customer.id"], name=op.f("fk_clue_customer_id_customer")
        ),
        sa.ForeignKeyConstraint(["task_id"], ["task.id"], name=op.f("fk_clue_task_id_task")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clue")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_clue_idempotency_key")),
        **TABLE,
    )
    op.create_index("ix_clue_task_id", "clue", ["task_id", "id"])
    op.create_table(
        "task_event",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        _name("kind"),
        _name("from_status", nullable=True),
        _name("to_status"),
        sa.Column("agent_id", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.String(500), nullable=False),
        _ts("at"),
        sa.ForeignKeyConstraint(["task_id"], ["task.id"], name=op.f("fk_task_event_task_id_task")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_event")),
        **TABLE,
    )
    op.create_index("ix_task_event_task_id", "task_event", ["task_id", "id"])


def downgrade() -> None:
    op.drop_table("task_event")
    op.drop_table("clue")
    op.drop_table("task")
    op.drop_table("agent")
    op.drop_table("customer")
