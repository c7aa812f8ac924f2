"""initial schema: car, interaction, change_sequence

Revision ID: 0001
Revises:
Create Date: 2025-11-23 10:00:00
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


def _ts(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, mysql.DATETIME(fsp=6), nullable=False)


def _name(name: str) -> sa.Column:  # type: ignore[type-arg]
    """An enum stored by its name (SQLAlchemy Enum with native_enum=False)."""
    return sa.Column(name, sa.String(24), nullable=False)


def upgrade() -> None:
    op.create_table(
        "change_sequence",
        sa.Column("name", sa.String(32, collation="ascii_bin"), nullable=False),
        sa.Column(
            "value", sa.BigInteger(), nullable=False, comment="last sequence number handed out"
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_change_sequence")),
        **TABLE,
    )
    op.execute("INSERT INTO change_sequence (name, value) VALUES ('data', 0)")
    op.create_table(
        "car",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("brand", sa.String(32), nullable=False),
        sa.Column("series", sa.String(64), nullable=False),
        sa.Column("model_year", sa.SmallInteger(), nullable=False),
        sa.Column("mileage_km", sa.Integer(), nullable=False),
        sa.Column("price_yuan", sa.BigInteger(), nullable=False),
        sa.Column("city", sa.String(64, collation="ascii_bin"), nullable=False),
        _name("body_type"),
        _name("status"),
        sa.Column(
            "seq", sa.BigInteger(), nullable=False, comment="change sequence of the latest write"
        ),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_car")),
        sa.UniqueConstraint("seq", name=op.f("uq_car_seq")),
        **TABLE,
    )
    op.create_table(
        "interaction",
        sa.Column(
            "seq", sa.BigInteger(), autoincrement=False, nullable=False, comment="change sequence"
        ),
        sa.Column("customer_id", sa.BigInteger(), nullable=False),
        sa.Column("car_id", sa.BigInteger(), nullable=False),
        _name("kind"),
        _ts("occurred_at"),
        _ts("recorded_at"),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_interaction")),
        sa.ForeignKeyConstraint(["car_id"], ["car.id"], name=op.f("fk_interaction_car_id_car")),
        **TABLE,
    )
    op.create_index("ix_interaction_customer", "interaction", ["customer_id", "seq"])
    op.create_index("ix_interaction_car", "interaction", ["car_id"])


def downgrade() -> None:
    op.drop_table("interaction")
    op.drop_table("car")
    op.drop_table("change_sequence")
