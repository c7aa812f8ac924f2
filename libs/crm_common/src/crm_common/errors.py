"""Domain errors and their one mapping to gRPC status codes (rich google.rpc status).

Domain and api code raise a :class:`CrmError` subclass; the server interceptor turns it
into a status with :func:`to_rpc_status`. ``INVALID_ARGUMENT`` always carries field
violations (a ``google.rpc.BadRequest``); clients read them back with
:func:`field_violations`. Any error may also carry a machine-readable ``reason``
(a ``google.rpc.ErrorInfo``, read back with :func:`error_reason`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, cast

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "ERROR_DOMAIN",
    "Aborted",
    "AlreadyExists",
    "CrmError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "PreconditionViolation",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Validator",
    "error_reason",
    "field_violations",
    "rich_status",
    "to_rpc_status",
]

ERROR_DOMAIN = "crm"
"""``ErrorInfo.domain`` of every error this platform sends."""


class CrmError(Exception):
    """Base of all domain errors; ``code`` is the gRPC status the client receives.

    ``message`` goes to the client as the status details: keep personal data
    (phone numbers, names) out of it. ``reason`` is an optional UPPER_SNAKE_CASE
    machine-readable cause sent as a ``google.rpc.ErrorInfo`` (with ``metadata``).
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def status_details(self) -> list[Message]:
        """Detail messages packed into the rich status (subclasses extend)."""
        if self.reason is None:
            return []
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        return [info]


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field: ``field`` is a dotted path (``agent.capacity``,
    ``intent_car_ids[3]``), ``description`` says what is wrong with it."""

    field: str
    description: str


class InvalidArgument(CrmError):
    """The request is malformed; carries at least one field violation."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Sequence[FieldViolation], message: str | None = None) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one field violation")
        self.violations: tuple[FieldViolation, ...] = tuple(violations)
        super().__init__(message or _summary(self.violations))

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        """An error about one field."""
        return cls([FieldViolation(field, description)])

    def status_details(self) -> list[Message]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in self.violations
            ]
        )
        return [bad_request, *super().status_details()]


def _summary(violations: Sequence[FieldViolation], shown: int = 3) -> str:
    parts = [f"{v.field}: {v.description}" for v in violations[:shown]]
    more = len(violations) - shown
    if more > 0:
        parts.append(f"and {more} more")
    return "invalid request: " + "; ".join(parts)


class NotFound(CrmError):
    """The addressed entity does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CrmError):
    """The entity to create exists already (or an idempotency key was reused)."""

    code = grpc.StatusCode.ALREADY_EXISTS


@dataclass(frozen=True, slots=True)
class PreconditionViolation:
    """One failed precondition (``google.rpc.PreconditionFailure.Violation``):
    ``type`` e.g. ``TASK_STATUS``, ``subject`` e.g. ``task/42``."""

    type: str
    subject: str
    description: str


class FailedPrecondition(CrmError):
    """The system is not in the state the operation needs (e.g. task not offered)."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(
        self,
        message: str,
        *,
        violations: Sequence[PreconditionViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations: tuple[PreconditionViolation, ...] = tuple(violations)

    def status_details(self) -> list[Message]:
        details = super().status_details()
        if self.violations:
            failure = error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=v.type, subject=v.subject, description=v.description
                    )
                    for v in self.violations
                ]
            )
            details.insert(0, failure)
        return details


class Aborted(CrmError):
    """A concurrency conflict (lost optimistic lock, replaced stream); retry higher up."""

    code = grpc.StatusCode.ABORTED


class Unavailable(CrmError):
    """A dependency is unreachable right now; the call may be retried."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(CrmError):
    """A quota or capacity limit was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(CrmError):
    """An internal wait ran out of time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(CrmError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(CrmError):
    """The caller could not be identified."""

    code = grpc.StatusCode.UNAUTHENTICATED


def to_rpc_status(err: CrmError) -> grpc.Status:
    """The rich status for ``err``: code, details and ``grpc-status-details-bin`` metadata."""
    status = status_pb2.Status(code=err.code.value[0], message=err.message)
    for detail in err.status_details():
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


class Validator:
    """Collects field violations so an api layer reports all of them at once.

    Usage::

        v = Validator()
        v.require(1 <= req.agent.capacity <= 50, "agent.capacity", "must be 1..50")
        v.require(req.agent.id > 0, "agent.id", "must be > 0")
        v.check()  # raises InvalidArgument carrying every violation

    ``v.at("agent")`` returns a view that prefixes fields (``agent.capacity``) and
    shares the same list; also usable as ``with Validator() as v: ...``.
    """

    def __init__(
        self, prefix: str = "", *, _violations: list[FieldViolation] | None = None
    ) -> None:
        self._prefix = prefix
        self._violations: list[FieldViolation] = [] if _violations is None else _violations

    @property
    def violations(self) -> list[FieldViolation]:
        """The violations collected so far (shared with every ``at`` view)."""
        return list(self._violations)

    def at(self, prefix: str) -> Validator:
        """A view whose field names are relative to ``prefix``."""
        return Validator(self._path(prefix), _violations=self._violations)

    def add(self, field: str, description: str) -> None:
        """Records a violation unconditionally."""
        self._violations.append(FieldViolation(self._path(field), description))

    def require(self, condition: bool, field: str, description: str) -> bool:
        """Records a violation when ``condition`` is false; returns ``condition``."""
        if not condition:
            self.add(field, description)
        return condition

    def check(self) -> None:
        """Raises :class:`InvalidArgument` with every violation, if there is any."""
        if self._violations:
            raise InvalidArgument(self._violations)

    def _path(self, field: str) -> str:
        if not self._prefix:
            return field
        if not field:
            return self._prefix
        return self._prefix + field if field.startswith("[") else f"{self._prefix}.{field}"

    def __enter__(self) -> Validator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.check()


# -- client side ---------------------------------------------------------------------------


def rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` a failed call carries (sync or ``grpc.aio.AioRpcError``),
    or ``None`` when there is none or it disagrees with the call's code/details."""
    if not callable(getattr(error, "trailing_metadata", None)):
        return None
    try:
        status = rpc_status.from_call(cast(grpc.Call, error))
    except ValueError:
        return None
    return cast("status_pb2.Status | None", status)


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """``(field, description)`` pairs of the ``BadRequest`` in a failed call's status."""
    status = rich_status(error)
    if status is None:
        return []
    found: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found.extend((v.field, v.description) for v in bad_request.field_violations)
    return found


def error_reason(error: grpc.RpcError) -> str | None:
    """The ``ErrorInfo.reason`` of a failed call's status, if any."""
    status = rich_status(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return None
