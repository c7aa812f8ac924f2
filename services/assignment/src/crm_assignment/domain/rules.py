"""The task state machine and the rules around it (pure: no I/O, no clock).

UNASSIGNED -> ASSIGNED -> IN_PROGRESS -> COMPLETED / FAILED; ASSIGNED -> RECYCLED (reject,
accept timeout); RECYCLED -> ASSIGNED (offered again); UNASSIGNED / ASSIGNED / RECYCLED ->
CANCELLED. An illegal transition raises FailedPrecondition naming the task, its status and
the wanted one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime, timedelta

from crm_common.errors import FailedPrecondition, InvalidArgument, PreconditionViolation

from crm_assignment.domain.model import EventKind, Status, Task, TaskDetail

__all__ = [
    "TRANSITIONS",
    "call_request_hash",
    "check_call_recorder",
    "check_offer_holder",
    "check_transition",
    "check_worker",
    "clue_request_hash",
    "merge_brands",
    "merge_cutoff",
    "resolve_priority",
    "visible_to_agent",
]

_REQUEST_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
"""The encoder of request hashes (``json.dumps`` with arguments builds one per call)."""

TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.UNASSIGNED: frozenset({Status.ASSIGNED, Status.CANCELLED}),
    Status.ASSIGNED: frozenset({Status.IN_PROGRESS, Status.RECYCLED, Status.CANCELLED}),
    Status.IN_PROGRESS: frozenset({Status.COMPLETED, Status.FAILED}),
    Status.RECYCLED: frozenset({Status.ASSIGNED, Status.CANCELLED}),
    Status.COMPLETED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
}


def can_transition(current: Status, wanted: Status) -> bool:
    return wanted in TRANSITIONS[current]


def check_transition(task_id: int, current: Status, wanted: Status) -> None:
    """Raise FailedPrecondition unless ``current -> wanted`` is a legal transition."""
    if not can_transition(current, wanted):
        message = f"task {task_id} is {current.name}; it cannot become {wanted.name}"
        raise FailedPrecondition(
            message,
            violations=[PreconditionViolation("TASK_STATUS", f"task/{task_id}", message)],
            reason="ILLEGAL_TRANSITION",
        )


def check_offer_holder(task: Task, agent_id: int, now: datetime) -> None:
    """The task must be offered (ASSIGNED) to ``agent_id`` and its deadline not passed."""
    check_transition(task.id, task.status, Status.IN_PROGRESS)
    if task.agent_id != agent_id:
        raise FailedPrecondition(
            f"task {task.id} is not offered to agent {agent_id}", reason="NOT_TASK_AGENT"
        )
    if task.offer_deadline is not None and now >= task.offer_deadline:
        raise FailedPrecondition(
            f"offer expired: task {task.id} had to be accepted by "
            f"{task.offer_deadline.isoformat()}",
            reason="OFFER_EXPIRED",
        )


def check_worker(task: Task, agent_id: int, wanted: Status) -> None:
    """The task must be IN_PROGRESS with ``agent_id`` to become ``wanted``."""
    check_transition(task.id, task.status, wanted)
    if task.agent_id != agent_id:
        raise FailedPrecondition(
            f"task {task.id} is handled by another agent, not {agent_id}",
            reason="NOT_TASK_AGENT",
        )


def check_call_recorder(task: Task, agent_id: int) -> None:
    """Only the agent holding the task IN_PROGRESS records calls on it."""
    if task.status is not Status.IN_PROGRESS:
        message = f"task {task.id} is {task.status.name}; calls are recorded while IN_PROGRESS"
        raise FailedPrecondition(
            message,
            violations=[PreconditionViolation("TASK_STATUS", f"task/{task.id}", message)],
            reason="TASK_NOT_IN_PROGRESS",
        )
    if task.agent_id != agent_id:
        raise FailedPrecondition(
            f"task {task.id} is handled by another agent, not {agent_id}",
            reason="NOT_TASK_AGENT",
        )


CALL_CLOCK_SKEW = timedelta(minutes=1)
"""How far a call's start may lie before the agent got the task (or after now): the
caller's clock (an agent's browser, a telephony system) is not the service's."""


def check_call_start(started_at: datetime, held_since: datetime | None) -> None:
    """A call on a task starts once the recording agent got the task (its latest offer
    of the task, ``held_since``), give or take :data:`CALL_CLOCK_SKEW`: INVALID_ARGUMENT
    on ``started_at`` otherwise (the agent holds the task: ``held_since`` is known)."""
    if held_since is not None and started_at < held_since - CALL_CLOCK_SKEW:
        raise InvalidArgument.single(
            "started_at",
            f"must not be before the task was assigned to the agent "
            f"({held_since.isoformat(timespec='seconds')})",
        )


def visible_to_agent(detail: TaskDetail, agent_id: int) -> bool:
    """An agent sees a task it holds or was ever offered (history has its OFFERED)."""
    if detail.task.agent_id == agent_id:
        return True
    return any(e.kind is EventKind.OFFERED and e.agent_id == agent_id for e in detail.history)


def resolve_priority(
    requested: int, source: str, source_priority: Mapping[str, int], default_priority: int
) -> int:
    """A clue's priority: as requested (1..9), else by its source, else the line default."""
    if requested > 0:
        return requested
    return source_priority.get(source, default_priority)


def merge_cutoff(now: datetime, merge_window_s: int) -> datetime:
    """Open tasks created at or after this instant take a new clue of the same customer."""
    return now - timedelta(seconds=merge_window_s)


MAX_TASK_BRANDS = 50
"""A task keeps at most this many brands (merged clues add theirs)."""


def merge_brands(existing: tuple[str, ...], new: tuple[str, ...]) -> tuple[str, ...]:
    """Union of brand lists, first spelling and order kept, compared case-insensitively,
    capped at MAX_TASK_BRANDS."""
    seen = {b.casefold() for b in existing}
    out = list(existing)
    for brand in new:
        if len(out) >= MAX_TASK_BRANDS:
            break
        if brand.casefold() not in seen:
            seen.add(brand.casefold())
            out.append(brand)
    return tuple(out)


def clue_request_hash(
    *,
    phone_hash: str,
    business_line: int,
    source: str,
    city: str,
    intent_car_ids: tuple[int, ...],
    brands: tuple[str, ...],
    budget_min_yuan: int,
    budget_max_yuan: int,
    priority: int,
) -> str:
    """SHA-256 of a normalized CreateClue request (the phone only as its keyed hash): equal
    for a retry, different when an idempotency key is reused for another request."""
    # Keys written in sorted order (the stored hashes were made with sort_keys=True; the
    # text must stay byte for byte the same): no sort on every call.
    body = {
        "brands": list(brands),
        "budget": [budget_min_yuan, budget_max_yuan],
        "cars": list(intent_car_ids),
        "city": city,
        "line": business_line,
        "phone": phone_hash,
        "priority": priority,
        "source": source,
    }
    raw = _REQUEST_JSON.encode(body)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def call_request_hash(
    *,
    task_id: int,
    agent_id: int,
    call_type: int,
    provider: int,
    started_at_us: int,
    duration_s: int,
    outcome: int,
    note: str,
) -> str:
    """SHA-256 of a normalized RecordCall request: equal for a retry, different when a
    call id is reused for another call."""
    body = [task_id, agent_id, call_type, provider, started_at_us, duration_s, outcome, note]
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()
