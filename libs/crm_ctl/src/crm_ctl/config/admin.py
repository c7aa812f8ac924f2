"""The config-admin library: the live configuration in etcd, read and changed safely.

One :class:`ConfigAdmin` serves both the gRPC ``ConfigAdminService`` and ``crmctl config``.
It reuses what the CRMConfig operator uses, so there is one key layout and one validator:

- :class:`crm_operator.etcd.ConfigStore` writes the stable key, the rollout envelope and
  the history (compare-and-swap transactions; here with an expected revision and the
  author recorded in the history entry);
- :func:`crm_operator.schemas.validate` runs the service's own parser (what the service's
  ConfigWatcher applies), so a value accepted here is a value the service applies.

Errors are :class:`crm_common.errors.CrmError` subclasses (the gRPC interceptor and the CLI
map them): INVALID_ARGUMENT with field paths, NOT_FOUND, ABORTED on a revision conflict,
FAILED_PRECONDITION for a key a CRMConfig declares (the operator would revert the write),
UNAVAILABLE when etcd does not answer.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import importlib
import json
import re
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aetcd
import pydantic
from crm_common.config_watch import (
    Ack,
    config_key,
    history_prefix,
    rollout_bucket,
    rollout_key,
)
from crm_common.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    Unavailable,
)
from crm_common.lines import WELL_KNOWN_LINES
from crm_operator import schemas
from crm_operator.etcd import ConfigStore, HistoryEntry, RevisionConflict

from crm_ctl.config.diff import Change, diff

__all__ = [
    "CONFLICT_REASON",
    "KEY_PATTERN",
    "MANAGED_REASON",
    "MAX_AUTHOR_CHARS",
    "MAX_VALUE_BYTES",
    "AppliedVersion",
    "ConfigAdmin",
    "Current",
    "InstanceState",
    "KeySummary",
    "RolloutState",
    "SetResult",
    "Source",
    "Version",
]

T = TypeVar("T")

KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
"""A config key, as the CRMConfig CRD allows it (``spec.key``)."""
MAX_VALUE_BYTES = 64 * 1024
MAX_AUTHOR_CHARS = 128
CONFLICT_REASON = "REVISION_CONFLICT"
MANAGED_REASON = "MANAGED_BY_CRMCONFIG"
_AUTHOR_RE = re.compile(r"^[\x21-\x7e][\x20-\x7e]*$")


class Source(enum.Enum):
    UNKNOWN = "unknown"  # written by hand: no history entry
    CRMCONFIG = "crmconfig"  # the operator
    ADMIN = "admin"  # ConfigAdmin / crmctl


class AppliedVersion(enum.Enum):
    STABLE = "stable"
    ROLLOUT = "rollout"
    DEFAULTS = "defaults"
    OUTDATED = "outdated"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a key (``value`` None: absent)."""

    service: str
    key: str
    revision: int
    value: dict[str, Any] | None
    author: str | None = None
    time: datetime.datetime | None = None
    source: Source = Source.UNKNOWN
    generation: int | None = None
    has_previous: bool = False
    changes: tuple[Change, ...] = ()


@dataclass(frozen=True, slots=True)
class Current:
    present: bool
    version: Version


@dataclass(frozen=True, slots=True)
class SetResult:
    version: Version
    changed: bool
    rollout_revision: int = 0


@dataclass(frozen=True, slots=True)
class KeySummary:
    service: str
    key: str
    known: bool
    present: bool
    revision: int
    author: str | None
    time: datetime.datetime | None
    source: Source
    rollout_percent: int | None


@dataclass(frozen=True, slots=True)
class InstanceState:
    instance: str
    applied_revision: int
    version: AppliedVersion
    ack_time: datetime.datetime | None
    bucket: int
    rejected_revision: int


@dataclass(frozen=True, slots=True)
class RolloutState:
    stable: Version
    candidate_percent: int | None
    candidate_revision: int
    candidate_value: dict[str, Any] | None
    instances: tuple[InstanceState, ...] = field(default_factory=tuple)

    def count(self, *versions: AppliedVersion) -> int:
        return sum(1 for i in self.instances if i.version in versions)


def _parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        t = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


def _version(service: str, key: str, entry: HistoryEntry) -> Version:
    source = Source.CRMCONFIG if entry.generation is not None else Source.ADMIN
    return Version(
        service=service,
        key=key,
        revision=entry.revision,
        value=dict(entry.data),
        author=entry.author,
        time=_parse_time(entry.time),
        source=source,
        generation=entry.generation,
    )


class ConfigAdmin:
    """See the module doc. ``store`` is the operator's ConfigStore (owned: closed by
    :meth:`close`)."""

    def __init__(
        self, store: ConfigStore, read_timeout_s: float = 5.0, write_timeout_s: float = 20.0
    ) -> None:
        self.store = store
        self.read_timeout_s = read_timeout_s
        self.write_timeout_s = write_timeout_s

    @classmethod
    def connect(cls, endpoints: str, config_prefix: str, history_limit: int = 10) -> ConfigAdmin:
        """An admin over etcd ``endpoints`` (no I/O until the first call)."""
        return cls(ConfigStore(endpoints, config_prefix, history_limit))

    async def close(self) -> None:
        await self.store.close()

    async def ping(self) -> None:
        """Returns when etcd answers (readiness check)."""
        await self._etcd(self.store.get(self.store.config_prefix + "/"))

    # ----------------------------------------------------------------- validation

    @staticmethod
    def services() -> list[str]:
        return sorted(schemas.REGISTRY)

    @staticmethod
    def check_target(service: str, key: str) -> None:
        """INVALID_ARGUMENT unless ``service`` has a schema and ``key`` is a key it reads
        (the service's own parser decides, as for a CRMConfig)."""
        problems = []
        if service not in schemas.REGISTRY:
            problems.append(
                (
                    "service",
                    f"unknown service {service!r}: expected one of "
                    f"{', '.join(sorted(schemas.REGISTRY))}",
                )
            )
        if not KEY_PATTERN.match(key):
            problems.append(("key", "must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"))
        elif service in schemas.REGISTRY and not schemas.key_known(service, key):
            try:
                schemas.parser(service)(key, b"{}")
            except ValueError as exc:
                problems.append(("key", str(exc)))
        if problems:
            raise _invalid(problems)

    @staticmethod
    def parse_value(value_json: str | bytes, field: str = "value_json") -> dict[str, Any]:
        """A JSON object from text (INVALID_ARGUMENT naming ``field`` otherwise)."""
        raw = value_json.encode() if isinstance(value_json, str) else value_json
        if not raw.strip():
            raise InvalidArgument.single(field, "is required: a JSON object")
        if len(raw) > MAX_VALUE_BYTES:
            raise InvalidArgument.single(field, f"is larger than {MAX_VALUE_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise InvalidArgument.single(field, f"is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidArgument.single(field, "must be a JSON object")
        return data

    @staticmethod
    def check_author(author: str) -> str:
        if len(author) > MAX_AUTHOR_CHARS or not _AUTHOR_RE.match(author):
            raise InvalidArgument.single(
                "author", f"must be 1..{MAX_AUTHOR_CHARS} printable ASCII characters"
            )
        return author

    @staticmethod
    def validate(service: str, key: str, data: object, field: str = "value_json") -> bytes:
        """The operator's validation; field paths relative to ``field`` (the value)."""
        try:
            return schemas.validate(service, key, data)
        except schemas.ConfigInvalid as exc:
            where = exc.field
            if where == "spec.data" or where.startswith("spec.data."):
                where = field + where[len("spec.data") :]
            else:
                where = where.removeprefix("spec.")
            raise InvalidArgument.single(where, exc.message) from None

    # ----------------------------------------------------------------- reads

    async def _etcd(self, aw: Awaitable[T], time_box: float | None = None) -> T:
        """Await one store operation within ``time_box`` seconds (default: the read box);
        an unreachable or failing etcd is UNAVAILABLE.

        The operation runs as a task of its own that is abandoned (cancelled, not awaited)
        when the box runs out: the etcd client may turn a cancellation into a connection
        error that the store then retries, so cancelling in place could overrun the box."""
        box = time_box or self.read_timeout_s
        task = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait({task}, timeout=box)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            task.add_done_callback(_consume)
            raise Unavailable(f"etcd did not answer within {box:g}s")
        try:
            return task.result()
        except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, TimeoutError) as exc:
            raise Unavailable(f"etcd does not answer: {type(exc).__name__}") from None
        except aetcd.ClientError as exc:
            raise Unavailable(f"etcd: {type(exc).__name__}: {exc}") from None

    async def _history(self, service: str, key: str) -> list[HistoryEntry]:
        return await self._etcd(self.store.history(service, key))

    async def _entry(self, service: str, key: str, revision: int) -> HistoryEntry | None:
        prefix = history_prefix(self.store.config_prefix, service, key)
        found = await self._etcd(self.store.get(f"{prefix}{revision:012d}"))
        if found is None:
            return None
        try:
            doc = json.loads(found[0])
            return HistoryEntry(
                revision,
                doc.get("generation"),
                str(doc.get("time", "")),
                dict(doc["data"]),
                doc.get("author"),
            )
        except (ValueError, KeyError, TypeError):
            return None

    async def _current(self, service: str, key: str) -> Current:
        found = await self._etcd(self.store.get(config_key(self.store.config_prefix, service, key)))
        if found is None:
            return Current(False, Version(service, key, 0, None))
        raw, revision = found
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        entry = await self._entry(service, key, revision)
        if entry is not None:
            v = _version(service, key, entry)
            return Current(
                True,
                Version(
                    service,
                    key,
                    revision,
                    value if isinstance(value, dict) else None,
                    v.author,
                    v.time,
                    v.source,
                    v.generation,
                ),
            )
        return Current(
            True, Version(service, key, revision, value if isinstance(value, dict) else None)
        )

    async def get(self, service: str, key: str) -> Current:
        """The stable value of one key (``present`` False: absent, defaults apply)."""
        self.check_target(service, key)
        return await self._current(service, key)

    @staticmethod
    def defaults(service: str, key: str) -> dict[str, Any] | None:
        """The service's default value (what applies while the key is absent)."""
        module, _, name = schemas.REGISTRY[service].model.partition(":")
        model: type[pydantic.BaseModel] = getattr(importlib.import_module(module), name)
        try:
            return model().model_dump(mode="json", exclude_none=True)
        except pydantic.ValidationError:
            return None

    @staticmethod
    def json_schema(service: str) -> dict[str, Any]:
        """The JSON Schema of one value of ``service`` (what the CRD embeds)."""
        return schemas.json_schema(service)

    async def history(self, service: str, key: str) -> list[Version]:
        """Kept versions, newest first, each with its changes against the one before."""
        self.check_target(service, key)
        entries = await self._history(service, key)
        out = []
        for i, entry in enumerate(entries):
            v = _version(service, key, entry)
            previous = entries[i + 1] if i + 1 < len(entries) else None
            changes = tuple(diff(previous.data, entry.data)) if previous is not None else ()
            out.append(
                Version(
                    v.service,
                    v.key,
                    v.revision,
                    v.value,
                    v.author,
                    v.time,
                    v.source,
                    v.generation,
                    previous is not None,
                    changes,
                )
            )
        return out

    async def list(self, service: str | None = None) -> list[KeySummary]:
        """Every key of every service (or of one): declared keys and keys present in etcd."""
        if service:
            if service not in schemas.REGISTRY:
                raise InvalidArgument.single(
                    "service",
                    f"unknown service {service!r}: expected one of "
                    f"{', '.join(sorted(schemas.REGISTRY))}",
                )
            services = [service]
        else:
            services = self.services()
        out: list[KeySummary] = []
        for svc in services:
            base = f"{self.store.config_prefix}/{svc}/"
            present: dict[str, int] = {}
            rollouts: dict[str, int | None] = {}
            for k, raw, mod in await self._etcd(self.store.list_prefix(base)):
                rel = k[len(base) :]
                if rel.startswith("_rollout/"):
                    name = rel[len("_rollout/") :]
                    try:
                        rollouts[name] = int(json.loads(raw)["percent"])
                    except (ValueError, KeyError, TypeError):
                        rollouts[name] = None
                elif not rel.startswith("_") and "/" not in rel:
                    present[rel] = mod
            declared = schemas.REGISTRY[svc].keys
            for key in sorted(set(declared) | set(present) | set(rollouts)):
                revision = present.get(key, 0)
                entry = await self._entry(svc, key, revision) if revision else None
                v = _version(svc, key, entry) if entry is not None else None
                out.append(
                    KeySummary(
                        service=svc,
                        key=key,
                        known=schemas.key_known(svc, key),
                        present=key in present,
                        revision=revision,
                        author=v.author if v else None,
                        time=v.time if v else None,
                        source=v.source if v else Source.UNKNOWN,
                        rollout_percent=rollouts.get(key),
                    )
                )
        return out

    async def business_lines(self) -> dict[str, int]:
        """Name -> code of every business line: the well-known ones and those configured
        under ``<prefix>/assignment/`` (lines are data; a value the service would refuse
        is left out)."""
        lines = dict(WELL_KNOWN_LINES)
        base = f"{self.store.config_prefix}/assignment/"
        parse = schemas.parser("assignment")
        for k, raw, _ in await self._etcd(self.store.list_prefix(base)):
            name = k[len(base) :]
            if name.startswith("_") or "/" in name:
                continue
            try:
                code = getattr(parse(name, raw), "code", None)
            except ValueError:
                continue
            lines[name] = int(code) if code is not None else WELL_KNOWN_LINES[name]
        return lines

    # ----------------------------------------------------------------- writes

    async def _guard_managed(self, current: Current, force: bool) -> None:
        if force or not current.present:
            return
        if current.version.source is Source.CRMCONFIG:
            v = current.version
            raise FailedPrecondition(
                f"{v.service}/{v.key} is declared by a CRMConfig custom resource (generation "
                f"{v.generation}); the operator would put its value back: change the CRMConfig "
                "instead (or force the write in an emergency)",
                violations=[
                    PreconditionViolation(
                        MANAGED_REASON, f"{v.service}/{v.key}", "declared by a CRMConfig"
                    )
                ],
                reason=MANAGED_REASON,
            )

    async def _write(
        self,
        service: str,
        key: str,
        value: bytes,
        *,
        author: str,
        expected_revision: int | None,
        rollout_percent: int | None,
        force: bool,
    ) -> SetResult:
        for attempt in range(3):
            current = await self._current(service, key)
            if expected_revision is not None and current.version.revision != expected_revision:
                raise self._conflict(service, key, expected_revision, current.version.revision)
            await self._guard_managed(current, force)
            try:
                # conditional on what we just read (the managed check holds for it)
                applied = await self._etcd(
                    self.store.apply(
                        service,
                        key,
                        value,
                        rollout_percent,
                        None,
                        author=author,
                        expect_revision=current.version.revision,
                    ),
                    self.write_timeout_s,
                )
            except RevisionConflict as exc:
                # someone wrote between our read and our write: an unconditional write
                # reads again; a conditional one has lost
                if expected_revision is None and attempt < 2:
                    continue
                raise self._conflict(service, key, current.version.revision, exc.actual) from None
            after = await self._current(service, key)
            return SetResult(after.version, applied.wrote, applied.rollout_revision)
        raise AssertionError("unreachable")

    @staticmethod
    def _conflict(service: str, key: str, expected: int, actual: int) -> Aborted:
        return Aborted(
            f"{service}/{key} is at revision {actual}, not the expected {expected}: "
            "someone changed it meanwhile; read it again and retry",
            reason=CONFLICT_REASON,
            metadata={"expected_revision": str(expected), "current_revision": str(actual)},
        )

    async def set(
        self,
        service: str,
        key: str,
        data: object,
        *,
        author: str,
        expected_revision: int | None = None,
        rollout_percent: int | None = None,
        force: bool = False,
        field: str = "value_json",
    ) -> SetResult:
        """Validate ``data`` like the operator does and write it (see the module doc).

        ``expected_revision`` (0: absent) makes the write conditional; ``rollout_percent``
        below 100 starts a rollout instead of changing the stable value."""
        self.check_target(service, key)
        self.check_author(author)
        problems = []
        if expected_revision is not None and expected_revision < 0:
            problems.append(("expected_revision", "must be >= 0"))
        if rollout_percent is not None and not 0 <= rollout_percent <= 100:
            problems.append(("rollout_percent", "must be 0..100"))
        if problems:
            raise _invalid(problems)
        value = self.validate(service, key, data, field)
        return await self._write(
            service,
            key,
            value,
            author=author,
            expected_revision=expected_revision,
            rollout_percent=rollout_percent,
            force=force,
        )

    async def rollback(
        self,
        service: str,
        key: str,
        revision: int,
        *,
        author: str,
        expected_revision: int | None = None,
        force: bool = False,
    ) -> SetResult:
        """Write the value of kept ``revision`` again, as a new version."""
        self.check_target(service, key)
        self.check_author(author)
        if revision <= 0:
            raise InvalidArgument.single("revision", "must be > 0 (see History)")
        if expected_revision is not None and expected_revision < 0:
            raise InvalidArgument.single("expected_revision", "must be >= 0")
        entries = await self._history(service, key)
        target = next((e for e in entries if e.revision == revision), None)
        if target is None:
            kept = ", ".join(str(e.revision) for e in entries) or "none"
            raise NotFound(
                f"revision {revision} of {service}/{key} is not in the kept history (kept: {kept})"
            )
        try:
            value = schemas.validate(service, key, target.data)
        except schemas.ConfigInvalid as exc:
            raise FailedPrecondition(
                f"the value of revision {revision} is no longer valid for {service}: "
                f"{exc.field.replace('spec.data', 'value')}: {exc.message}",
                reason="HISTORICAL_VALUE_INVALID",
            ) from None
        return await self._write(
            service,
            key,
            value,
            author=author,
            expected_revision=expected_revision,
            rollout_percent=None,
            force=force,
        )

    # ----------------------------------------------------------------- rollout

    async def rollout(self, service: str, key: str) -> RolloutState:
        """The rollout state of a key and which version every live instance applied."""
        self.check_target(service, key)
        current = await self._current(service, key)
        rk = rollout_key(self.store.config_prefix, service, key)
        found = await self._etcd(self.store.get(rk))
        percent: int | None = None
        cand_rev = 0
        cand_value: dict[str, Any] | None = None
        if found is not None:
            cand_rev = found[1]
            try:
                doc = json.loads(found[0])
                percent = int(doc["percent"])
                cand_value = doc["value"] if isinstance(doc["value"], dict) else None
            except (ValueError, KeyError, TypeError):
                percent = None
        acks: Sequence[Ack] = await self._etcd(self.store.acks(service))
        stable_rev = current.version.revision
        instances = tuple(_instance_state(a, key, stable_rev, cand_rev) for a in acks)
        return RolloutState(current.version, percent, cand_rev, cand_value, instances)


def _instance_state(ack: Ack, key: str, stable_rev: int, cand_rev: int) -> InstanceState:
    applied = int(ack.keys.get(key, 0))
    rejected = int(ack.rejected.get(key, 0))
    if cand_rev and applied == cand_rev:
        version = AppliedVersion.ROLLOUT
    elif stable_rev and applied == stable_rev:
        version = AppliedVersion.STABLE
    elif not stable_rev and not applied:
        version = AppliedVersion.DEFAULTS
    elif rejected and rejected in (stable_rev, cand_rev):
        version = AppliedVersion.REJECTED
    else:
        version = AppliedVersion.OUTDATED
    return InstanceState(
        ack.instance,
        applied,
        version,
        _parse_time(ack.time),
        rollout_bucket(ack.instance),
        rejected,
    )


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned task's outcome (no "exception was never retrieved" noise)."""
    if not task.cancelled():
        task.exception()


def _invalid(problems: Sequence[tuple[str, str]]) -> InvalidArgument:
    return InvalidArgument([FieldViolation(f, d) for f, d in problems])
