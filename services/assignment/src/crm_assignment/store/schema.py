"""Tables of the assignment service (SQLAlchemy 2 typed ORM, MySQL/MariaDB).

Timestamps are ``DATETIME(6)`` holding naive UTC; :class:`UtcDateTime` converts to and
from aware UTC datetimes, so the rest of the code only sees aware ones. Enums are stored
by name (``VARCHAR``), readable in ad-hoc queries and BI exports. The migration in
``crm_assignment/migrations`` creates exactly these tables (``target_metadata``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    TypeDecorator,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from crm_assignment.domain.model import BusinessLine, Category, EventKind, Presence, Status

__all__ = [
    "AgentRow",
    "Base",
    "ClueRow",
    "CustomerRow",
    "TaskEventRow",
    "TaskRow",
    "UtcDateTime",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


class UtcDateTime(TypeDecorator[datetime]):
    """``DATETIME(6)`` with naive UTC in the database and aware UTC in Python."""

    impl = mysql.DATETIME(fsp=6)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def _enum(cls: type[Any], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, create_constraint=False, length=24)


ASCII_KEY = "ascii_bin"
"""Collation of ascii identifiers compared byte for byte."""


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class CustomerRow(Base):
    __tablename__ = "customer"
    __table_args__ = TABLE_ARGS

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    phone_hash: Mapped[str] = mapped_column(
        String(64, collation=ASCII_KEY), unique=True, comment="HMAC-SHA256 of the number (hex)"
    )
    phone_encrypted: Mapped[bytes] = mapped_column(
        LargeBinary(128).with_variant(mysql.VARBINARY(128), "mysql", "mariadb"),
        comment="AES-GCM nonce+ciphertext+tag",
    )
    phone_masked: Mapped[str] = mapped_column(String(32, collation=ASCII_KEY))
    star: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class TaskRow(Base):
    __tablename__ = "task"
    __table_args__ = (
        Index("ix_task_dispatch", "business_line", "status", "due_at"),
        Index("ix_task_merge", "customer_id", "business_line", "status"),
        Index("ix_task_listing", "created_at", "id"),
        Index("ix_task_recycle", "status", "offer_deadline"),
        Index("ix_task_agent", "agent_id", "status"),
        TABLE_ARGS,
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    business_line: Mapped[BusinessLine] = mapped_column(_enum(BusinessLine, "business_line"))
    category: Mapped[Category] = mapped_column(_enum(Category, "category"))
    status: Mapped[Status] = mapped_column(_enum(Status, "status"))
    customer_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("customer.id"))
    city: Mapped[str] = mapped_column(String(64, collation=ASCII_KEY))
    priority: Mapped[int] = mapped_column(SmallInteger)
    star: Mapped[bool] = mapped_column(Boolean, default=False)
    agent_id: Mapped[int | None] = mapped_column(BigInteger)
    preferred_agent_id: Mapped[int | None] = mapped_column(BigInteger)
    last_lost_agent_id: Mapped[int | None] = mapped_column(BigInteger)
    parent_task_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("task.id"))
    brands: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    due_at: Mapped[datetime] = mapped_column(UtcDateTime)
    offer_deadline: Mapped[datetime | None] = mapped_column(UtcDateTime)
    recycle_count: Mapped[int] = mapped_column(Integer, default=0)
    clue_count: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ClueRow(Base):
    __tablename__ = "clue"
    __table_args__ = (Index("ix_clue_task_id", "task_id", "id"), TABLE_ARGS)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(
        String(128, collation="ascii_nopad_bin"), unique=True
    )
    request_hash: Mapped[str] = mapped_column(String(64, collation=ASCII_KEY))
    task_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("task.id"))
    customer_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("customer.id"))
    merged: Mapped[bool] = mapped_column(Boolean)
    business_line: Mapped[BusinessLine] = mapped_column(_enum(BusinessLine, "business_line"))
    source: Mapped[str] = mapped_column(String(64))
    city: Mapped[str] = mapped_column(String(64, collation=ASCII_KEY))
    intent_car_ids: Mapped[list[int]] = mapped_column(JSON)
    brands: Mapped[list[str]] = mapped_column(JSON)
    budget_min_yuan: Mapped[int] = mapped_column(BigInteger)
    budget_max_yuan: Mapped[int] = mapped_column(BigInteger)
    priority: Mapped[int] = mapped_column(SmallInteger, comment="as requested; 0: line default")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class TaskEventRow(Base):
    """Audit of every task transition; also the outbox of the BI events (``published_at``
    is set once bilog acknowledged the event, see ``clients/bilog_outbox.py``)."""

    __tablename__ = "task_event"
    __table_args__ = (
        Index("ix_task_event_task_id", "task_id", "id"),
        Index("ix_task_event_outbox", "published_at", "id"),
        TABLE_ARGS,
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("task.id"))
    kind: Mapped[EventKind] = mapped_column(_enum(EventKind, "event_kind"))
    from_status: Mapped[Status | None] = mapped_column(_enum(Status, "status"))
    to_status: Mapped[Status] = mapped_column(_enum(Status, "status"))
    agent_id: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(500), default="")
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    published_at: Mapped[datetime | None] = mapped_column(
        UtcDateTime, comment="when bilog acknowledged the BI event; NULL: not yet"
    )
    publish_error: Mapped[str | None] = mapped_column(
        String(500), comment="why bilog rejected the BI event (it is skipped until cleared)"
    )


class AgentRow(Base):
    __tablename__ = "agent"
    __table_args__ = (Index("ix_agent_line_presence", "business_line", "presence"), TABLE_ARGS)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    business_line: Mapped[BusinessLine] = mapped_column(_enum(BusinessLine, "business_line"))
    cities: Mapped[list[str]] = mapped_column(JSON)
    categories: Mapped[list[str]] = mapped_column(JSON, comment="category names")
    brands: Mapped[list[str]] = mapped_column(JSON)
    capacity: Mapped[int] = mapped_column(SmallInteger)
    presence: Mapped[Presence] = mapped_column(_enum(Presence, "presence"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
