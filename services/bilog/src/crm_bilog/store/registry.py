"""Storage operations of the dev schema registry (blocking; run them in an executor).

Errors are :class:`RegistryError` with Confluent's error codes, so the HTTP layer only
serialises them. Registration runs in one transaction (a concurrent registration of the
same subject collides on the ``(subject, version)`` key and is retried).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from crm_bilog.store.schema import CompatibilityConfig, RegistrySchema, SubjectVersion

__all__ = [
    "DEFAULT_COMPATIBILITY",
    "RegisteredVersion",
    "RegistryError",
    "RegistryStore",
]

DEFAULT_COMPATIBILITY = "BACKWARD"
GLOBAL = ""


class RegistryError(Exception):
    """An error with Confluent's HTTP status and ``error_code``."""

    def __init__(self, status: int, error_code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


def subject_not_found(subject: str) -> RegistryError:
    return RegistryError(404, 40401, f"Subject '{subject}' not found.")


def version_not_found(version: int) -> RegistryError:
    return RegistryError(404, 40402, f"Version {version} not found.")


def schema_not_found() -> RegistryError:
    return RegistryError(404, 40403, "Schema not found")


@dataclass(frozen=True, slots=True)
class RegisteredVersion:
    """A version of a subject."""

    subject: str
    version: int
    schema_id: int
    schema_text: str
    schema_type: str = "AVRO"


CompatCheck = Callable[[Sequence[str], str], tuple[bool, list[str]]]
"""``(previous schema texts oldest first, level) -> (compatible, messages)``."""


class RegistryStore:
    """See module doc."""

    def __init__(self, engine: Engine, attempts: int = 5) -> None:
        self.engine = engine
        self._attempts = attempts

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # -- schemas ----------------------------------------------------------------------

    def schema_by_id(self, schema_id: int) -> tuple[str, str]:
        """``(schema text, schema type)``; 40403 when unknown."""
        with self._session() as s:
            row = s.get(RegistrySchema, schema_id)
            if row is None:
                raise schema_not_found()
            return row.schema_text, row.schema_type

    def subject_versions_of_schema(self, schema_id: int) -> list[tuple[str, int]]:
        with self._session() as s:
            if s.get(RegistrySchema, schema_id) is None:
                raise schema_not_found()
            rows = s.execute(
                select(SubjectVersion.subject, SubjectVersion.version)
                .where(SubjectVersion.schema_id == schema_id, SubjectVersion.deleted.is_(False))
                .order_by(SubjectVersion.subject, SubjectVersion.version)
            ).all()
            return [(r[0], r[1]) for r in rows]

    # -- subjects ---------------------------------------------------------------------

    def subjects(self, include_deleted: bool = False) -> list[str]:
        with self._session() as s:
            q = select(SubjectVersion.subject).distinct().order_by(SubjectVersion.subject)
            if not include_deleted:
                q = q.where(SubjectVersion.deleted.is_(False))
            return list(s.scalars(q))

    def _rows(self, s: Session, subject: str, include_deleted: bool) -> list[SubjectVersion]:
        q = (
            select(SubjectVersion)
            .where(SubjectVersion.subject == subject)
            .order_by(SubjectVersion.version)
        )
        if not include_deleted:
            q = q.where(SubjectVersion.deleted.is_(False))
        return list(s.scalars(q))

    def versions(self, subject: str, include_deleted: bool = False) -> list[int]:
        with self._session() as s:
            rows = self._rows(s, subject, include_deleted)
            if not rows:
                raise subject_not_found(subject)
            return [r.version for r in rows]

    def version(
        self, subject: str, version: int | None, include_deleted: bool = False
    ) -> RegisteredVersion:
        """``version=None`` is the latest."""
        with self._session() as s:
            rows = self._rows(s, subject, include_deleted)
            if not rows:
                raise subject_not_found(subject)
            if version is None:
                row = rows[-1]
            else:
                match = [r for r in rows if r.version == version]
                if not match:
                    raise version_not_found(version)
                row = match[0]
            schema = s.get(RegistrySchema, row.schema_id)
            assert schema is not None
            return RegisteredVersion(
                subject, row.version, row.schema_id, schema.schema_text, schema.schema_type
            )

    def lookup(
        self, subject: str, fingerprint: str, include_deleted: bool = False
    ) -> RegisteredVersion:
        with self._session() as s:
            rows = self._rows(s, subject, include_deleted)
            if not rows:
                raise subject_not_found(subject)
            schema = s.scalars(
                select(RegistrySchema).where(RegistrySchema.fingerprint == fingerprint)
            ).first()
            match = [r for r in rows if schema is not None and r.schema_id == schema.id]
            if schema is None or not match:
                raise schema_not_found()
            row = match[-1]
            return RegisteredVersion(
                subject, row.version, schema.id, schema.schema_text, schema.schema_type
            )

    def register(
        self,
        subject: str,
        schema_text: str,
        fingerprint: str,
        check: CompatCheck,
        schema_type: str = "AVRO",
    ) -> RegisteredVersion:
        """The existing version when the subject already has this schema, else a new
        version after the compatibility check (409 when it fails)."""
        for attempt in range(1, self._attempts + 1):
            try:
                with self._session() as s, s.begin():
                    return self._register(s, subject, schema_text, fingerprint, check, schema_type)
            except (IntegrityError, OperationalError):
                if attempt == self._attempts:
                    raise
                time.sleep(0.01 * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _register(
        self,
        s: Session,
        subject: str,
        schema_text: str,
        fingerprint: str,
        check: CompatCheck,
        schema_type: str,
    ) -> RegisteredVersion:
        existing = s.scalars(
            select(RegistrySchema).where(RegistrySchema.fingerprint == fingerprint)
        ).first()
        all_rows = self._rows(s, subject, include_deleted=True)
        live = [r for r in all_rows if not r.deleted]
        if existing is not None:
            for r in live:
                if r.schema_id == existing.id:
                    return RegisteredVersion(subject, r.version, existing.id, schema_text)
        if live:
            level = self._level(s, subject)
            texts = []
            for r in live:
                prev = s.get(RegistrySchema, r.schema_id)
                assert prev is not None
                texts.append(prev.schema_text)
            ok, messages = check(texts, level)
            if not ok:
                detail = "; ".join(messages[:5])
                raise RegistryError(
                    409,
                    409,
                    f"Schema being registered is incompatible with an earlier schema for "
                    f'subject "{subject}" ({level}): {detail}',
                )
        if existing is None:
            existing = RegistrySchema(
                fingerprint=fingerprint, schema_type=schema_type, schema_text=schema_text
            )
            s.add(existing)
            s.flush()
        version = max((r.version for r in all_rows), default=0) + 1
        s.add(
            SubjectVersion(subject=subject, version=version, schema_id=existing.id, deleted=False)
        )
        s.flush()
        return RegisteredVersion(subject, version, existing.id, existing.schema_text)

    def delete_subject(self, subject: str, permanent: bool) -> list[int]:
        with self._session() as s, s.begin():
            rows = self._rows(s, subject, include_deleted=True)
            if not rows:
                raise subject_not_found(subject)
            if permanent:
                if any(not r.deleted for r in rows):
                    raise RegistryError(
                        404,
                        40405,
                        f"Subject '{subject}' was not deleted first before being "
                        "permanently deleted",
                    )
                s.execute(delete(SubjectVersion).where(SubjectVersion.subject == subject))
                s.execute(delete(CompatibilityConfig).where(CompatibilityConfig.subject == subject))
                return [r.version for r in rows]
            live = [r for r in rows if not r.deleted]
            if not live:
                raise RegistryError(404, 40404, f"Subject '{subject}' was soft deleted.")
            for r in live:
                r.deleted = True
            return [r.version for r in live]

    def delete_version(self, subject: str, version: int | None, permanent: bool) -> int:
        with self._session() as s, s.begin():
            rows = self._rows(s, subject, include_deleted=True)
            if not rows:
                raise subject_not_found(subject)
            if version is None:
                live = [r for r in rows if not r.deleted]
                if not live:
                    raise subject_not_found(subject)
                row = live[-1]
            else:
                match = [r for r in rows if r.version == version]
                if not match:
                    raise version_not_found(version)
                row = match[0]
            if permanent:
                if not row.deleted:
                    raise RegistryError(
                        404,
                        40407,
                        f"Subject '{subject}' Version {row.version} was not deleted first "
                        "before being permanently deleted",
                    )
                s.delete(row)
            else:
                if row.deleted:
                    raise RegistryError(
                        404, 40406, f"Subject '{subject}' Version {row.version} was soft deleted"
                    )
                row.deleted = True
            return row.version

    # -- config -----------------------------------------------------------------------

    def _level(self, s: Session, subject: str) -> str:
        row = s.get(CompatibilityConfig, subject)
        if row is None and subject != GLOBAL:
            row = s.get(CompatibilityConfig, GLOBAL)
        return row.compatibility if row is not None else DEFAULT_COMPATIBILITY

    def compatibility(self, subject: str | None, default_to_global: bool = False) -> str:
        """The level of ``subject`` (None: global). 40408 when a subject has none and
        ``default_to_global`` is false (like Confluent)."""
        with self._session() as s:
            if subject is None:
                return self._level(s, GLOBAL)
            row = s.get(CompatibilityConfig, subject)
            if row is not None:
                return row.compatibility
            if default_to_global:
                return self._level(s, GLOBAL)
            raise RegistryError(
                404,
                40408,
                f"Subject '{subject}' does not have subject-level compatibility configured",
            )

    def set_compatibility(self, subject: str | None, level: str) -> None:
        key = GLOBAL if subject is None else subject
        for attempt in range(1, self._attempts + 1):
            try:
                with self._session() as s, s.begin():
                    row = s.get(CompatibilityConfig, key)
                    if row is None:
                        s.add(CompatibilityConfig(subject=key, compatibility=level))
                    else:
                        row.compatibility = level
                return
            except IntegrityError:
                if attempt == self._attempts:
                    raise

    def delete_compatibility(self, subject: str | None) -> str:
        key = GLOBAL if subject is None else subject
        with self._session() as s, s.begin():
            row = s.get(CompatibilityConfig, key)
            if row is None:
                if subject is None:
                    return DEFAULT_COMPATIBILITY
                raise subject_not_found(subject)
            level = row.compatibility
            s.delete(row)
            return level

    def count_schemas(self) -> int:
        with self._session() as s:
            return int(s.scalar(select(func.count()).select_from(RegistrySchema)) or 0)
