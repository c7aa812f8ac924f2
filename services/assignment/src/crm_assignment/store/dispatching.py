"""Batched dispatch: one transaction offers tasks to every agent asking at once.

Every open offer stream asks for an offer when it is woken (a task entered its line, its
agent freed capacity, ...). Asked one transaction per stream, concurrent streams of a
line rank the same candidates and race for them one ``SKIP LOCKED`` statement at a time:
most of the work was lost races. :func:`dispatch_batch` serves a batch of agents (the
requests queued while the previous batch ran, see ``api/dispatch_batcher.py``) in one
transaction, with a fixed number of statements however many agents ask:

1. lock the agents' rows (id order; presence and capacity are checked under that lock)
   and count their active tasks;
2. per business line, read the waiting candidates once (no locks): the line's first
   ``candidate_limit + agents - 1`` tasks in priority, star, due time order (an agent
   with skills finding none of its tasks among them while more wait reads its own
   filtered candidates, as a single dispatcher did);
3. match agents to tasks in the pure domain (``dispatch.match``: each agent, longest
   waiting first, takes its best-ranked task of those left);
4. lock the matched tasks by primary key with ``FOR UPDATE SKIP LOCKED`` (reading their
   customers' masked phone on the way, unlocked), re-checking that they still wait: a
   task another dispatcher holds or took meanwhile is skipped, and the agents are
   matched again without it (candidates read again when tasks were lost and an agent
   is left without one), until every matched task is held;
5. one UPDATE of the offered tasks, one multi-row INSERT of the OFFERED audit rows
   (RETURNING their ids: they name the offers' timeouts).

The statements are plain driver SQL (``crm_common.db.RawSQL``): SQLAlchemy's work per
statement cost more than the statements themselves on this path.

Lock order is the one of the whole store (agent -> task); the task locks never wait
(SKIP LOCKED), so batches of replicas and single dispatches never deadlock.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, cast

from crm_common.db import RawSQL, from_json_time, placeholders, to_db_time
from crm_common.errors import CrmError, NotFound
from crm_common.tracing import RequestOrigin, request_origin
from sqlalchemy import Connection

from crm_assignment.config import LineConfig, RoutingConfig
from crm_assignment.domain import dispatch, rules
from crm_assignment.domain.model import (
    ACTIVE_STATUSES,
    WAITING_STATUSES,
    BusinessLine,
    Category,
    Customer,
    EventKind,
    Offer,
    Presence,
    Status,
    Task,
)
from crm_assignment.store.rows import TASK_JSON, NoOffer, task_from_json
from crm_assignment.store.schema import line_from_db, line_to_db

__all__ = ["DispatchResult", "dispatch_batch"]

DispatchResult = Offer | NoOffer | CrmError
"""What one agent of a batch gets: an offer, why nothing, or its own error (NOT_FOUND)."""

_READS = 3
"""Candidate reads per line and batch: a read whose candidates were all taken by other
dispatchers meanwhile is followed by another, so tasks past the first candidates are not
left waiting for the next poll."""
_LOCK_ROUNDS = 16
"""Match-and-lock rounds per line and batch (each loses only to concurrent dispatchers)."""

_WAITING_NAMES = tuple(s.name for s in sorted(WAITING_STATUSES))
_WAITING_SQL = ", ".join(f"'{name}'" for name in _WAITING_NAMES)
_ACTIVE_SQL = ", ".join(f"'{s.name}'" for s in sorted(ACTIVE_STATUSES))
_CANDIDATE_SELECT = (
    "SELECT JSON_ARRAY(id, priority, star, due_at, JSON_QUERY(brands, '$'), "
    "preferred_agent_id, last_lost_agent_id, category, city) FROM task"
)
_QUEUE_ORDER = "ORDER BY priority DESC, star DESC, due_at, id"


def _lock_tasks(n: int) -> str:
    """Lock ``n`` matched tasks by id, if they still wait and nobody holds them; with the
    customer's masked phone and star (a plain subquery: customers are not locked)."""
    return (
        f"SELECT {TASK_JSON}, JSON_ARRAY("
        "(SELECT phone_masked FROM customer WHERE customer.id = task.customer_id), "
        "(SELECT star FROM customer WHERE customer.id = task.customer_id)) "
        f"FROM task WHERE id IN ({placeholders(n, 1)}) AND status IN ({_WAITING_SQL}) "
        "AND due_at <= %s FOR UPDATE SKIP LOCKED"
    )


def _waiting(
    raw: RawSQL, where: str, params: Sequence[Any], limit: int
) -> list[dispatch.Candidate]:
    """The first ``limit`` waiting tasks (``where`` and ``params``: one line's, due, maybe
    more filters) in queue order.

    One read per waiting status, each a walk of ``ix_task_queue`` (business_line, status,
    priority DESC, star DESC, due_at, id) in queue order that stops after ``limit`` rows,
    merged here. A single ``status IN (...)`` read cannot walk one index in that order:
    MariaDB sorted the line's whole backlog on every read (21.7 ms a read with 18,000
    tasks waiting on one line, against 0.84 ms this way)."""
    sql = " UNION ALL ".join(
        f"({_CANDIDATE_SELECT} WHERE status = '{status}' AND {where} {_QUEUE_ORDER} LIMIT %s)"
        for status in _WAITING_NAMES
    )
    rows = raw.json_rows(sql, [*params, limit] * len(_WAITING_NAMES))
    return _in_queue_order([_candidate(r) for r in rows])[:limit]


@dataclass(frozen=True, slots=True)
class _Agent:
    """An agent's row, locked."""

    business_line: BusinessLine
    presence: Presence
    capacity: int
    cities: tuple[str, ...]
    categories: tuple[str, ...]
    brands: tuple[str, ...]


@dataclass(slots=True)
class _Ask:
    """One request of the batch that may get a task."""

    index: int
    seeker: dispatch.Seeker
    capacity: int
    filtered: bool
    """The agent has skills (cities, categories): its tasks may lie past the line read."""


@dataclass(slots=True)
class _Made:
    """An offer decided in this transaction, before its rows are written."""

    index: int
    task: Task
    customer: Customer
    before: Status
    points: float
    agent_full: bool


def _candidate(r: list[Any]) -> dispatch.Candidate:
    return dispatch.Candidate(
        r[0], r[1], bool(r[2]), from_json_time(r[3]), tuple(r[4] or ()), r[5], r[6],
        Category[r[7]], r[8],
    )  # fmt: skip


def dispatch_batch(
    c: Connection,
    agent_ids: Sequence[int],
    now: datetime,
    routing: RoutingConfig,
    origins: Sequence[RequestOrigin] | None = None,
) -> list[DispatchResult]:
    """Offer a task to each agent of ``agent_ids`` that can take one (see module doc);
    one result per request, in order. An agent asking twice in a batch is served twice
    (capacity permitting), as two transactions one after the other would. ``origins``:
    each request's call (request id, trace context), recorded with its OFFERED event;
    None: the current call's."""
    raw = RawSQL(c)
    out: list[DispatchResult | None] = [None] * len(agent_ids)
    ids = sorted(set(agent_ids))
    agents = {
        r[0]: _Agent(
            line_from_db(r[1]),
            Presence[r[2]],
            r[3],
            tuple(r[4] or ()),
            tuple(r[5] or ()),
            tuple(r[6] or ()),
        )
        for r in raw.json_rows(
            "SELECT JSON_ARRAY(id, business_line, presence, capacity, JSON_QUERY(cities, '$'), "
            "JSON_QUERY(categories, '$'), JSON_QUERY(brands, '$')) "
            f"FROM agent WHERE id IN ({placeholders(len(ids), 1)}) ORDER BY id FOR UPDATE",
            ids,
        )
    }
    available = [
        agent_id
        for agent_id, a in agents.items()
        if a.presence is Presence.IDLE and routing.is_open(a.business_line)
    ]
    active: dict[int, int] = {}
    if available:
        active = {
            r[0]: int(r[1])
            for r in raw.rows(
                "SELECT agent_id, COUNT(*) FROM task "
                f"WHERE agent_id IN ({placeholders(len(available), 1)}) "
                f"AND status IN ({_ACTIVE_SQL}) GROUP BY agent_id",
                available,
            )
        }
    asks: dict[BusinessLine, list[_Ask]] = {}
    for i, agent_id in enumerate(agent_ids):
        a = agents.get(agent_id)
        if a is None:
            out[i] = NotFound(f"agent {agent_id} not found")
            continue
        if a.presence is not Presence.IDLE or not routing.is_open(a.business_line):
            out[i] = NoOffer.UNAVAILABLE  # not available, or its line is closed (config.py)
            continue
        held = active.get(agent_id, 0) + sum(
            1 for ask in asks.get(a.business_line, ()) if ask.seeker.agent_id == agent_id
        )
        if held >= a.capacity:
            out[i] = NoOffer.UNAVAILABLE
            continue
        seeker = dispatch.Seeker(
            agent_id,
            brands=a.brands,
            cities=a.cities,
            categories=tuple(Category[x] for x in a.categories),
        )
        filtered = bool(seeker.cities or seeker.categories)
        asks.setdefault(a.business_line, []).append(_Ask(i, seeker, a.capacity, filtered))
    made: list[_Made] = []
    for line, line_asks in asks.items():
        _serve_line(raw, line, line_asks, now, routing, active, made, out)
    if made:
        _write_offers(raw, made, now, out, origins)
    assert all(r is not None for r in out)
    return cast(list[DispatchResult], out)


def _serve_line(
    raw: RawSQL,
    line: BusinessLine,
    asks: list[_Ask],
    now: datetime,
    routing: RoutingConfig,
    active: dict[int, int],
    made: list[_Made],
    out: list[DispatchResult | None],
) -> None:
    """Match and lock tasks of one line for its asks (appends to ``made``, fills ``out``
    for the asks left without a task).

    The match is always made for every ask, in asking order, over the candidates not
    lost to other dispatchers; the tasks it picks that this transaction does not hold
    yet are locked, and a task lost meanwhile means matching again (an earlier ask may
    then take a task a later one was given: the tasks this transaction holds are its
    own to hand out). It ends when every picked task is held: the outcome is the one of
    the asks served one after the other among the tasks they could lock."""
    cfg = routing.line(line)
    window = cfg.revisit_same_agent_window_s
    seekers = [a.seeker for a in asks]
    lost: set[int] = set()  # held or taken by other dispatchers meanwhile
    held: dict[int, tuple[Task, Customer]] = {}  # locked by this transaction
    pool: dict[int, dispatch.Candidate] = {}
    own_read: set[int] = set()  # asks that read their own candidates
    choice: list[dispatch.Candidate | None] = [None] * len(asks)
    reads = 0
    full = False
    read_again = True  # the first read
    for _ in range(_LOCK_ROUNDS):
        if read_again:
            if reads == _READS:
                break
            reads += 1
            limit = cfg.candidate_limit + len(asks) - 1 + len(lost)
            found = _waiting(
                raw, "business_line = %s AND due_at <= %s", (line_to_db(line), to_db_time(now)),
                limit,
            )  # fmt: skip
            full = len(found) >= limit
            pool = {c.id: c for c in found} | {i: pool[i] for i in held}
            own_read.clear()
            read_again = False
        choice = dispatch.match(
            seekers, _queue_order(pool, lost), now, cfg.weights, window, cfg.candidate_limit
        )
        if full and _read_own(raw, asks, choice, own_read, pool, line, now, cfg, lost):
            choice = dispatch.match(
                seekers, _queue_order(pool, lost), now, cfg.weights, window,
                cfg.candidate_limit,
            )  # fmt: skip
        wanted = sorted({c.id for c in choice if c is not None and c.id not in held})
        if not wanted:  # every task picked is held
            if lost and None in choice and reads < _READS:
                read_again = True  # tasks were lost since the read: more may wait past it
                continue
            break
        params = [*wanted, to_db_time(now)]
        for task_text, customer_text in raw.rows(_lock_tasks(len(wanted)), params):
            task = task_from_json(json.loads(task_text))
            masked, star = json.loads(customer_text)
            held[task.id] = (task, Customer(task.customer_id, masked, bool(star)))
        lost.update(i for i in wanted if i not in held)  # skipped: another dispatcher's
    given: set[int] = set()
    for ask, chosen in zip(asks, choice, strict=True):
        if chosen is None or chosen.id not in held:  # nothing, or out of rounds
            continue
        row, customer = held[chosen.id]
        given.add(row.id)
        agent_id = ask.seeker.agent_id
        before = row.status
        rules.check_transition(row.id, before, Status.ASSIGNED)
        task = replace(
            row,
            status=Status.ASSIGNED,
            agent_id=agent_id,
            offer_deadline=now + timedelta(seconds=cfg.accept_timeout_s),
            updated_at=now,
        )
        points = dispatch.score(
            dispatch.Candidate.of(task), agent_id, ask.seeker.brands, now, cfg.weights
        )
        active[agent_id] = count = active.get(agent_id, 0) + 1
        made.append(_Made(ask.index, task, customer, before, points, count >= ask.capacity))
    for ask, chosen in zip(asks, choice, strict=True):
        if chosen is None or chosen.id not in given:
            out[ask.index] = _why_nothing(ask, pool, given, lost, now, window)


def _read_own(
    raw: RawSQL,
    asks: list[_Ask],
    choice: list[dispatch.Candidate | None],
    own_read: set[int],
    pool: dict[int, dispatch.Candidate],
    line: BusinessLine,
    now: datetime,
    cfg: LineConfig,
    lost: set[int],
) -> bool:
    """The line read was cut at its limit: an agent with skills that found nothing in it
    reads its own candidates (once per line read) into ``pool``; True if any were new."""
    extra = False
    for i, (ask, chosen) in enumerate(zip(asks, choice, strict=True)):
        if chosen is None and ask.filtered and i not in own_read:
            own_read.add(i)
            for cand in _own_candidates(raw, ask.seeker, line, now, cfg, len(asks) + len(lost)):
                extra = extra or cand.id not in pool
                pool.setdefault(cand.id, cand)
    return extra


def _queue_order(pool: dict[int, dispatch.Candidate], lost: set[int]) -> list[dispatch.Candidate]:
    """The candidates not lost, in queue order."""
    return _in_queue_order([x for x in pool.values() if x.id not in lost])


def _in_queue_order(candidates: list[dispatch.Candidate]) -> list[dispatch.Candidate]:
    """``candidates`` sorted in queue order (priority, star, due time, id: _QUEUE_ORDER)."""
    candidates.sort(key=lambda x: (-x.priority, -int(x.star), x.due_at, x.id))
    return candidates


def _own_candidates(
    raw: RawSQL,
    seeker: dispatch.Seeker,
    line: BusinessLine,
    now: datetime,
    cfg: LineConfig,
    more: int,
) -> list[dispatch.Candidate]:
    """The agent's own candidates (its skills and the revisit reservation in SQL)."""
    where = (
        "business_line = %s AND due_at <= %s AND (preferred_agent_id IS NULL "
        "OR preferred_agent_id = %s OR due_at <= %s)"
    )
    params: list[Any] = [
        line_to_db(line),
        to_db_time(now),
        seeker.agent_id,
        to_db_time(now - timedelta(seconds=cfg.revisit_same_agent_window_s)),
    ]
    if seeker.categories:
        where += f" AND category IN ({placeholders(len(seeker.categories), 1)})"
        params += [x.name for x in seeker.categories]
    if seeker.cities:
        where += f" AND city IN ({placeholders(len(seeker.cities), 1)})"
        params += seeker.cities
    return _waiting(raw, where, params, cfg.candidate_limit + more)


def _why_nothing(
    ask: _Ask,
    pool: dict[int, dispatch.Candidate],
    given: set[int],
    lost: set[int],
    now: datetime,
    window: int,
) -> NoOffer:
    free = [x for x in pool.values() if x.id not in given and x.id not in lost]
    if any(dispatch.eligible(x, ask.seeker, now, window) for x in free):
        return NoOffer.CONTENDED  # out of rounds: concurrent dispatchers kept winning
    if free:
        return NoOffer.NOTHING_MATCHING
    if lost:
        return NoOffer.CONTENDED
    return NoOffer.LINE_EMPTY


def _write_offers(
    raw: RawSQL,
    made: list[_Made],
    now: datetime,
    out: list[DispatchResult | None],
    origins: Sequence[RequestOrigin] | None,
) -> None:
    ids = [m.task.id for m in made]
    agents: list[Any] = []
    deadlines: list[Any] = []
    events: list[Any] = []
    for m in made:
        deadline = m.task.offer_deadline
        assert deadline is not None
        agents += (m.task.id, m.task.agent_id)
        deadlines += (m.task.id, to_db_time(deadline))
        origin = origins[m.index] if origins is not None else request_origin()
        events += (
            m.task.id, EventKind.OFFERED.value, m.before.name, Status.ASSIGNED.name,
            m.task.agent_id, f"score {m.points:.1f}", to_db_time(now),
            origin.request_id, origin.traceparent,
        )  # fmt: skip
    cases = " ".join(["WHEN %s THEN %s"] * len(made))
    raw.execute(
        f"UPDATE task SET status = %s, agent_id = CASE id {cases} END, "
        f"offer_deadline = CASE id {cases} END, updated_at = %s "
        f"WHERE id IN ({placeholders(len(ids), 1)})",
        [Status.ASSIGNED.name, *agents, *deadlines, to_db_time(now), *ids],
    )
    event_ids = {
        r[1]: int(r[0])
        for r in raw.rows(
            "INSERT INTO task_event (task_id, kind, from_status, to_status, agent_id, reason, "
            f"at, request_id, traceparent) VALUES {placeholders(len(made), 9)} "
            "RETURNING id, task_id",
            events,
        )
    }
    for m in made:
        deadline = m.task.offer_deadline
        assert deadline is not None
        out[m.index] = Offer(
            task=m.task,
            customer=m.customer,
            deadline=deadline,
            agent_full=m.agent_full,
            offer_event_id=event_ids[m.task.id],
        )
