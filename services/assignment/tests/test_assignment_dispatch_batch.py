"""Batched dispatch (``AssignmentStore.dispatch_many``, ``store/dispatching``) against
MariaDB: one transaction serving several agents gives each its own task in asking order,
keeps capacity, skills and errors per agent, skips tasks other dispatchers hold, writes
one OFFERED audit row per offer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from assignment_testlib import new_clue
from crm_assignment.config import LineConfig, RoutingConfig
from crm_assignment.domain.model import (
    AgentSpec,
    BusinessLine,
    Category,
    Offer,
    Presence,
    Status,
)
from crm_assignment.store import AssignmentStore, NoOffer
from crm_assignment.store.dispatching import _waiting
from crm_assignment.store.schema import TaskEventRow, TaskRow, line_to_db
from crm_common.db import RawSQL, to_db_time
from crm_common.errors import NotFound
from sqlalchemy import Connection, Engine, select, text

NOW = datetime.now(UTC).replace(microsecond=0)
ROUTING = RoutingConfig.from_values({"SALE": LineConfig(candidate_limit=3)}, 1)


def _clue(store: AssignmentStore, n: int, *, priority: int = 5, city: str = "beijing") -> int:
    result = store.create_clue(
        new_clue(f"k{n}", f"1380000{n:04d}", f"h{n}", priority=priority, city=city),
        NOW - timedelta(seconds=100 - n),  # older clues first
        LineConfig(),
    )
    return result.task.id


def _agent(
    store: AssignmentStore, agent_id: int, *, capacity: int = 1, cities: tuple[str, ...] = ()
) -> None:
    spec = AgentSpec(
        id=agent_id,
        name=f"a{agent_id}",
        business_line=BusinessLine.SALE,
        cities=cities,
        capacity=capacity,
    )
    store.upsert_agent(spec, NOW)
    store.set_presence(agent_id, Presence.IDLE, NOW)


def _offered(engine: Engine) -> list[tuple[int, int | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(TaskEventRow.task_id, TaskEventRow.agent_id)
            .where(TaskEventRow.kind == "OFFERED")
            .order_by(TaskEventRow.id)
        ).all()
    return [(r[0], r[1]) for r in rows]


def test_a_batch_serves_agents_in_asking_order(store: AssignmentStore, engine: Engine) -> None:
    tasks = [_clue(store, n, priority=p) for n, p in enumerate([3, 9, 5, 7])]
    for agent_id in (1, 2, 3):
        _agent(store, agent_id)
    out = store.dispatch_many([3, 1, 2], NOW, ROUTING)
    assert all(isinstance(o, Offer) for o in out)
    offers = [o for o in out if isinstance(o, Offer)]
    # agent 3 asked first: the best task (priority 9), then 7, then 5
    assert [o.task.id for o in offers] == [tasks[1], tasks[3], tasks[2]]
    assert [o.task.agent_id for o in offers] == [3, 1, 2]
    for o in offers:
        assert o.task.status is Status.ASSIGNED
        assert o.deadline == NOW + timedelta(seconds=30)
        assert o.agent_full
        assert o.customer.masked_phone.startswith("138")
    assert _offered(engine) == [(o.task.id, o.task.agent_id) for o in offers]
    with engine.connect() as conn:
        events = dict(
            conn.execute(
                select(TaskEventRow.task_id, TaskEventRow.id).where(TaskEventRow.kind == "OFFERED")
            ).all()
        )
        assigned = dict(
            conn.execute(
                select(TaskRow.id, TaskRow.agent_id).where(TaskRow.status == Status.ASSIGNED)
            ).all()
        )
    assert {o.task.id: o.offer_event_id for o in offers} == events
    assert assigned == {o.task.id: o.task.agent_id for o in offers}
    # full agents get nothing more; the last task waits for someone else
    assert store.dispatch_many([1, 2, 3], NOW, ROUTING) == [NoOffer.UNAVAILABLE] * 3


def test_each_request_gets_its_own_outcome(store: AssignmentStore) -> None:
    _clue(store, 1)
    _clue(store, 2)
    _agent(store, 1, capacity=2)
    _agent(store, 2)
    store.set_presence(2, Presence.BREAK, NOW)
    out = store.dispatch_many([1, 99, 2, 1, 1], NOW, ROUTING)
    assert isinstance(out[0], Offer)
    assert isinstance(out[1], NotFound)  # unknown agent: its own error
    assert out[2] is NoOffer.UNAVAILABLE  # not IDLE
    assert isinstance(out[3], Offer)  # asked twice: served twice, capacity 2
    assert out[4] is NoOffer.UNAVAILABLE  # a third time: full
    assert out[0].task.id != out[3].task.id
    assert not out[0].agent_full
    assert out[3].agent_full
    assert store.dispatch_many([1], NOW, ROUTING) == [NoOffer.UNAVAILABLE]


def test_why_nothing_was_offered(store: AssignmentStore) -> None:
    _agent(store, 1, cities=("shanghai",))
    assert store.dispatch_many([1], NOW, ROUTING) == [NoOffer.LINE_EMPTY]
    _clue(store, 1, city="beijing")
    assert store.dispatch_many([1], NOW, ROUTING) == [NoOffer.NOTHING_MATCHING]
    closed = RoutingConfig.from_values({"SALE": LineConfig(enabled=False)}, 2)
    assert store.dispatch_many([1], NOW, closed) == [NoOffer.UNAVAILABLE]


def test_an_agent_with_skills_finds_its_task_past_the_line_read(
    store: AssignmentStore,
) -> None:
    """The line read holds candidate_limit + agents - 1 tasks (3 here, one agent): the
    Shanghai agent's task is fifth in queue order, so it reads its own candidates."""
    for n in range(4):
        _clue(store, n, priority=9)  # Beijing, ahead in the queue
    theirs = _clue(store, 10, priority=1, city="shanghai")
    _agent(store, 1, cities=("shanghai",))
    (offer,) = store.dispatch_many([1], NOW, ROUTING)
    assert isinstance(offer, Offer)
    assert offer.task.id == theirs


def test_a_task_another_dispatcher_holds_is_skipped(store: AssignmentStore, engine: Engine) -> None:
    best = _clue(store, 1, priority=9)
    second = _clue(store, 2, priority=5)
    _agent(store, 1)
    _agent(store, 2)
    holder = engine.connect()
    holder.begin()
    holder.execute(text("SELECT id FROM task WHERE id = :id FOR UPDATE"), {"id": best})
    try:  # another replica is offering the best task right now
        out = store.dispatch_many([1, 2], NOW, ROUTING)
    finally:
        holder.rollback()
        holder.close()
    assert isinstance(out[0], Offer)
    assert out[0].task.id == second
    assert out[1] is NoOffer.CONTENDED  # the only task left for it is held elsewhere
    (again,) = store.dispatch_many([2], NOW, ROUTING)  # released: now it is free
    assert isinstance(again, Offer)
    assert again.task.id == best


def test_a_revisit_stays_with_its_agent_in_a_batch(store: AssignmentStore) -> None:
    task_id = _clue(store, 1)
    _agent(store, 1)
    _agent(store, 2)
    (offer,) = store.dispatch_many([1], NOW, ROUTING)
    assert isinstance(offer, Offer)
    store.accept(task_id, 1, NOW)
    _, revisit = store.complete(task_id, 1, "", NOW + timedelta(seconds=1), NOW)
    assert revisit is not None
    assert revisit.category is Category.REVISIT
    later = NOW + timedelta(seconds=2)
    # agent 2 asks first, but the revisit is reserved for agent 1 (its window: 300 s)
    assert store.dispatch_many([2], later, ROUTING) == [NoOffer.NOTHING_MATCHING]
    out = store.dispatch_many([2, 1], later, ROUTING)
    assert out[0] is NoOffer.LINE_EMPTY  # once agent 1 has it, nothing waits any more
    assert isinstance(out[1], Offer)
    assert out[1].task.id == revisit.id


def _session_counters(conn: Connection) -> dict[str, int]:
    rows = conn.exec_driver_sql(
        "SHOW SESSION STATUS WHERE Variable_name IN ('Handler_read_next', 'Handler_read_prev', "
        "'Handler_read_rnd_next')"
    ).all()
    return {name: int(value) for name, value in rows}


def test_the_candidate_read_walks_the_queue_index_not_the_backlog(
    store: AssignmentStore, engine: Engine
) -> None:
    """A dispatch read costs its limit, not the line's backlog: with 3,000 tasks waiting
    on the line (in both waiting statuses), the candidate read walks a few index entries
    per status. Counted in MariaDB's session counters, not timed: the single read that
    ordered ``status IN (...)`` (before ix_task_queue) walked all 3,000 entries of the
    line to sort them, on every dispatch (Handler_read_next 3000 here)."""
    backlog = 3000
    requests = [
        (
            new_clue(f"backlog{n}", f"1390000{n:04d}", f"hb{n}", priority=n % 10),
            NOW - timedelta(seconds=backlog - n),
            LineConfig(),
        )
        for n in range(backlog)
    ]
    for start in range(0, backlog, 500):
        assert all(
            not isinstance(r, Exception) for r in store.create_clues(requests[start : start + 500])
        )
    with engine.begin() as conn:  # a third of them back in the queue after a reject
        conn.exec_driver_sql("UPDATE task SET status = 'RECYCLED' WHERE MOD(id, 3) = 0")
        conn.exec_driver_sql("ANALYZE TABLE task")
    limit = 20
    with engine.begin() as conn:
        before = _session_counters(conn)
        found = _waiting(
            RawSQL(conn),
            "business_line = %s AND due_at <= %s",
            (line_to_db(BusinessLine.SALE), to_db_time(NOW)),
            limit,
        )
        after = _session_counters(conn)
    assert len(found) == limit
    assert [c.priority for c in found] == [9] * limit  # the queue's head
    examined = {k: after[k] - before[k] for k in before}
    # a walk of at most the limit per waiting status, never the backlog
    walked = examined["Handler_read_next"] + examined["Handler_read_prev"]
    assert walked <= 4 * limit, examined
    assert examined["Handler_read_rnd_next"] < backlog // 10, examined
