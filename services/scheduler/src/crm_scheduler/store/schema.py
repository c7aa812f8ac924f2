"""The ``job`` table (SQLAlchemy 2 typed ORM, MySQL/MariaDB): the record of every job.

Timestamps are ``DATETIME(6)`` holding naive UTC (:class:`UtcDateTime` converts to aware
UTC). Two nullable columns drive the pump through their indexes:

- ``due_at`` is set only while the job waits (SCHEDULED, RETRY_WAIT): the pump reads
  ``due_at <= now`` in index order with ``FOR UPDATE SKIP LOCKED``;
- ``lease_until`` is set only while the job is in flight (ENQUEUED, RUNNING): the
  reaper reads ``lease_until < now`` the same way.

The migration in ``crm_scheduler/migrations`` creates exactly this table.
"""

from __future__ import annotations

from datetime import datetime

from crm_common.db import NAMING_CONVENTION, TABLE_ARGS, UtcDateTime
from sqlalchemy import BigInteger, Index, Integer, MetaData, String
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "JobRow", "UtcDateTime"]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _ascii(length: int) -> String:
    return String(length, collation="ascii_bin")


class JobRow(Base):
    """One delayed job (see the module doc for ``due_at`` and ``lease_until``)."""

    __tablename__ = "job"
    __table_args__ = (
        Index("ix_job_state_id", "state", "id"),
        Index("ix_job_name_id", "name", "id"),
        Index("ix_job_target_method_id", "target_method", "id"),
        TABLE_ARGS,
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    uid: Mapped[str] = mapped_column(_ascii(36), unique=True, comment="UUID v5 of the key")
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    spec_hash: Mapped[str] = mapped_column(_ascii(64))
    name: Mapped[str] = mapped_column(_ascii(128))
    target_method: Mapped[str] = mapped_column(_ascii(255))
    target_address: Mapped[str] = mapped_column(_ascii(255))
    payload: Mapped[bytes] = mapped_column(mysql.MEDIUMBLOB)
    eta: Mapped[datetime] = mapped_column(UtcDateTime)
    state: Mapped[str] = mapped_column(_ascii(16))
    due_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, comment="in the current run")
    total_attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_retries: Mapped[int] = mapped_column(Integer)
    backoff_initial_ms: Mapped[int] = mapped_column(Integer)
    backoff_max_ms: Mapped[int] = mapped_column(Integer)
    attempt_deadline_ms: Mapped[int] = mapped_column(Integer)
    dispatches: Mapped[int] = mapped_column(Integer, default=0, comment="messages sent")
    resends: Mapped[int] = mapped_column(
        Integer, default=0, comment="re-sends since the last claim (lease backoff)"
    )
    reruns: Mapped[int] = mapped_column(Integer, default=0)
    last_error_code: Mapped[str | None] = mapped_column(_ascii(32))
    last_error_message: Mapped[str | None] = mapped_column(String(1024))
    worker: Mapped[str | None] = mapped_column(String(255))
    request_id: Mapped[str | None] = mapped_column(
        _ascii(128), comment="x-request-id of the Schedule call, sent on the target call"
    )
    traceparent: Mapped[str | None] = mapped_column(
        _ascii(64), comment="W3C traceparent of the Schedule call: the target call continues it"
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
