"""The assignment store: every read and write of the service, one transaction per call.

Synchronous (SQLAlchemy 2 + PyMySQL): callers run these methods through a
``BlockingExecutor`` sized like the connection pool, never on the event loop. Methods take
and return domain records (``crm_assignment.domain.model``); ORM rows never leave here.
Every status change writes its ``task_event`` row in the same transaction. Outbox rows
(``task_event``, ``bi_outbox``) record the request id and trace context of the request
that made them (:func:`_origin`).

Locking, in one order (customer -> task, agent -> task) so that nothing deadlocks:

- CreateClue upserts the customer and locks its row, so concurrent clues of one phone
  serialize; the open task it merges into is locked after that.
- Dispatch locks the agent row (its capacity check), reads the candidates without locks,
  ranks them in the domain, then locks the best one it can by primary key with
  ``FOR UPDATE SKIP LOCKED`` (a locked or already taken task is skipped, the next one is
  tried). Locking the whole ordered candidate query instead would make InnoDB lock every
  row it sorts (filesort), so concurrent dispatchers would find the queue empty.
- Task actions (accept, reject, complete, ...) lock the task row.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, cast

from crm_common.db import (
    ER_DUP_ENTRY,
    RawSQL,
    TransactionRunner,
    from_json_time,
    mysql_errno,
    placeholders,
    to_db_time,
)
from crm_common.errors import (
    AlreadyExists,
    CrmError,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from crm_common.tracing import RequestOrigin, request_origin
from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Table,
    and_,
    case,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from crm_assignment.config import LineConfig, RoutingConfig
from crm_assignment.domain import bi_events, rules
from crm_assignment.domain.agent_query import AgentFilter
from crm_assignment.domain.clue_batch import (
    BatchItem,
    BatchPlan,
    StoredClue,
    key_reused,
    plan_batch,
)
from crm_assignment.domain.model import (
    ACTIVE_STATUSES,
    OPEN_STATUSES,
    WAITING_STATUSES,
    Agent,
    AgentSpec,
    BiOutboxEvent,
    BusinessLine,
    CallRecord,
    CallResult,
    Category,
    Clue,
    ClueResult,
    Customer,
    EventKind,
    NewCall,
    NewClue,
    Offer,
    OutboxBacklog,
    OutboxEvent,
    Presence,
    PresenceCount,
    QueueDepth,
    QueueStats,
    Status,
    Task,
    TaskDetail,
    TaskEvent,
    TaskFilter,
)
from crm_assignment.domain.paging import Cursor
from crm_assignment.store.dispatching import DispatchResult, dispatch_batch
from crm_assignment.store.rows import (
    TASK_JSON,
    NoOffer,
    db_json,
    task_from_json,
    task_of,
)
from crm_assignment.store.schema import (
    AgentRow,
    BiOutboxRow,
    CallRecordRow,
    ClueRow,
    CustomerRow,
    TaskEventRow,
    TaskRow,
    line_to_db,
)

__all__ = [
    "ActionKind",
    "AssignmentStore",
    "DispatchResult",
    "ExpireOutcome",
    "NoOffer",
    "TaskAction",
]

log = logging.getLogger("crm.assignment.store")

_OPEN = tuple(OPEN_STATUSES)
_OPEN_SQL = ", ".join(f"'{s.name}'" for s in sorted(OPEN_STATUSES))
_WAITING = tuple(WAITING_STATUSES)
_ACTIVE = tuple(ACTIVE_STATUSES)
_DISPATCH_ROUNDS = 3

# Core tables of the CreateClue batch path (no ORM unit of work there).
_customer_t = cast(Table, CustomerRow.__table__)
_task_t = cast(Table, TaskRow.__table__)
_agent_t = cast(Table, AgentRow.__table__)
_clue_t = cast(Table, ClueRow.__table__)
_event_t = cast(Table, TaskEventRow.__table__)

_insert_events = insert(_event_t)
_bi_t = cast(Table, BiOutboxRow.__table__)


class ActionKind(enum.Enum):
    """A task action written by ``task_actions`` (group commit)."""

    ACCEPT = Status.IN_PROGRESS
    COMPLETE = Status.COMPLETED
    FAIL = Status.FAILED


_ACTION_EVENT = {
    ActionKind.ACCEPT: EventKind.ACCEPTED,
    ActionKind.COMPLETE: EventKind.COMPLETED,
    ActionKind.FAIL: EventKind.FAILED,
}


@dataclass(frozen=True, slots=True)
class TaskAction:
    """One AcceptTask / CompleteTask (without revisit) / FailTask of a batch."""

    kind: ActionKind
    task_id: int
    agent_id: int
    text: str
    """The note (complete) or reason (fail); empty for accept."""
    now: datetime
    origin: RequestOrigin | None = None
    """The request's id and trace context for its audit row (the batch runs for no
    request in particular); None: the writer's context."""


@dataclass(frozen=True, slots=True)
class ExpireOutcome:
    """What ``expire_offer`` did: ``recycled`` is the task it recycled (None: nothing to
    do, the offer is no longer current); ``early`` is True when the offer is current but
    its deadline has not passed yet (the caller should retry later)."""

    recycled: Task | None
    early: bool


ClueRequest = tuple[NewClue, datetime, LineConfig]
"""One CreateClue of a batch: the clue, the time it was asked at, its line's config."""


# --------------------------------------------------------------------------- row -> domain


_task = task_of


def _clue(r: ClueRow | Row[Any]) -> Clue:
    return Clue(
        id=r.id,
        task_id=r.task_id,
        source=r.source,
        city=r.city,
        intent_car_ids=tuple(r.intent_car_ids or ()),
        brands=tuple(r.brands or ()),
        budget_min_yuan=r.budget_min_yuan,
        budget_max_yuan=r.budget_max_yuan,
        merged=bool(r.merged),
        created_at=r.created_at,
    )


_CLUE_JSON = (
    "JSON_ARRAY(id, task_id, source, city, JSON_QUERY(intent_car_ids, '$'), "
    "JSON_QUERY(brands, '$'), budget_min_yuan, budget_max_yuan, merged, created_at, "
    "request_hash, idempotency_key)"
)


def _clue_from_json(r: list[Any]) -> Clue:
    """A ``_CLUE_JSON`` row as a domain Clue."""
    return Clue(
        id=r[0],
        task_id=r[1],
        source=r[2],
        city=r[3],
        intent_car_ids=tuple(r[4] or ()),
        brands=tuple(r[5] or ()),
        budget_min_yuan=r[6],
        budget_max_yuan=r[7],
        merged=bool(r[8]),
        created_at=from_json_time(r[9]),
    )


def _customer(r: CustomerRow) -> Customer:
    return Customer(id=r.id, masked_phone=r.phone_masked, star=bool(r.star))


def _event(r: TaskEventRow) -> TaskEvent:
    return TaskEvent(
        id=r.id,
        task_id=r.task_id,
        kind=r.kind,
        from_status=r.from_status,
        to_status=r.to_status,
        agent_id=r.agent_id,
        reason=r.reason,
        at=r.at,
    )


def _call(r: CallRecordRow) -> CallRecord:
    return CallRecord(
        id=r.id,
        call_id=r.call_id,
        task_id=r.task_id,
        agent_id=r.agent_id,
        call_type=r.call_type,
        provider=r.provider,
        started_at=r.started_at,
        duration_s=r.duration_s,
        outcome=r.outcome,
        note=r.note,
        recorded_at=r.created_at,
    )


def _agent(r: AgentRow, active: int) -> Agent:
    return Agent(
        id=r.id,
        name=r.name,
        business_line=r.business_line,
        cities=tuple(r.cities or ()),
        categories=tuple(Category[c] for c in (r.categories or ())),
        brands=tuple(r.brands or ()),
        capacity=r.capacity,
        presence=r.presence,
        active_tasks=active,
        updated_at=r.updated_at,
    )


def _origin(origin: RequestOrigin | None = None) -> dict[str, str | None]:
    """The ``request_id`` and ``traceparent`` columns of an outbox row: ``origin`` (a
    batched request's, taken when it was made) or else the current request's (store
    methods run in the caller's context; tracing off, only a contextvar is read)."""
    request_id, traceparent = origin if origin is not None else request_origin()
    return {"request_id": request_id, "traceparent": traceparent}


def _record(
    s: Session,
    task: TaskRow,
    kind: EventKind,
    from_status: Status | None,
    now: datetime,
    agent_id: int | None = None,
    reason: str = "",
    origin: RequestOrigin | None = None,
) -> TaskEventRow:
    """Append the audit row of a transition (same transaction as the change)."""
    event = TaskEventRow(
        task_id=task.id,
        kind=kind,
        from_status=from_status,
        to_status=task.status,
        agent_id=agent_id,
        reason=reason[:500],
        at=now,
        **_origin(origin),
    )
    s.add(event)
    return event


def _is_duplicate_key(exc: IntegrityError) -> bool:
    return mysql_errno(exc) == ER_DUP_ENTRY


class AssignmentStore:
    """All database work of the assignment service (synchronous; see module doc)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._tx = TransactionRunner(engine)

    def ping(self) -> None:
        self._tx.ping()

    # ------------------------------------------------------------------ clues

    def create_clue(self, new: NewClue, now: datetime, cfg: LineConfig) -> ClueResult:
        """Record a clue: answer a retry, refuse a reused key, merge or create a task."""
        for _ in range(3):
            try:
                return self._tx.run(lambda s: self._create_clue(s, new, now, cfg))
            except IntegrityError as exc:
                # A concurrent request with the same idempotency key (another phone, so
                # the customer lock did not serialize us) committed first: re-read it.
                if not _is_duplicate_key(exc):
                    raise
                log.info("idempotency key race lost; re-reading")
        return self._tx.run(lambda s: self._create_clue(s, new, now, cfg))

    def create_clues(self, requests: Sequence[ClueRequest], /) -> list[ClueResult | Exception]:
        """Record a batch of clues in one transaction; one result or error per request, in
        order, the same as :meth:`create_clue` one after the other would give.

        When the batch transaction fails (a concurrent replica took one of the keys,
        deadlock retries ran out, ...) each request is run alone with :meth:`create_clue`,
        so one bad request never fails the others. Unreachable database: all fail.
        """
        items = [
            BatchItem(
                clue=new,
                now=now,
                merge_window_s=cfg.merge_window_s,
                priority=rules.resolve_priority(
                    new.priority, new.source, cfg.source_priority, cfg.default_priority
                ),
            )
            for new, now, cfg in requests
        ]
        if not items:
            return []
        try:
            return list(self._tx.run_core(lambda c: self._create_clues(c, items)))
        except Unavailable as exc:
            return [exc] * len(items)
        except Exception as exc:
            log.warning(
                "clue batch failed; recording its %d clues one by one",
                len(items),
                exc_info=not isinstance(exc, IntegrityError | CrmError),
            )
        out: list[ClueResult | Exception] = []
        for new, now, cfg in requests:
            try:
                out.append(self.create_clue(new, now, cfg))
            except Exception as exc:
                out.append(exc)
        return out

    def _create_clues(self, c: Connection, items: list[BatchItem]) -> list[ClueResult | CrmError]:
        # Plain driver statements (RawSQL): CreateClue's hot path.
        raw = RawSQL(c)
        # 1. Customers: upsert (which locks the rows, new or not) in phone hash order:
        #    batches of replicas never deadlock on each other.
        phones = {i.clue.phone.hash_hex: i for i in reversed(items)}  # first item wins
        hashes = sorted(phones)
        values: list[Any] = []
        for h in hashes:
            first = phones[h]
            at = to_db_time(first.now)
            values += (h, first.clue.phone.encrypted, first.clue.phone.masked, False, at, at)
        customers = {  # RETURNING gives inserted and existing rows alike, locked
            r[1]: Customer(id=r[0], masked_phone=r[2], star=bool(r[3]))
            for r in raw.json_rows(
                "INSERT INTO customer (phone_hash, phone_encrypted, phone_masked, star, "
                f"created_at, updated_at) VALUES {placeholders(len(hashes), 6)} "
                "ON DUPLICATE KEY UPDATE phone_hash = VALUES(phone_hash) "  # no-op: the lock
                "RETURNING JSON_ARRAY(id, phone_hash, phone_masked, star)",
                values,
            )
        }
        # 2. Keys already used (after the customer locks: a concurrent retry of the same
        #    request, same phone, has committed by now). Their rows are read only when
        #    there are any (retries are rare).
        keys = list({i.clue.idempotency_key for i in items})
        stored: dict[str, StoredClue] = {}
        tasks: dict[int, Task] = {}
        in_keys = f"idempotency_key IN ({placeholders(len(keys), 1)})"
        if raw.rows(f"SELECT id FROM clue WHERE {in_keys}", keys):
            for r in raw.json_rows(f"SELECT {_CLUE_JSON} FROM clue WHERE {in_keys}", keys):
                stored[r[11]] = StoredClue(_clue_from_json(r), r[10])
            ids = sorted({x.clue.task_id for x in stored.values()})
            tasks = {
                r[0]: task_from_json(r)
                for r in raw.json_rows(
                    f"SELECT {TASK_JSON} FROM task WHERE id IN ({placeholders(len(ids), 1)})",
                    ids,
                )
            }
        # 3. Open tasks the new clues may merge into (locked), newest first per customer
        #    and line.
        targets: dict[tuple[int, BusinessLine], Task] = {}
        windows: dict[BusinessLine, datetime] = {}
        merging: set[int] = set()
        for i in items:
            if i.merge_window_s > 0 and i.clue.idempotency_key not in stored:
                line = i.clue.business_line
                cutoff = rules.merge_cutoff(i.now, i.merge_window_s)
                windows[line] = min(cutoff, windows.get(line, cutoff))
                merging.add(customers[i.clue.phone.hash_hex].id)
        if merging:
            ids = sorted(merging)
            params: list[Any] = [*ids]
            for line, cutoff in sorted(windows.items()):
                params += (line_to_db(line), to_db_time(cutoff))
            windows_sql = " OR ".join(["(business_line = %s AND created_at >= %s)"] * len(windows))
            for r in raw.json_rows(
                f"SELECT {TASK_JSON} FROM task "
                f"WHERE customer_id IN ({placeholders(len(ids), 1)}) "
                f"AND status IN ({_OPEN_SQL}) AND ({windows_sql}) "
                "ORDER BY customer_id, business_line, created_at DESC, id DESC FOR UPDATE",
                params,
            ):
                task = task_from_json(r)
                targets.setdefault((task.customer_id, task.business_line), task)
        # 4. Plan in request order, then write: tasks, merged tasks, clues, audit.
        plan = plan_batch(items, customers, stored, tasks, targets)
        return self._write_plan(raw, plan)

    @staticmethod
    def _write_plan(raw: RawSQL, plan: BatchPlan) -> list[ClueResult | CrmError]:
        task_ids: list[int] = []
        if plan.new_tasks:
            values: list[Any] = []
            for t in plan.new_tasks:
                values += (
                    line_to_db(t.business_line), t.category.name, t.status.name, t.customer_id,
                    t.city, t.priority, t.star, db_json(list(t.brands)),
                    to_db_time(t.created_at), to_db_time(t.due_at), t.recycle_count,
                    t.clue_count, to_db_time(t.updated_at),
                )  # fmt: skip
            # RETURNING rows of one multi-row INSERT: auto-increment ids rise in row order
            # (what SQLAlchemy's insertmanyvalues relies on for MariaDB as well).
            task_ids = sorted(
                r[0]
                for r in raw.rows(
                    "INSERT INTO task (business_line, category, status, customer_id, city, "
                    "priority, star, brands, created_at, due_at, recycle_count, clue_count, "
                    f"updated_at) VALUES {placeholders(len(plan.new_tasks), 13)} RETURNING id",
                    values,
                )
            )
            if len(task_ids) != len(plan.new_tasks):  # pragma: no cover - driver contract
                raise RuntimeError("INSERT ... RETURNING gave a wrong number of task ids")

        def real_task(i: int) -> int:
            return i if i > 0 else task_ids[-i - 1]

        for t in plan.merged_tasks:
            raw.execute(
                "UPDATE task SET clue_count = %s, brands = %s, priority = %s, due_at = %s, "
                "updated_at = %s WHERE id = %s",
                (
                    t.clue_count, db_json(list(t.brands)), t.priority, to_db_time(t.due_at),
                    to_db_time(t.updated_at), t.id,
                ),
            )  # fmt: skip
        clue_ids: list[int] = []
        if plan.clues:
            values = []
            for d in plan.clues:
                values += (
                    d.new.idempotency_key, d.new.request_hash, real_task(d.clue.task_id),
                    d.customer_id, d.clue.merged, line_to_db(d.business_line), d.new.source,
                    d.new.city, db_json(list(d.new.intent_car_ids)), db_json(list(d.new.brands)),
                    d.new.budget_min_yuan, d.new.budget_max_yuan, d.new.priority,
                    to_db_time(d.clue.created_at),
                )  # fmt: skip
            clue_ids = sorted(
                r[0]
                for r in raw.rows(
                    "INSERT INTO clue (idempotency_key, request_hash, task_id, customer_id, "
                    "merged, business_line, source, city, intent_car_ids, brands, "
                    "budget_min_yuan, budget_max_yuan, priority, created_at) "
                    f"VALUES {placeholders(len(plan.clues), 14)} RETURNING id",
                    values,
                )
            )
            if len(clue_ids) != len(plan.clues):  # pragma: no cover - driver contract
                raise RuntimeError("INSERT ... RETURNING gave a wrong number of clue ids")
        if plan.events:
            values = []
            for e in plan.events:
                o = _origin(plan.clues[-e.clue_id - 1].new.origin)
                values += (
                    real_task(e.task_id), e.kind.value,
                    None if e.from_status is None else e.from_status.name, e.to_status.name,
                    f"clue {clue_ids[-e.clue_id - 1]}", to_db_time(e.at),
                    o["request_id"], o["traceparent"],
                )  # fmt: skip
            raw.execute(
                "INSERT INTO task_event (task_id, kind, from_status, to_status, reason, at, "
                f"request_id, traceparent) VALUES {placeholders(len(plan.events), 8)}",
                values,
            )
        return plan.resolve(task_ids, clue_ids)

    def _replay(self, s: Session, clue: ClueRow, new: NewClue) -> ClueResult:
        if clue.request_hash != new.request_hash:
            raise key_reused()
        task = s.get_one(TaskRow, clue.task_id)
        return ClueResult(task=_task(task), clue=_clue(clue), merged=clue.merged, replayed=True)

    def _find_clue(self, s: Session, key: str) -> ClueRow | None:
        return s.scalars(select(ClueRow).where(ClueRow.idempotency_key == key)).one_or_none()

    def _create_clue(self, s: Session, new: NewClue, now: datetime, cfg: LineConfig) -> ClueResult:
        # Customer first (upsert, then its row lock): concurrent clues of one phone, and
        # retries of one request, serialize here; the idempotency key is checked after.
        upsert = mysql_insert(CustomerRow).values(
            phone_hash=new.phone.hash_hex,
            phone_encrypted=new.phone.encrypted,
            phone_masked=new.phone.masked,
            star=False,
            created_at=now,
            updated_at=now,
        )
        s.execute(upsert.on_duplicate_key_update(phone_hash=upsert.inserted.phone_hash))  # no-op
        customer = s.scalars(
            select(CustomerRow)
            .where(CustomerRow.phone_hash == new.phone.hash_hex)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).one()
        found = self._find_clue(s, new.idempotency_key)
        if found is not None:
            return self._replay(s, found, new)

        priority = rules.resolve_priority(
            new.priority, new.source, cfg.source_priority, cfg.default_priority
        )
        task: TaskRow | None = None
        if cfg.merge_window_s > 0:
            task = s.scalars(
                select(TaskRow)
                .where(
                    TaskRow.customer_id == customer.id,
                    TaskRow.business_line == new.business_line,
                    TaskRow.status.in_(_OPEN),
                    TaskRow.created_at >= rules.merge_cutoff(now, cfg.merge_window_s),
                )
                .order_by(TaskRow.created_at.desc(), TaskRow.id.desc())
                .limit(1)
                .with_for_update()
                .execution_options(populate_existing=True)
            ).first()
        merged = task is not None
        if task is None:
            task = TaskRow(
                business_line=new.business_line,
                category=Category.NEW_CLUE,
                status=Status.UNASSIGNED,
                customer_id=customer.id,
                city=new.city,
                priority=priority,
                star=customer.star,
                brands=list(new.brands),
                created_at=now,
                due_at=now,
                recycle_count=0,
                clue_count=1,
                updated_at=now,
            )
            s.add(task)
            s.flush()
        else:
            task.clue_count += 1
            task.brands = list(rules.merge_brands(tuple(task.brands or ()), new.brands))
            task.priority = max(task.priority, priority)
            if task.status in WAITING_STATUSES and task.due_at > now:
                task.due_at = now  # the customer asked again: call now, not at the revisit
            task.updated_at = now
        clue = ClueRow(
            idempotency_key=new.idempotency_key,
            request_hash=new.request_hash,
            task_id=task.id,
            customer_id=customer.id,
            merged=merged,
            business_line=new.business_line,
            source=new.source,
            city=new.city,
            intent_car_ids=list(new.intent_car_ids),
            brands=list(new.brands),
            budget_min_yuan=new.budget_min_yuan,
            budget_max_yuan=new.budget_max_yuan,
            priority=new.priority,
            created_at=now,
        )
        s.add(clue)
        s.flush()  # raises IntegrityError on a concurrent duplicate key
        kind = EventKind.MERGED if merged else EventKind.CREATED
        _record(
            s, task, kind, task.status if merged else None, now,
            reason=f"clue {clue.id}", origin=new.origin,
        )  # fmt: skip
        s.flush()
        return ClueResult(task=_task(task), clue=_clue(clue), merged=merged)

    # ------------------------------------------------------------------ reads

    def get_task(self, task_id: int) -> TaskDetail:
        def go(s: Session) -> TaskDetail:
            row = s.get(TaskRow, task_id)
            if row is None:
                raise NotFound(f"task {task_id} not found")
            customer = s.get_one(CustomerRow, row.customer_id)
            clues = s.scalars(
                select(ClueRow).where(ClueRow.task_id == task_id).order_by(ClueRow.id)
            ).all()
            events = s.scalars(
                select(TaskEventRow)
                .where(TaskEventRow.task_id == task_id)
                .order_by(TaskEventRow.id)
            ).all()
            calls = s.scalars(
                select(CallRecordRow)
                .where(CallRecordRow.task_id == task_id)
                .order_by(CallRecordRow.id)
            ).all()
            return TaskDetail(
                task=_task(row),
                customer=_customer(customer),
                clues=tuple(_clue(c) for c in clues),
                history=tuple(_event(e) for e in events),
                calls=tuple(_call(c) for c in calls),
            )

        return self._tx.run(go)

    def list_tasks(
        self, f: TaskFilter, page_size: int, after: Cursor | None
    ) -> tuple[list[Task], bool]:
        """One page (newest first) and whether more follow."""

        def go(s: Session) -> tuple[list[Task], bool]:
            q = select(TaskRow)
            if f.business_line is not None:
                q = q.where(TaskRow.business_line == f.business_line)
            if f.category is not None:
                q = q.where(TaskRow.category == f.category)
            if f.statuses:
                q = q.where(TaskRow.status.in_(f.statuses))
            if f.agent_id:
                q = q.where(TaskRow.agent_id == f.agent_id)
            if f.city:
                q = q.where(TaskRow.city == f.city)
            if f.created_from is not None:
                q = q.where(TaskRow.created_at >= f.created_from)
            if f.created_to is not None:
                q = q.where(TaskRow.created_at < f.created_to)
            if after is not None:
                q = q.where(
                    or_(
                        TaskRow.created_at < after.created_at,
                        and_(TaskRow.created_at == after.created_at, TaskRow.id < after.id),
                    )
                )
            q = q.order_by(TaskRow.created_at.desc(), TaskRow.id.desc()).limit(page_size + 1)
            rows = s.scalars(q).all()
            return [_task(r) for r in rows[:page_size]], len(rows) > page_size

        return self._tx.run(go)

    def queue_stats(
        self,
        line: BusinessLine | None,
        now: datetime,
        known: Sequence[BusinessLine] = BusinessLine.well_known_lines(),
    ) -> QueueStats:
        """Depth per queue (every line x category of the asked line, or of the ``known``
        lines and any other line with open tasks) and agents by presence."""

        def go(s: Session) -> QueueStats:
            due = TaskRow.due_at <= now
            q = select(
                TaskRow.business_line,
                TaskRow.category,
                TaskRow.status,
                case((due, 1), else_=0).label("due"),
                func.count().label("n"),
                func.min(TaskRow.due_at).label("oldest"),
            ).where(TaskRow.status.in_(_OPEN))
            if line is not None:
                q = q.where(TaskRow.business_line == line)
            q = q.group_by(TaskRow.business_line, TaskRow.category, TaskRow.status, "due")
            lines = [line] if line is not None else sorted(known)
            acc: dict[tuple[BusinessLine, Category], dict[str, float]] = {
                (bl, c): {"waiting": 0, "offered": 0, "in_progress": 0, "scheduled": 0, "wait": 0}
                for bl in lines
                for c in Category
            }
            acc_keys = ("waiting", "offered", "in_progress", "scheduled", "wait")
            for bl, cat, status, is_due, n, oldest in s.execute(q).all():
                a = acc.setdefault((bl, cat), dict.fromkeys(acc_keys, 0.0))
                if status in WAITING_STATUSES and is_due:
                    a["waiting"] += n
                    a["wait"] = max(a["wait"], (now - oldest).total_seconds())
                elif status in WAITING_STATUSES:
                    a["scheduled"] += n
                elif status is Status.ASSIGNED:
                    a["offered"] += n
                else:
                    a["in_progress"] += n
            queues = tuple(
                QueueDepth(
                    business_line=bl,
                    category=cat,
                    waiting=int(a["waiting"]),
                    offered=int(a["offered"]),
                    in_progress=int(a["in_progress"]),
                    scheduled=int(a["scheduled"]),
                    oldest_wait_seconds=float(a["wait"]),
                )
                for (bl, cat), a in sorted(acc.items())
            )
            aq = select(AgentRow.business_line, AgentRow.presence, func.count()).group_by(
                AgentRow.business_line, AgentRow.presence
            )
            if line is not None:
                aq = aq.where(AgentRow.business_line == line)
            agents = tuple(
                PresenceCount(business_line=bl, presence=p, agents=int(n))
                for bl, p, n in sorted(s.execute(aq).all(), key=lambda r: (r[0], r[1]))
            )
            return QueueStats(queues=queues, agents=agents)

        return self._tx.run(go)

    # ------------------------------------------------------------------ agents

    def _active_count(self, s: Session, agent_id: int) -> int:
        return int(
            s.scalar(
                select(func.count())
                .select_from(TaskRow)
                .where(TaskRow.agent_id == agent_id, TaskRow.status.in_(_ACTIVE))
            )
            or 0
        )

    def upsert_agent(self, spec: AgentSpec, now: datetime) -> tuple[Agent, bool]:
        """Create or replace an agent's profile (presence is kept); True when created."""

        def go(s: Session) -> tuple[Agent, bool]:
            row = s.get(AgentRow, spec.id, with_for_update=True, populate_existing=True)
            created = row is None
            if row is None:
                row = AgentRow(id=spec.id, presence=Presence.OFFLINE, created_at=now)
                s.add(row)
            row.name = spec.name
            row.business_line = spec.business_line
            row.cities = list(spec.cities)
            row.categories = [c.name for c in spec.categories]
            row.brands = list(spec.brands)
            row.capacity = spec.capacity
            row.updated_at = now
            s.flush()
            return _agent(row, 0 if created else self._active_count(s, spec.id)), created

        try:
            return self._tx.run(go)
        except IntegrityError as exc:  # created concurrently: now it exists, update it
            if not _is_duplicate_key(exc):
                raise
            return self._tx.run(go)

    def get_agent(self, agent_id: int) -> Agent:
        def go(s: Session) -> Agent:
            row = s.get(AgentRow, agent_id)
            if row is None:
                raise NotFound(f"agent {agent_id} not found")
            return _agent(row, self._active_count(s, agent_id))

        return self._tx.run(go)

    def set_presence(self, agent_id: int, presence: Presence, now: datetime) -> Agent:
        def go(s: Session) -> Agent:
            row = s.get(AgentRow, agent_id, with_for_update=True, populate_existing=True)
            if row is None:
                raise NotFound(f"agent {agent_id} not found")
            before = row.presence
            row.presence = presence
            row.updated_at = now
            if before is not presence:  # a real change: one BI event, same transaction
                payload = bi_events.presence_payload(
                    agent_id, row.business_line, before, presence, now
                )
                s.add(
                    BiOutboxRow(
                        schema_name=bi_events.PRESENCE_SCHEMA,
                        payload=payload,
                        created_at=now,
                        **_origin(),
                    )
                )
            return _agent(row, self._active_count(s, agent_id))

        return self._tx.run(go)

    # ------------------------------------------------------------------ customers

    def set_customer_star(self, customer_id: int, star: bool, now: datetime) -> Customer:
        """Set the flag and copy it onto the customer's open tasks (dispatch order)."""

        def go(s: Session) -> Customer:
            row = s.get(CustomerRow, customer_id, with_for_update=True, populate_existing=True)
            if row is None:
                raise NotFound(f"customer {customer_id} not found")
            row.star = star
            row.updated_at = now
            s.execute(
                update(TaskRow)
                .where(TaskRow.customer_id == customer_id, TaskRow.status.in_(_OPEN))
                .values(star=star, updated_at=now)
            )
            return _customer(row)

        return self._tx.run(go)

    # ------------------------------------------------------------------ dispatch

    def offer_next(self, agent_id: int, now: datetime, routing: RoutingConfig) -> Offer | None:
        """Reserve the best waiting task for the agent, or None (not idle, full, its line
        closed, nothing matching). NotFound when the agent does not exist."""
        found = self.dispatch(agent_id, now, routing)
        return found if isinstance(found, Offer) else None

    def dispatch(self, agent_id: int, now: datetime, routing: RoutingConfig) -> Offer | NoOffer:
        """:meth:`offer_next`, saying why nothing was offered (see :class:`NoOffer`)."""
        (result,) = self._tx.run_core(lambda c: dispatch_batch(c, [agent_id], now, routing))
        if isinstance(result, CrmError):
            raise result
        return result

    def dispatch_many(
        self,
        agent_ids: Sequence[int],
        now: datetime,
        routing: RoutingConfig,
        origins: Sequence[RequestOrigin] | None = None,
        /,
    ) -> list[DispatchResult]:
        """:meth:`dispatch` for a batch of agents in one transaction (``store/dispatching``):
        one result per request, in order (an unknown agent gets its NotFound). When the
        transaction fails as a whole, every request gets the error. ``origins``: each
        request's call, recorded with its OFFERED event (None: the current call's)."""
        if not agent_ids:
            return []
        try:
            return self._tx.run_core(lambda c: dispatch_batch(c, agent_ids, now, routing, origins))
        except CrmError as exc:
            return [exc] * len(agent_ids)

    def pending_offers(self, agent_id: int, now: datetime) -> list[Offer]:
        """The agent's open offers (ASSIGNED, deadline not passed), oldest first: a new
        offer stream pushes them again (e.g. after a reconnect)."""

        def go(s: Session) -> list[Offer]:
            rows = s.execute(
                select(TaskRow, CustomerRow)
                .join(CustomerRow, CustomerRow.id == TaskRow.customer_id)
                .where(
                    TaskRow.agent_id == agent_id,
                    TaskRow.status == Status.ASSIGNED,
                    TaskRow.offer_deadline > now,
                )
                .order_by(TaskRow.offer_deadline, TaskRow.id)
            ).all()
            offers: list[Offer] = []
            for task, customer in rows:
                assert task.offer_deadline is not None
                offers.append(Offer(_task(task), _customer(customer), task.offer_deadline))
            return offers

        return self._tx.run(go)

    def recycle_expired(self, now: datetime, limit: int = 100) -> list[Task]:
        """Offers past their deadline go back to their queue (RECYCLED, TIMED_OUT)."""

        def go(s: Session) -> list[Task]:
            rows = s.scalars(
                select(TaskRow)
                .where(TaskRow.status == Status.ASSIGNED, TaskRow.offer_deadline <= now)
                .order_by(TaskRow.offer_deadline)
                .limit(limit)
                .with_for_update(skip_locked=True)
                .execution_options(populate_existing=True)
            ).all()
            for row in rows:
                lost = row.agent_id
                self._recycle(row, now)
                _record(s, row, EventKind.TIMED_OUT, Status.ASSIGNED, now, lost, "not accepted")
            s.flush()
            return [_task(r) for r in rows]

        return self._tx.run(go)

    def expire_offer(self, task_id: int, offer_event_id: int, now: datetime) -> ExpireOutcome:
        """Recycle the task (RECYCLED, TIMED_OUT) only if it is still ASSIGNED under the
        offer recorded by the OFFERED event ``offer_event_id`` and its deadline passed.
        Idempotent: a stale or repeated call changes nothing (see :class:`ExpireOutcome`)."""

        def go(s: Session) -> ExpireOutcome:
            row = s.get(TaskRow, task_id, with_for_update=True, populate_existing=True)
            if row is None or row.status is not Status.ASSIGNED:
                return ExpireOutcome(None, early=False)
            current = s.scalar(
                select(func.max(TaskEventRow.id)).where(
                    TaskEventRow.task_id == task_id, TaskEventRow.kind == EventKind.OFFERED
                )
            )
            if current != offer_event_id:  # re-offered since (or a wrong id): not ours
                return ExpireOutcome(None, early=False)
            if row.offer_deadline is not None and row.offer_deadline > now:
                return ExpireOutcome(None, early=True)
            lost = row.agent_id
            self._recycle(row, now)
            _record(s, row, EventKind.TIMED_OUT, Status.ASSIGNED, now, lost, "not accepted")
            s.flush()
            return ExpireOutcome(_task(row), early=False)

        return self._tx.run(go)

    def find_task(self, task_id: int) -> Task | None:
        """The task, or None when the id is unknown."""

        def go(s: Session) -> Task | None:
            row = s.get(TaskRow, task_id, populate_existing=True)
            return None if row is None else _task(row)

        return self._tx.run(go)

    @staticmethod
    def _recycle(row: TaskRow, now: datetime) -> None:
        rules.check_transition(row.id, row.status, Status.RECYCLED)
        row.last_lost_agent_id = row.agent_id
        row.status = Status.RECYCLED
        row.agent_id = None
        row.offer_deadline = None
        row.recycle_count += 1
        row.updated_at = now

    # ------------------------------------------------------------------ task actions

    def _lock_task(self, s: Session, task_id: int) -> TaskRow:
        row = s.get(TaskRow, task_id, with_for_update=True, populate_existing=True)
        if row is None:
            raise NotFound(f"task {task_id} not found")
        return row

    def task_actions(self, actions: Sequence[TaskAction], /) -> list[Task | Exception]:
        """Apply a batch of task actions in one transaction; one result or error per
        action, in order, as :meth:`accept` / :meth:`complete` / :meth:`fail` one after
        the other would give. A batch failing as a whole is retried action by action."""
        if not actions:
            return []
        try:
            return self._tx.run_core(lambda c: self._task_actions(c, actions))
        except Unavailable as exc:
            return [exc] * len(actions)
        except Exception as exc:
            log.warning(
                "task action batch failed; applying its %d actions one by one",
                len(actions),
                exc_info=not isinstance(exc, CrmError),
            )
        out: list[Task | Exception] = []
        for a in actions:
            try:
                out.append(self._task_actions_one(a))
            except Exception as exc:
                out.append(exc)
        return out

    def _task_actions_one(self, a: TaskAction) -> Task:
        if a.kind is ActionKind.ACCEPT:
            return self.accept(a.task_id, a.agent_id, a.now, origin=a.origin)
        if a.kind is ActionKind.COMPLETE:
            return self.complete(a.task_id, a.agent_id, a.text, None, a.now, origin=a.origin)[0]
        return self.fail(a.task_id, a.agent_id, a.text, a.now, origin=a.origin)

    @staticmethod
    def _task_actions(c: Connection, actions: Sequence[TaskAction]) -> list[Task | Exception]:
        # Plain driver statements (RawSQL): the service's most frequent transaction.
        raw = RawSQL(c)
        ids = sorted({a.task_id for a in actions})
        current = {  # locked in id order: concurrent batches never deadlock on each other
            r[0]: task_from_json(r)
            for r in raw.json_rows(
                f"SELECT {TASK_JSON} FROM task WHERE id IN ({placeholders(len(ids), 1)}) "
                "ORDER BY id FOR UPDATE",
                ids,
            )
        }
        out: list[Task | Exception] = []
        events: list[Any] = []
        written_at = max(a.now for a in actions)  # updated_at of every changed row
        changed: dict[int, Status] = {}
        for a in actions:
            task = current.get(a.task_id)
            try:
                if task is None:
                    raise NotFound(f"task {a.task_id} not found")
                if a.kind is ActionKind.ACCEPT:
                    rules.check_offer_holder(task, a.agent_id, a.now)
                else:
                    rules.check_worker(task, a.agent_id, a.kind.value)
            except CrmError as exc:
                out.append(exc)
                continue
            after = replace(task, status=a.kind.value, offer_deadline=None, updated_at=written_at)
            current[a.task_id] = after
            changed[a.task_id] = after.status
            out.append(after)
            events += (
                task.id, _ACTION_EVENT[a.kind].value, task.status.name, after.status.name,
                a.agent_id, a.text[:500], to_db_time(a.now), *_origin(a.origin).values(),
            )  # fmt: skip
        if changed:
            by_status: dict[Status, list[int]] = {}
            for task_id, status in changed.items():
                by_status.setdefault(status, []).append(task_id)
            for status, task_ids in sorted(by_status.items()):
                raw.execute(
                    "UPDATE task SET status = %s, offer_deadline = NULL, updated_at = %s "
                    f"WHERE id IN ({placeholders(len(task_ids), 1)})",
                    [status.name, to_db_time(written_at), *sorted(task_ids)],
                )
            raw.execute(
                "INSERT INTO task_event (task_id, kind, from_status, to_status, agent_id, "
                f"reason, at, request_id, traceparent) VALUES {placeholders(len(events) // 9, 9)}",
                events,
            )
        return out

    @staticmethod
    def _locked_task(c: Connection, task_id: int) -> Task:
        """The task row, locked (FOR UPDATE), as a domain Task; NotFound when unknown."""
        row = c.execute(select(_task_t).where(_task_t.c.id == task_id).with_for_update()).first()
        if row is None:
            raise NotFound(f"task {task_id} not found")
        return _task(row)

    @staticmethod
    def _change_status(
        c: Connection,
        task: Task,
        kind: EventKind,
        to: Status,
        now: datetime,
        agent_id: int | None,
        reason: str = "",
        origin: RequestOrigin | None = None,
        **values: Any,
    ) -> Task:
        """Core hot path of a task action: UPDATE the locked row, INSERT its audit row."""
        c.execute(
            update(_task_t)
            .where(_task_t.c.id == task.id)
            .values(status=to, updated_at=now, **values)
        )
        c.execute(
            _insert_events,
            {
                "task_id": task.id,
                "kind": kind,
                "from_status": task.status,
                "to_status": to,
                "agent_id": agent_id,
                "reason": reason[:500],
                "at": now,
                **_origin(origin),
            },
        )
        return replace(task, status=to, updated_at=now, **values)

    def accept(
        self, task_id: int, agent_id: int, now: datetime, *, origin: RequestOrigin | None = None
    ) -> Task:
        def go(c: Connection) -> Task:
            task = self._locked_task(c, task_id)
            rules.check_offer_holder(task, agent_id, now)
            return self._change_status(
                c, task, EventKind.ACCEPTED, Status.IN_PROGRESS, now, agent_id,
                origin=origin, offer_deadline=None,
            )  # fmt: skip

        return self._tx.run_core(go)

    def reject(self, task_id: int, agent_id: int, reason: str, now: datetime) -> Task:
        def go(s: Session) -> Task:
            row = self._lock_task(s, task_id)
            rules.check_transition(row.id, row.status, Status.RECYCLED)
            if row.agent_id != agent_id:
                raise FailedPrecondition(
                    f"task {task_id} is not offered to agent {agent_id}", reason="NOT_TASK_AGENT"
                )
            self._recycle(row, now)
            _record(s, row, EventKind.REJECTED, Status.ASSIGNED, now, agent_id, reason)
            return _task(row)

        return self._tx.run(go)

    def complete(
        self,
        task_id: int,
        agent_id: int,
        note: str,
        revisit_at: datetime | None,
        now: datetime,
        *,
        origin: RequestOrigin | None = None,
    ) -> tuple[Task, Task | None]:
        """IN_PROGRESS -> COMPLETED; with ``revisit_at`` also a REVISIT task due then,
        reserved first for this agent."""
        if revisit_at is None:  # the common case: Core hot path

            def done(c: Connection) -> tuple[Task, Task | None]:
                task = self._locked_task(c, task_id)
                rules.check_worker(task, agent_id, Status.COMPLETED)
                completed = self._change_status(
                    c, task, EventKind.COMPLETED, Status.COMPLETED, now, agent_id, note, origin
                )
                return completed, None

            return self._tx.run_core(done)

        def go(s: Session) -> tuple[Task, Task | None]:
            customer: CustomerRow | None = None
            if revisit_at is not None:
                # Lock order customer -> task, as CreateClue does (no deadlock between a
                # clue merging into this customer's tasks and the revisit insert).
                customer_id = s.scalar(select(TaskRow.customer_id).where(TaskRow.id == task_id))
                if customer_id is None:
                    raise NotFound(f"task {task_id} not found")
                customer = s.get_one(
                    CustomerRow, customer_id, with_for_update=True, populate_existing=True
                )
            row = self._lock_task(s, task_id)
            rules.check_worker(_task(row), agent_id, Status.COMPLETED)
            row.status = Status.COMPLETED
            row.updated_at = now
            _record(s, row, EventKind.COMPLETED, Status.IN_PROGRESS, now, agent_id, note, origin)
            assert revisit_at is not None
            assert customer is not None
            revisit = TaskRow(
                business_line=row.business_line,
                category=Category.REVISIT,
                status=Status.UNASSIGNED,
                customer_id=row.customer_id,
                city=row.city,
                priority=row.priority,
                star=customer.star,
                preferred_agent_id=agent_id,
                parent_task_id=row.id,
                brands=list(row.brands or ()),
                created_at=now,
                due_at=revisit_at,
                recycle_count=0,
                clue_count=0,
                updated_at=now,
            )
            s.add(revisit)
            s.flush()
            _record(
                s, revisit, EventKind.REVISIT_SCHEDULED, None, now, agent_id,
                f"revisit of task {row.id}", origin,
            )  # fmt: skip
            return _task(row), _task(revisit)

        return self._tx.run(go)

    def fail(
        self,
        task_id: int,
        agent_id: int,
        reason: str,
        now: datetime,
        *,
        origin: RequestOrigin | None = None,
    ) -> Task:
        def go(c: Connection) -> Task:
            task = self._locked_task(c, task_id)
            rules.check_worker(task, agent_id, Status.FAILED)
            return self._change_status(
                c, task, EventKind.FAILED, Status.FAILED, now, agent_id, reason, origin
            )

        return self._tx.run_core(go)

    def cancel(self, task_id: int, reason: str, now: datetime) -> Task:
        def go(s: Session) -> Task:
            row = self._lock_task(s, task_id)
            before = row.status
            rules.check_transition(row.id, before, Status.CANCELLED)
            row.status = Status.CANCELLED
            row.offer_deadline = None
            row.updated_at = now
            _record(s, row, EventKind.CANCELLED, before, now, row.agent_id, reason)
            return _task(row)

        return self._tx.run(go)

    # ------------------------------------------------------------------ call records

    def record_call(self, new: NewCall, now: datetime, host: str, request_id: str) -> CallResult:
        """Record a call (and its FactCallRecord outbox row) for the agent holding the task
        IN_PROGRESS; a retry with the same call id and request gets the first record."""
        try:
            return self._tx.run(lambda s: self._record_call(s, new, now, host, request_id))
        except IntegrityError as exc:
            # A concurrent request with the same call id committed first: re-read it.
            if not _is_duplicate_key(exc):
                raise
            return self._tx.run(lambda s: self._record_call(s, new, now, host, request_id))

    def _record_call(
        self, s: Session, new: NewCall, now: datetime, host: str, request_id: str
    ) -> CallResult:
        found = s.scalars(
            select(CallRecordRow).where(CallRecordRow.call_id == new.call_id)
        ).one_or_none()
        if found is not None:
            if found.request_hash != new.request_hash:
                raise AlreadyExists(
                    f"call id {new.call_id!r} was already recorded for another call",
                    reason="CALL_ID_REUSED",
                )
            return CallResult(_call(found), replayed=True)
        task = self._lock_task(s, new.task_id)
        if s.get(AgentRow, new.agent_id) is None:
            raise NotFound(f"agent {new.agent_id} not found")
        rules.check_call_recorder(_task(task), new.agent_id)
        held_since = s.scalar(
            select(func.max(TaskEventRow.at)).where(
                TaskEventRow.task_id == new.task_id,
                TaskEventRow.agent_id == new.agent_id,
                TaskEventRow.kind == EventKind.OFFERED,
            )
        )
        rules.check_call_start(new.started_at, held_since)
        customer = s.get_one(CustomerRow, task.customer_id)
        row = CallRecordRow(
            call_id=new.call_id,
            request_hash=new.request_hash,
            task_id=new.task_id,
            agent_id=new.agent_id,
            call_type=new.call_type,
            provider=new.provider,
            outcome=new.outcome,
            started_at=new.started_at,
            duration_s=new.duration_s,
            note=new.note,
            created_at=now,
        )
        s.add(row)
        s.flush()  # raises IntegrityError on a concurrent duplicate call id
        call = _call(row)
        payload = bi_events.call_record_payload(
            call,
            business_line=task.business_line,
            masked_phone=customer.phone_masked,
            host=host,
            request_id=request_id,
        )
        s.add(
            BiOutboxRow(
                schema_name=bi_events.CALL_RECORD_SCHEMA,
                payload=payload,
                created_at=now,
                **_origin(),
            )
        )
        return CallResult(call)

    # ------------------------------------------------------------------ BI outbox

    def unpublished_events(self, limit: int) -> list[OutboxEvent]:
        """Up to ``limit`` task events not yet published (nor rejected), in id order.

        Per task, id order is commit order (events of a task are written under its row
        lock), so each task's events go out in the order they happened. A lower id that
        commits late is simply picked up by a later call: nothing is skipped."""

        def go(c: Connection) -> list[OutboxEvent]:
            rows = c.execute(
                select(
                    _event_t.c.id,
                    _event_t.c.task_id,
                    _task_t.c.business_line,
                    _task_t.c.category,
                    _event_t.c.kind,
                    _event_t.c.from_status,
                    _event_t.c.to_status,
                    _event_t.c.agent_id,
                    _event_t.c.at,
                    _event_t.c.request_id,
                    _event_t.c.traceparent,
                )
                .join(_task_t, _task_t.c.id == _event_t.c.task_id)
                .where(_event_t.c.published_at.is_(None), _event_t.c.publish_error.is_(None))
                .order_by(_event_t.c.id)
                .limit(limit)
            ).all()
            return [
                OutboxEvent(
                    id=r.id,
                    task_id=r.task_id,
                    business_line=r.business_line,
                    category=r.category,
                    kind=r.kind,
                    from_status=r.from_status,
                    to_status=r.to_status,
                    agent_id=r.agent_id,
                    at=r.at,
                    request_id=r.request_id,
                    traceparent=r.traceparent,
                )
                for r in rows
            ]

        return self._tx.run_core(go)

    def mark_published(self, event_ids: Sequence[int], now: datetime) -> int:
        """Record that bilog acknowledged these events; returns the rows changed."""
        if not event_ids:
            return 0

        def go(c: Connection) -> int:
            result = c.execute(
                update(_event_t)
                .where(_event_t.c.id.in_(list(event_ids)), _event_t.c.published_at.is_(None))
                .values(published_at=now)
            )
            return int(result.rowcount)

        return self._tx.run_core(go)

    def mark_rejected(self, errors: dict[int, str]) -> None:
        """Record why bilog rejected these events (they stay unpublished and are skipped
        until ``publish_error`` is cleared, e.g. after a schema fix)."""
        if not errors:
            return

        def go(c: Connection) -> None:
            for event_id, error in errors.items():
                c.execute(
                    update(_event_t)
                    .where(_event_t.c.id == event_id, _event_t.c.published_at.is_(None))
                    .values(publish_error=(error or "rejected")[:500])
                )

        self._tx.run_core(go)

    def unpublished_bi_events(self, limit: int) -> list[BiOutboxEvent]:
        """Up to ``limit`` bi_outbox rows (call records, presence changes) not yet
        published nor rejected, in id order."""

        def go(c: Connection) -> list[BiOutboxEvent]:
            rows = c.execute(
                select(
                    _bi_t.c.id,
                    _bi_t.c.schema_name,
                    _bi_t.c.payload,
                    _bi_t.c.request_id,
                    _bi_t.c.traceparent,
                )
                .where(_bi_t.c.published_at.is_(None), _bi_t.c.publish_error.is_(None))
                .order_by(_bi_t.c.id)
                .limit(limit)
            ).all()
            return [
                BiOutboxEvent(r.id, r.schema_name, r.payload, r.request_id, r.traceparent)
                for r in rows
            ]

        return self._tx.run_core(go)

    def mark_bi_published(self, ids: Sequence[int], now: datetime) -> int:
        """Record that bilog acknowledged these bi_outbox rows; returns the rows changed."""
        if not ids:
            return 0

        def go(c: Connection) -> int:
            result = c.execute(
                update(_bi_t)
                .where(_bi_t.c.id.in_(list(ids)), _bi_t.c.published_at.is_(None))
                .values(published_at=now)
            )
            return int(result.rowcount)

        return self._tx.run_core(go)

    def mark_bi_rejected(self, errors: dict[int, str]) -> None:
        """Record why bilog rejected these bi_outbox rows (skipped until cleared)."""
        if not errors:
            return

        def go(c: Connection) -> None:
            for row_id, error in errors.items():
                c.execute(
                    update(_bi_t)
                    .where(_bi_t.c.id == row_id, _bi_t.c.published_at.is_(None))
                    .values(publish_error=(error or "rejected")[:500])
                )

        self._tx.run_core(go)

    def outbox_backlog(self) -> OutboxBacklog:
        """How many events wait for the BI log (task events and bi_outbox rows) and since
        when (for the lag gauges)."""

        def go(c: Connection) -> OutboxBacklog:
            waiting = and_(_event_t.c.published_at.is_(None), _event_t.c.publish_error.is_(None))
            pending = c.scalar(select(func.count()).select_from(_event_t).where(waiting))
            oldest = c.execute(
                select(_event_t.c.at).where(waiting).order_by(_event_t.c.id).limit(1)
            ).scalar()
            bi_waiting = and_(_bi_t.c.published_at.is_(None), _bi_t.c.publish_error.is_(None))
            bi_pending = c.scalar(select(func.count()).select_from(_bi_t).where(bi_waiting))
            bi_oldest = c.execute(
                select(_bi_t.c.created_at).where(bi_waiting).order_by(_bi_t.c.id).limit(1)
            ).scalar()
            times = [t for t in (oldest, bi_oldest) if t is not None]
            return OutboxBacklog(
                pending=int(pending or 0) + int(bi_pending or 0),
                oldest_at=min(times) if times else None,
            )

        return self._tx.run_core(go)

    def list_agents(
        self, f: AgentFilter, page_size: int, after_id: int | None
    ) -> tuple[list[Agent], bool]:
        """One page of agents (by id ascending) with their active task counts, and whether
        more follow. Two queries: the page, then the counts of its agents."""

        def go(s: Session) -> tuple[list[Agent], bool]:
            q = select(AgentRow)
            if f.business_line is not None:
                q = q.where(AgentRow.business_line == f.business_line)
            if f.presences:
                q = q.where(AgentRow.presence.in_(f.presences))
            if after_id is not None:
                q = q.where(AgentRow.id > after_id)
            rows = s.scalars(q.order_by(AgentRow.id).limit(page_size + 1)).all()
            page = rows[:page_size]
            active: dict[int, int] = {}
            if page:
                counted = s.execute(
                    select(TaskRow.agent_id, func.count())
                    .where(
                        TaskRow.agent_id.in_([r.id for r in page]),
                        TaskRow.status.in_(_ACTIVE),
                    )
                    .group_by(TaskRow.agent_id)
                )
                active = {int(agent): int(n) for agent, n in counted}
            return [_agent(r, active.get(r.id, 0)) for r in page], len(rows) > page_size

        return self._tx.run(go)
