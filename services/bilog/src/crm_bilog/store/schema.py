"""Tables of the dev schema registry (typed ORM; migrations in ``crm_bilog/migrations``).

``registry_schema`` holds each distinct schema once (its id is the id in the wire
format, shared by every subject that registers the same schema), ``subject_version`` the
versions of each subject (soft-deleted ones kept with ``deleted``) and
``compatibility_config`` the compatibility levels (subject ``""`` is the global one).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "CompatibilityConfig", "RegistrySchema", "SubjectVersion"]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class RegistrySchema(Base):
    """One distinct schema (by fingerprint of its normalized JSON)."""

    __tablename__ = "registry_schema"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    schema_type: Mapped[str] = mapped_column(String(16), default="AVRO")
    schema_text: Mapped[str] = mapped_column(Text().with_variant(Text(16_777_215), "mysql"))
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class SubjectVersion(Base):
    """Version ``version`` of ``subject`` is schema ``schema_id``."""

    __tablename__ = "subject_version"

    subject: Mapped[str] = mapped_column(String(255), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    schema_id: Mapped[int] = mapped_column(ForeignKey("registry_schema.id"), index=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class CompatibilityConfig(Base):
    """Compatibility level of a subject (``""``: global)."""

    __tablename__ = "compatibility_config"

    subject: Mapped[str] = mapped_column(String(255), primary_key=True)
    compatibility: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime, server_default=func.now(), onupdate=func.now()
    )
