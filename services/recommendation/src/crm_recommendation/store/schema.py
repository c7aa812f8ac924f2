"""Tables of the recommendation service (SQLAlchemy 2 typed ORM, MySQL/MariaDB).

Every write takes its change sequence numbers from the one ``change_sequence`` row (an
``UPDATE`` that holds the row lock until commit), so sequence order is commit order: a
reader that sees sequence ``n`` committed sees every change ``<= n``. ``car.seq`` is the
sequence of the car's latest write; ``interaction.seq`` is the interaction's id. Replicas
poll ``seq > last seen`` to follow each other.

Timestamps are ``DATETIME(6)`` holding naive UTC (:class:`UtcDateTime` converts); enums
are stored by name.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from crm_common.db import NAMING_CONVENTION, TABLE_ARGS, UtcDateTime
from sqlalchemy import (
    BigInteger,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from crm_recommendation.domain.model import BodyType, CarStatus, InteractionKind

__all__ = [
    "SEQUENCE_NAME",
    "Base",
    "CarRow",
    "ChangeSequenceRow",
    "InteractionRow",
    "UtcDateTime",
]


SEQUENCE_NAME = "data"
"""Name of the single change sequence row (created by the migration)."""


def _enum(cls: type[Any], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, create_constraint=False, length=24)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class CarRow(Base):
    __tablename__ = "car"
    __table_args__ = TABLE_ARGS

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    brand: Mapped[str] = mapped_column(String(32))
    series: Mapped[str] = mapped_column(String(64))
    model_year: Mapped[int] = mapped_column(SmallInteger)
    mileage_km: Mapped[int] = mapped_column(Integer)
    price_yuan: Mapped[int] = mapped_column(BigInteger)
    city: Mapped[str] = mapped_column(String(64, collation="ascii_bin"))
    body_type: Mapped[BodyType] = mapped_column(_enum(BodyType, "body_type"))
    status: Mapped[CarStatus] = mapped_column(_enum(CarStatus, "car_status"))
    seq: Mapped[int] = mapped_column(
        BigInteger, unique=True, comment="change sequence of the latest write"
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class InteractionRow(Base):
    __tablename__ = "interaction"
    __table_args__ = (
        Index("ix_interaction_customer", "customer_id", "seq"),
        Index("ix_interaction_car", "car_id"),
        TABLE_ARGS,
    )

    seq: Mapped[int] = mapped_column(
        BigInteger, primary_key=True, autoincrement=False, comment="change sequence"
    )
    customer_id: Mapped[int] = mapped_column(BigInteger)
    car_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("car.id"))
    kind: Mapped[InteractionKind] = mapped_column(_enum(InteractionKind, "interaction_kind"))
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime)
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ChangeSequenceRow(Base):
    __tablename__ = "change_sequence"
    __table_args__ = TABLE_ARGS

    name: Mapped[str] = mapped_column(String(32, collation="ascii_bin"), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, comment="last sequence number handed out")
