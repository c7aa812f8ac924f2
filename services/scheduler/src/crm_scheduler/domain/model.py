"""Jobs and their states (pure data, no I/O).

A job is identified by its idempotency key (default ``<name>@<ETA in RFC 3339>``, the
seed's "name + ETA"); its public id is a UUID v5 of that key. The spec of a job (name,
target, when, retries, backoff, deadline) is fixed at scheduling; :func:`spec_hash`
fingerprints it so scheduling the same key twice can tell a retry from a conflict.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "CANCELLABLE",
    "FINAL",
    "IN_FLIGHT",
    "JOB_UUID_NAMESPACE",
    "WAITING",
    "Clock",
    "Dispatch",
    "Job",
    "JobFilter",
    "JobRef",
    "JobSpec",
    "JobState",
    "Target",
    "TraceOrigin",
    "default_idempotency_key",
    "job_uuid",
    "rfc3339",
    "utc_now",
]

Clock = Callable[[], datetime]
"""Returns the current time, aware UTC."""


def utc_now() -> datetime:
    """The real clock."""
    return datetime.now(UTC)


class JobState(enum.IntEnum):
    """States of a job; the values are those of ``crm.scheduler.v1.JobState``."""

    SCHEDULED = 1
    ENQUEUED = 2
    RUNNING = 3
    SUCCEEDED = 4
    RETRY_WAIT = 5
    DEAD = 6
    CANCELLED = 7


WAITING = frozenset({JobState.SCHEDULED, JobState.RETRY_WAIT})
"""States with a ``due_at``: the pump enqueues them when it is reached."""
IN_FLIGHT = frozenset({JobState.ENQUEUED, JobState.RUNNING})
"""States with a ``lease_until``: the pump re-sends them when it expires."""
CANCELLABLE = frozenset({JobState.SCHEDULED, JobState.RETRY_WAIT, JobState.ENQUEUED})
"""States Cancel accepts: the target has not been called in them (claims need ENQUEUED)."""
FINAL = frozenset({JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED})

JOB_UUID_NAMESPACE = uuid.UUID("5b7f6f1e-4a0c-5d6e-9a57-6372d5c0b001")
"""Namespace of the job ids (UUID v5 of the idempotency key)."""


def rfc3339(at: datetime) -> str:
    """``2025-11-23T09:00:00.123Z``: UTC, milliseconds."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def default_idempotency_key(name: str, eta: datetime) -> str:
    """The seed's key: job name + ETA (``recycle-offer-42@2025-11-23T09:00:00.000Z``)."""
    return f"{name}@{rfc3339(eta)}"


def job_uuid(idempotency_key: str) -> str:
    """The public id of the job with this key."""
    return str(uuid.uuid5(JOB_UUID_NAMESPACE, idempotency_key))


@dataclass(frozen=True, slots=True)
class Target:
    """A unary gRPC method of another service and the serialized request to send it."""

    method: str
    address: str
    request: bytes

    @property
    def service(self) -> str:
        """``/pkg.Service/Method`` -> ``pkg.Service``."""
        return self.method.lstrip("/").rpartition("/")[0]


@dataclass(frozen=True, slots=True)
class TraceOrigin:
    """Who scheduled a job, as its target call will say: the ``x-request-id`` and the W3C
    ``traceparent`` of the Schedule call (empty: none). Not part of the spec: a retried
    Schedule from another request is the same job."""

    request_id: str = ""
    traceparent: str = ""


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What Schedule asks for, validated and with defaults applied.

    ``when`` is the request's time as given (``eta:<RFC 3339>`` or ``delay:<ms>``): the
    spec hash uses it, so a retried Schedule with the same delay is not a conflict.
    """

    name: str
    target: Target
    eta: datetime
    idempotency_key: str
    max_retries: int
    backoff_initial_ms: int
    backoff_max_ms: int
    attempt_deadline_ms: int
    when: str

    @property
    def uid(self) -> str:
        return job_uuid(self.idempotency_key)

    def spec_hash(self) -> str:
        """SHA-256 (hex) of everything but the key: equal specs, equal hashes."""
        h = hashlib.sha256()
        for part in (
            self.name,
            self.target.method,
            self.target.address,
            self.when,
            str(self.max_retries),
            str(self.backoff_initial_ms),
            str(self.backoff_max_ms),
            str(self.attempt_deadline_ms),
        ):
            h.update(part.encode())
            h.update(b"\x00")
        h.update(hashlib.sha256(self.target.request).digest())
        return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Job:
    """A job as stored. ``attempts`` counts the current run (reset by Rerun);
    ``total_attempts`` the whole life (it is the ``x-attempt`` of the last call)."""

    id: int
    uid: str
    name: str
    idempotency_key: str
    target: Target
    eta: datetime
    state: JobState
    attempts: int
    total_attempts: int
    max_retries: int
    backoff_initial_ms: int
    backoff_max_ms: int
    attempt_deadline_ms: int
    due_at: datetime | None
    lease_until: datetime | None
    last_error_code: str | None
    last_error_message: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    reruns: int


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Filters of List (AND); empty fields match everything."""

    states: frozenset[JobState] = frozenset()
    name: str = ""
    target_method: str = ""
    target_address: str = ""


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One hand-over of a job to a worker: the Celery message (JSON-safe via
    :meth:`to_message`). ``attempt`` is the ``total_attempts`` the claim sets (the
    claim needs ``total_attempts == attempt - 1``), ``run_attempt`` the current run's."""

    job_id: int
    uid: str
    name: str
    idempotency_key: str
    method: str
    address: str
    request: bytes
    attempt: int
    run_attempt: int
    max_retries: int
    backoff_initial_ms: int
    backoff_max_ms: int
    attempt_deadline_ms: int
    due_at: datetime
    request_id: str = ""
    """``x-request-id`` of the Schedule call (sent on the target call; empty: none)."""
    traceparent: str = ""
    """W3C ``traceparent`` of the Schedule call (the target call continues its trace)."""

    def to_message(self) -> dict[str, object]:
        msg: dict[str, object] = {
            "v": 1,
            "job_id": self.job_id,
            "uid": self.uid,
            "name": self.name,
            "key": self.idempotency_key,
            "method": self.method,
            "address": self.address,
            "request": self.request.hex(),
            "attempt": self.attempt,
            "run_attempt": self.run_attempt,
            "max_retries": self.max_retries,
            "backoff_initial_ms": self.backoff_initial_ms,
            "backoff_max_ms": self.backoff_max_ms,
            "attempt_deadline_ms": self.attempt_deadline_ms,
            "due_at": self.due_at.isoformat(),
        }
        if self.request_id:  # optional keys: older workers ignore them
            msg["request_id"] = self.request_id
        if self.traceparent:
            msg["traceparent"] = self.traceparent
        return msg

    @classmethod
    def from_message(cls, msg: dict[str, object]) -> Dispatch:
        """Inverse of :meth:`to_message`; raises ValueError/KeyError/TypeError when the
        message is not one (a foreign or corrupt message is dropped by the worker)."""
        if msg.get("v") != 1:
            raise ValueError(f"unknown message version {msg.get('v')!r}")

        def num(key: str) -> int:
            value = msg[key]
            if type(value) is not int:
                raise TypeError(f"{key} is not an int")
            return value

        def text(key: str) -> str:
            value = msg[key]
            if not isinstance(value, str):
                raise TypeError(f"{key} is not a string")
            return value

        def optional_text(key: str) -> str:
            value = msg.get(key, "")
            if not isinstance(value, str):
                raise TypeError(f"{key} is not a string")
            return value

        due_at = datetime.fromisoformat(text("due_at"))
        if due_at.tzinfo is None:
            raise ValueError("due_at is naive")
        return cls(
            job_id=num("job_id"),
            uid=text("uid"),
            name=text("name"),
            idempotency_key=text("key"),
            method=text("method"),
            address=text("address"),
            request=bytes.fromhex(text("request")),
            attempt=num("attempt"),
            run_attempt=num("run_attempt"),
            max_retries=num("max_retries"),
            backoff_initial_ms=num("backoff_initial_ms"),
            backoff_max_ms=num("backoff_max_ms"),
            attempt_deadline_ms=num("attempt_deadline_ms"),
            due_at=due_at,
            request_id=optional_text("request_id"),
            traceparent=optional_text("traceparent"),
        )


@dataclass(frozen=True, slots=True)
class JobRef:
    """A job addressed by its public id or by its idempotency key (exactly one set)."""

    uid: str = ""
    idempotency_key: str = ""

    def describe(self) -> str:
        return f"job/{self.uid}" if self.uid else f"job with key {self.idempotency_key!r}"
