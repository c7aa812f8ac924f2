"""Tables of the assignment service (SQLAlchemy 2 typed ORM, MySQL/MariaDB).

Timestamps are ``DATETIME(6)`` holding naive UTC; :class:`UtcDateTime` converts to and
from aware UTC datetimes, so the rest of the code only sees aware ones. Enums are stored
by name (``VARCHAR``; a business line by its well-known name or else its code), readable
in ad-hoc queries and BI exports. The migration in
``crm_assignment/migrations`` creates exactly these tables (``target_metadata``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from crm_common.db import NAMING_CONVENTION, TABLE_ARGS, UtcDateTime
from crm_common.lines import WELL_KNOWN_LINES
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
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
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from crm_assignment.domain.model import (
    BusinessLine,
    CallOutcome,
    CallType,
    Category,
    EventKind,
    Presence,
    Status,
    TelephonyProvider,
)

__all__ = [
    "AgentRow",
    "Base",
    "BiOutboxRow",
    "CallRecordRow",
    "ClueRow",
    "CustomerRow",
    "TaskEventRow",
    "TaskRow",
    "UtcDateTime",
    "line_from_db",
    "line_to_db",
]


def _enum(cls: type[Any], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, create_constraint=False, length=24)


def line_to_db(line: int) -> str:
    """A business line as stored: a well-known line by its name (``SALE``, as the rows
    written before lines were data), any other by its code (``4``). Names given by config
    are not stored: a line may be renamed, its code is its identity."""
    line = BusinessLine(int(line))
    return line.name if line.well_known else str(int(line))


def line_from_db(value: str) -> BusinessLine:
    """The inverse of :func:`line_to_db`."""
    code = WELL_KNOWN_LINES.get(value)
    return BusinessLine(code if code is not None else int(value))


class LineColumn(TypeDecorator[BusinessLine]):
    """A business line in a ``VARCHAR(24)`` (see :func:`line_to_db`)."""

    impl = String(24)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else line_to_db(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> BusinessLine | None:
        return None if value is None else line_from_db(value)


def _line() -> LineColumn:
    return LineColumn()


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
        Index("ix_task_merge", "customer_id", "business_line", "status"),
        Index("ix_task_listing", "created_at", "id"),
        Index("ix_task_recycle", "status", "offer_deadline"),
        Index("ix_task_agent", "agent_id", "status"),
        TABLE_ARGS,
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    business_line: Mapped[BusinessLine] = mapped_column(_line())
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


Index(  # one line's waiting tasks in queue order, per status (store.dispatching._waiting)
    "ix_task_queue",
    TaskRow.business_line,
    TaskRow.status,
    TaskRow.priority.desc(),
    TaskRow.star.desc(),
    TaskRow.due_at,
    TaskRow.id,
)


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
    business_line: Mapped[BusinessLine] = mapped_column(_line())
    source: Mapped[str] = mapped_column(String(64))
    city: Mapped[str] = mapped_column(String(64, collation=ASCII_KEY))
    intent_car_ids: Mapped[list[int]] = mapped_column(JSON)
    brands: Mapped[list[str]] = mapped_column(JSON)
    budget_min_yuan: Mapped[int] = mapped_column(BigInteger)
    budget_max_yuan: Mapped[int] = mapped_column(BigInteger)
    priority: Mapped[int] = mapped_column(SmallInteger, comment="as requested; 0: line default")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class _OutboxColumns:
    """The columns of a BI outbox row (``clients/bilog_outbox.py`` relays them): whether
    and how bilog took the event, and the request that made it."""

    published_at: Mapped[datetime | None] = mapped_column(
        UtcDateTime, comment="when bilog acknowledged the BI event; NULL: not yet"
    )
    publish_error: Mapped[str | None] = mapped_column(
        String(500), comment="why bilog rejected the BI event (it is skipped until cleared)"
    )
    request_id: Mapped[str | None] = mapped_column(
        String(128, collation=ASCII_KEY),
        comment="x-request-id of the request that made the event (sent to bilog)",
    )
    traceparent: Mapped[str | None] = mapped_column(
        String(64, collation=ASCII_KEY),
        comment="W3C traceparent of that request (tracing on): the relay links to it",
    )


class TaskEventRow(_OutboxColumns, Base):
    """Audit of every task transition; also the outbox of the BI events (``published_at``
    is set once bilog acknowledged the event, see ``clients/bilog_outbox.py``), with the
    request id and trace context of the request that made it."""

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


class AgentRow(Base):
    __tablename__ = "agent"
    __table_args__ = (Index("ix_agent_line_presence", "business_line", "presence"), TABLE_ARGS)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    business_line: Mapped[BusinessLine] = mapped_column(_line())
    cities: Mapped[list[str]] = mapped_column(JSON)
    categories: Mapped[list[str]] = mapped_column(JSON, comment="category names")
    brands: Mapped[list[str]] = mapped_column(JSON)
    capacity: Mapped[int] = mapped_column(SmallInteger)
    presence: Mapped[Presence] = mapped_column(_enum(Presence, "presence"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class CallRecordRow(Base):
    """One call made while handling a task (RecordCall); no phone number is kept."""

    __tablename__ = "call_record"
    __table_args__ = (Index("ix_call_record_task_id", "task_id", "id"), TABLE_ARGS)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(
        String(128, collation="ascii_nopad_bin"), unique=True, comment="client idempotency key"
    )
    request_hash: Mapped[str] = mapped_column(String(64, collation=ASCII_KEY))
    task_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("task.id"))
    agent_id: Mapped[int] = mapped_column(BigInteger)
    call_type: Mapped[CallType] = mapped_column(_enum(CallType, "call_type"))
    provider: Mapped[TelephonyProvider] = mapped_column(_enum(TelephonyProvider, "provider"))
    outcome: Mapped[CallOutcome] = mapped_column(_enum(CallOutcome, "call_outcome"))
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    duration_s: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class BiOutboxRow(_OutboxColumns, Base):
    """Outbox of the BI events that are not task transitions (call records, presence
    changes): the payload is built and written in the transaction of the change, and
    ``published_at`` is set once bilog acknowledged it (``clients/bilog_outbox.py``)."""

    __tablename__ = "bi_outbox"
    __table_args__ = (Index("ix_bi_outbox_pending", "published_at", "id"), TABLE_ARGS)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    schema_name: Mapped[str] = mapped_column(
        String(128, collation=ASCII_KEY), comment="full name of the bilog schema"
    )
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, comment="the event, as bilog takes it")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
