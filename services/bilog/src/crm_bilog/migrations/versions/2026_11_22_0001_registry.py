"""dev schema registry: registry_schema, subject_version, compatibility_config

Revision ID: 0001
Revises:
Create Date: 2026-11-22 10:00:00
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


def upgrade() -> None:
    op.create_table(
        "registry_schema",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("schema_type", sa.String(16), nullable=False),
        sa.Column(
            "schema_text", sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql"), nullable=False
        ),
        sa.Column("created_at", sa.DateTime(), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_registry_schema"),
        sa.UniqueConstraint("fingerprint", name="uq_registry_schema_fingerprint"),
        **TABLE,
    )
    op.create_table(
        "subject_version",
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("schema_id", sa.Integer(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("subject", "version", name="pk_subject_version"),
        sa.ForeignKeyConstraint(
            ["schema_id"],
            ["registry_schema.id"],
            name="fk_subject_version_schema_id_registry_schema",
        ),
        **TABLE,
    )
    op.create_index("ix_subject_version_schema_id", "subject_version", ["schema_id"])
    op.create_table(
        "compatibility_config",
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("compatibility", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.DateTime(), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("subject", name="pk_compatibility_config"),
        **TABLE,
    )


def downgrade() -> None:
    op.drop_table("compatibility_config")
    op.drop_index("ix_subject_version_schema_id", table_name="subject_version")
    op.drop_table("subject_version")
    op.drop_table("registry_schema")
