"""Domain values of the assignment service: enums and immutable records (no I/O).

A business line is data (``crm_common.lines.BusinessLine``: a code >= 1, named by config).
Enum values equal the proto numbers (``crm.assignment.v1`` / ``crm.common.v1``), so the api
layer converts with ``Status(pb_value)`` and ``int(status)``; the database stores the names.
Every datetime in the domain is timezone-aware UTC.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from crm_common.lines import BusinessLine

if TYPE_CHECKING:
    from crm_common.tracing import RequestOrigin

__all__ = [
    "ACTIVE_STATUSES",
    "OPEN_STATUSES",
    "WAITING_STATUSES",
    "Agent",
    "AgentSpec",
    "BiOutboxEvent",
    "BusinessLine",
    "CallOutcome",
    "CallRecord",
    "CallResult",
    "CallType",
    "Category",
    "Clock",
    "Clue",
    "ClueResult",
    "Customer",
    "EventKind",
    "NewCall",
    "NewClue",
    "Offer",
    "OutboxBacklog",
    "OutboxEvent",
    "Presence",
    "PresenceCount",
    "ProtectedPhone",
    "QueueDepth",
    "QueueStats",
    "Status",
    "Task",
    "TaskDetail",
    "TaskEvent",
    "TaskFilter",
    "TelephonyProvider",
    "utc_now",
]

Clock = Callable[[], datetime]
"""Returns the current time, timezone-aware UTC (injectable for tests)."""


def utc_now() -> datetime:
    """The real clock."""
    return datetime.now(UTC)


class Category(enum.IntEnum):
    """Task category (``crm.assignment.v1.Category``)."""

    NEW_CLUE = 1
    REVISIT = 2
    FAILED_ORDER = 3


class Status(enum.IntEnum):
    """Task status (``crm.assignment.v1.Status``)."""

    UNASSIGNED = 1
    ASSIGNED = 2
    IN_PROGRESS = 3
    COMPLETED = 4
    FAILED = 5
    RECYCLED = 6
    CANCELLED = 7


class Presence(enum.IntEnum):
    """Agent presence (``crm.assignment.v1.Presence``)."""

    OFFLINE = 1
    IDLE = 2
    BUSY = 3
    BREAK = 4


class CallOutcome(enum.IntEnum):
    """How a call ended (``crm.assignment.v1.CallOutcome``)."""

    CONNECTED = 1
    NO_ANSWER = 2
    BUSY = 3
    REJECTED_BY_CUSTOMER = 4
    WRONG_NUMBER = 5


class CallType(enum.IntEnum):
    """Direction of a call (``crm.assignment.v1.CallType``; names as in the BI schema)."""

    CALLIN = 1
    CALLOUT = 2


class TelephonyProvider(enum.IntEnum):
    """Telephony provider (``crm.assignment.v1.TelephonyProvider``; BI schema names)."""

    ZT = 1
    RL = 2
    TR = 3


class EventKind(enum.StrEnum):
    """What a task_event row records."""

    CREATED = "CREATED"
    MERGED = "MERGED"
    OFFERED = "OFFERED"
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"
    TIMED_OUT = "TIMED_OUT"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    REVISIT_SCHEDULED = "REVISIT_SCHEDULED"


OPEN_STATUSES: frozenset[Status] = frozenset(
    {Status.UNASSIGNED, Status.ASSIGNED, Status.IN_PROGRESS, Status.RECYCLED}
)
"""Not finished: a new clue of the same customer and line may merge into such a task."""

WAITING_STATUSES: frozenset[Status] = frozenset({Status.UNASSIGNED, Status.RECYCLED})
"""In a queue, waiting for an offer."""

ACTIVE_STATUSES: frozenset[Status] = frozenset({Status.ASSIGNED, Status.IN_PROGRESS})
"""Held by an agent: counted against the agent's capacity."""


@dataclass(frozen=True, slots=True)
class ProtectedPhone:
    """A phone number in the only forms the platform keeps: never the clear number."""

    hash_hex: str
    """HMAC-SHA256 of the normalized number (hex): the unique lookup key."""
    encrypted: bytes
    """AES-GCM nonce + ciphertext + tag of the normalized number."""
    masked: str
    """For display, e.g. ``138****1234``."""


@dataclass(frozen=True, slots=True)
class Customer:
    id: int
    masked_phone: str
    star: bool


@dataclass(frozen=True, slots=True)
class NewClue:
    """A validated, normalized CreateClue request (the phone already protected)."""

    idempotency_key: str
    phone: ProtectedPhone
    business_line: BusinessLine
    source: str
    city: str
    intent_car_ids: tuple[int, ...]
    brands: tuple[str, ...]
    budget_min_yuan: int
    budget_max_yuan: int
    priority: int
    """0 means: take it from the line config (source_priority, else default_priority)."""
    request_hash: str
    """Hash of the normalized request (with the phone hash): tells a retry from key reuse."""
    origin: RequestOrigin | None = None
    """Request id and trace context of the request, recorded with its BI events (the batch
    that writes it runs for no request in particular); None: the writer's context."""


@dataclass(frozen=True, slots=True)
class Clue:
    id: int
    task_id: int
    source: str
    city: str
    intent_car_ids: tuple[int, ...]
    brands: tuple[str, ...]
    budget_min_yuan: int
    budget_max_yuan: int
    merged: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Task:
    id: int
    business_line: BusinessLine
    category: Category
    status: Status
    customer_id: int
    city: str
    priority: int
    star: bool
    agent_id: int | None
    preferred_agent_id: int | None
    last_lost_agent_id: int | None
    parent_task_id: int | None
    brands: tuple[str, ...]
    created_at: datetime
    due_at: datetime
    offer_deadline: datetime | None
    recycle_count: int
    clue_count: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class TaskEvent:
    id: int
    task_id: int
    kind: EventKind
    from_status: Status | None
    to_status: Status
    agent_id: int | None
    reason: str
    at: datetime


@dataclass(frozen=True, slots=True)
class NewCall:
    """A validated RecordCall request."""

    call_id: str
    task_id: int
    agent_id: int
    call_type: CallType
    provider: TelephonyProvider
    started_at: datetime
    duration_s: int
    outcome: CallOutcome
    note: str
    request_hash: str
    """Hash of the normalized request: tells a retry from a reused call id."""


@dataclass(frozen=True, slots=True)
class CallRecord:
    id: int
    call_id: str
    task_id: int
    agent_id: int
    call_type: CallType
    provider: TelephonyProvider
    started_at: datetime
    duration_s: int
    outcome: CallOutcome
    note: str
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class CallResult:
    call: CallRecord
    replayed: bool = False
    """True when this answers a retry (same call id and request)."""


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A task_event row not yet published to the BI log, with what its event needs from
    the task (business line and category)."""

    id: int
    task_id: int
    business_line: BusinessLine
    category: Category
    kind: EventKind
    from_status: Status | None
    to_status: Status
    agent_id: int | None
    at: datetime
    request_id: str | None = None
    """x-request-id of the request that made the transition (None: not known)."""
    traceparent: str | None = None
    """W3C traceparent of that request (None: not traced)."""


@dataclass(frozen=True, slots=True)
class BiOutboxEvent:
    """A bi_outbox row not yet published: a ready payload of the schema ``schema``, and
    the request id and traceparent of the request that made it (None: not known)."""

    id: int
    schema: str
    payload: dict[str, Any]
    request_id: str | None = None
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxBacklog:
    """Events waiting for the BI log (rejected ones not counted) and the oldest one's
    time (None when nothing waits)."""

    pending: int
    oldest_at: datetime | None


@dataclass(frozen=True, slots=True)
class TaskDetail:
    task: Task
    customer: Customer
    clues: tuple[Clue, ...]
    history: tuple[TaskEvent, ...]
    calls: tuple[CallRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class ClueResult:
    task: Task
    clue: Clue
    merged: bool
    replayed: bool = False
    """True when this answers a retry (same idempotency key and request)."""


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """What UpsertAgent sets (presence is changed with SetPresence only)."""

    id: int
    name: str
    business_line: BusinessLine
    cities: tuple[str, ...] = ()
    categories: tuple[Category, ...] = ()
    brands: tuple[str, ...] = ()
    capacity: int = 1


@dataclass(frozen=True, slots=True)
class Agent:
    id: int
    name: str
    business_line: BusinessLine
    cities: tuple[str, ...]
    categories: tuple[Category, ...]
    brands: tuple[str, ...]
    capacity: int
    presence: Presence
    active_tasks: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Offer:
    """A task just reserved (ASSIGNED) for an agent."""

    task: Task
    customer: Customer
    deadline: datetime
    agent_full: bool = False
    """The agent holds as many tasks as its capacity now (no use asking again until one
    is released)."""
    offer_event_id: int = 0
    """Id of the OFFERED task event of this offer (0 when not known: a pushed-again offer);
    names the offer in its scheduled timeout (``ExpireOffer``)."""


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """ListTasks filters (all optional, combined with AND)."""

    business_line: BusinessLine | None = None
    category: Category | None = None
    statuses: tuple[Status, ...] = ()
    agent_id: int | None = None
    city: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None


@dataclass(frozen=True, slots=True)
class QueueDepth:
    business_line: BusinessLine
    category: Category
    waiting: int = 0
    offered: int = 0
    in_progress: int = 0
    scheduled: int = 0
    oldest_wait_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class PresenceCount:
    business_line: BusinessLine
    presence: Presence
    agents: int


@dataclass(frozen=True, slots=True)
class QueueStats:
    queues: tuple[QueueDepth, ...] = ()
    agents: tuple[PresenceCount, ...] = field(default=())
