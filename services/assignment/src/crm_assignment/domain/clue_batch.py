"""Planning a batch of CreateClue requests written in one transaction (pure: no I/O).

The store locks the batch's customers and reads what the plan needs (clues already stored
under the batch's idempotency keys, their tasks, the open tasks new clues may merge into);
:func:`plan_batch` then decides every request in request order, exactly as if they had
been recorded one after the other:

- a key already stored: a replay (same request hash) or ``ALREADY_EXISTS`` (another one);
- a key seen earlier in the batch: a replay of that request, or ``ALREADY_EXISTS``;
- otherwise a new clue, merged into the newest open task of its customer and line created
  within the merge window (possibly one created earlier in the same batch), else into a new
  task.

Rows not stored yet carry provisional negative ids (tasks ``-1, -2, ...`` in insert order,
clues likewise); :meth:`BatchPlan.resolve` swaps in the ids the database assigned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from crm_common.errors import AlreadyExists, CrmError

from crm_assignment.domain import rules
from crm_assignment.domain.model import (
    OPEN_STATUSES,
    WAITING_STATUSES,
    BusinessLine,
    Category,
    Clue,
    ClueResult,
    Customer,
    EventKind,
    NewClue,
    Status,
    Task,
)

__all__ = [
    "BatchItem",
    "BatchPlan",
    "ClueDraft",
    "EventDraft",
    "StoredClue",
    "key_reused",
    "plan_batch",
]


def key_reused() -> AlreadyExists:
    """The error of an idempotency key sent again with a different request."""
    return AlreadyExists(
        "the idempotency key was already used for a different request",
        reason="IDEMPOTENCY_KEY_REUSED",
    )


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One CreateClue request of a batch, with what its line's config decides."""

    clue: NewClue
    now: datetime
    merge_window_s: int
    """0: never merge."""
    priority: int
    """The priority the clue gives its task (``rules.resolve_priority``)."""


@dataclass(frozen=True, slots=True)
class StoredClue:
    """A clue already in the database (found by idempotency key)."""

    clue: Clue
    request_hash: str


@dataclass(frozen=True, slots=True)
class ClueDraft:
    """A clue row to insert; ``clue.id`` and maybe ``clue.task_id`` are provisional."""

    clue: Clue
    new: NewClue
    customer_id: int
    business_line: BusinessLine


@dataclass(frozen=True, slots=True)
class EventDraft:
    """A task_event row to insert (``reason`` names the clue once its id is known)."""

    task_id: int
    clue_id: int
    kind: EventKind
    from_status: Status | None
    to_status: Status
    at: datetime


@dataclass(slots=True)
class BatchPlan:
    """What to write, and each request's answer (with provisional ids until resolved)."""

    new_tasks: list[Task] = field(default_factory=list)
    """Final states of the tasks to insert; ids ``-1, -2, ...`` in this order."""
    merged_tasks: list[Task] = field(default_factory=list)
    """Final states of existing tasks that took clues (to update), by id."""
    clues: list[ClueDraft] = field(default_factory=list)
    """Clues to insert; ids ``-1, -2, ...`` in this order."""
    events: list[EventDraft] = field(default_factory=list)
    outcomes: list[ClueResult | CrmError] = field(default_factory=list)
    """One per request, in request order."""

    def resolve(
        self, task_ids: Sequence[int], clue_ids: Sequence[int]
    ) -> list[ClueResult | CrmError]:
        """The outcomes with the real ids of the inserted tasks and clues."""
        if len(task_ids) != len(self.new_tasks) or len(clue_ids) != len(self.clues):
            raise ValueError("one id per inserted task and clue is needed")

        def task_id(i: int) -> int:
            return i if i > 0 else task_ids[-i - 1]

        def clue_id(i: int) -> int:
            return i if i > 0 else clue_ids[-i - 1]

        out: list[ClueResult | CrmError] = []
        for o in self.outcomes:
            if isinstance(o, ClueResult) and (o.task.id < 0 or o.clue.id < 0):
                o = dataclasses.replace(
                    o,
                    task=dataclasses.replace(o.task, id=task_id(o.task.id)),
                    clue=dataclasses.replace(
                        o.clue, id=clue_id(o.clue.id), task_id=task_id(o.clue.task_id)
                    ),
                )
            out.append(o)
        return out


def plan_batch(
    items: Sequence[BatchItem],
    customers: Mapping[str, Customer],
    stored: Mapping[str, StoredClue],
    tasks: Mapping[int, Task],
    merge_targets: Mapping[tuple[int, BusinessLine], Task],
) -> BatchPlan:
    """Decide every request of the batch, in order (see the module doc).

    ``customers``: the locked customer of every phone hash of the batch;
    ``stored``: clues already stored under the batch's keys; ``tasks``: current state of
    their tasks; ``merge_targets``: per (customer id, line), the newest open task created
    within the widest merge window of the line's requests (locked).
    """
    plan = BatchPlan()
    state: dict[int, Task] = dict(tasks)
    state.update((t.id, t) for t in merge_targets.values())
    newest = {key: t.id for key, t in merge_targets.items()}
    in_batch: dict[str, tuple[str, Clue]] = {}  # key -> (request hash, clue)
    merged_ids: set[int] = set()
    new_ids: list[int] = []

    for item in items:
        new = item.clue
        key = new.idempotency_key
        previous = stored.get(key)
        earlier = (previous.request_hash, previous.clue) if previous is not None else None
        if earlier is None:
            earlier = in_batch.get(key)
        if earlier is not None:
            request_hash, clue = earlier
            if request_hash != new.request_hash:
                plan.outcomes.append(key_reused())
            else:
                task = state[clue.task_id]
                plan.outcomes.append(
                    ClueResult(task=task, clue=clue, merged=clue.merged, replayed=True)
                )
            continue

        customer = customers[new.phone.hash_hex]
        now = item.now
        target: Task | None = None
        if item.merge_window_s > 0:
            tid = newest.get((customer.id, new.business_line))
            if tid is not None:
                t = state[tid]
                cutoff = rules.merge_cutoff(now, item.merge_window_s)
                if t.status in OPEN_STATUSES and t.created_at >= cutoff:
                    target = t
        merged = target is not None
        if target is None:
            task = Task(
                id=-(len(new_ids) + 1),
                business_line=new.business_line,
                category=Category.NEW_CLUE,
                status=Status.UNASSIGNED,
                customer_id=customer.id,
                city=new.city,
                priority=item.priority,
                star=customer.star,
                agent_id=None,
                preferred_agent_id=None,
                last_lost_agent_id=None,
                parent_task_id=None,
                brands=new.brands,
                created_at=now,
                due_at=now,
                offer_deadline=None,
                recycle_count=0,
                clue_count=1,
                updated_at=now,
            )
            new_ids.append(task.id)
            line_key = (customer.id, new.business_line)
            current = newest.get(line_key)
            if current is None or state[current].created_at <= now:
                newest[line_key] = task.id
            from_status: Status | None = None
        else:
            assert target is not None
            due_at = target.due_at
            if target.status in WAITING_STATUSES and due_at > now:
                due_at = now  # the customer asked again: call now, not at the revisit
            task = dataclasses.replace(
                target,
                clue_count=target.clue_count + 1,
                brands=rules.merge_brands(target.brands, new.brands),
                priority=max(target.priority, item.priority),
                due_at=due_at,
                updated_at=now,
            )
            if task.id > 0:
                merged_ids.add(task.id)
            from_status = task.status
        state[task.id] = task
        clue = Clue(
            id=-(len(plan.clues) + 1),
            task_id=task.id,
            source=new.source,
            city=new.city,
            intent_car_ids=new.intent_car_ids,
            brands=new.brands,
            budget_min_yuan=new.budget_min_yuan,
            budget_max_yuan=new.budget_max_yuan,
            merged=merged,
            created_at=now,
        )
        plan.clues.append(ClueDraft(clue, new, customer.id, new.business_line))
        in_batch[key] = (new.request_hash, clue)
        plan.events.append(
            EventDraft(
                task_id=task.id,
                clue_id=clue.id,
                kind=EventKind.MERGED if merged else EventKind.CREATED,
                from_status=from_status,
                to_status=task.status,
                at=now,
            )
        )
        plan.outcomes.append(ClueResult(task=task, clue=clue, merged=merged))

    plan.new_tasks = [state[i] for i in new_ids]
    plan.merged_tasks = [state[i] for i in sorted(merged_ids)]
    return plan
