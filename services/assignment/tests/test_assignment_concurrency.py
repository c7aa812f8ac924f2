"""Many dispatchers against one queue: no task is offered twice, no agent over capacity,
every task is offered. Real MariaDB, separate connections, real threads."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from datetime import timedelta

import grpc
from assignment_testlib import ManualClock, Service, new_clue
from crm.assignment.v1 import assignment_pb2 as pb
from crm_assignment.config import LineConfig, RoutingConfig
from crm_assignment.domain.model import (
    AgentSpec,
    BusinessLine,
    Presence,
    Status,
)
from crm_assignment.store import AssignmentStore
from crm_assignment.store.schema import TaskEventRow, TaskRow
from crm_common.errors import FailedPrecondition
from crm_devstack import wait_until
from sqlalchemy import Engine, func, select


def _events(engine: Engine) -> list[tuple[int, int, str, int | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                TaskEventRow.id, TaskEventRow.task_id, TaskEventRow.kind, TaskEventRow.agent_id
            ).order_by(TaskEventRow.id)
        ).all()
    return [(r[0], r[1], str(r[2]), r[3]) for r in rows]


RELEASES = {"REJECTED", "TIMED_OUT", "COMPLETED", "FAILED", "CANCELLED"}


def _check_invariants(engine: Engine, n_tasks: int, capacity: dict[int, int]) -> Counter[int]:
    """Replay task_event in id order (per task and per agent that is commit order: the
    writers hold the task's / the agent's row lock). Returns OFFERED counts per task."""
    holder: dict[int, int | None] = {}
    held: dict[int, int] = defaultdict(int)
    offered: Counter[int] = Counter()
    for _, task, kind, agent in _events(engine):
        if kind == "OFFERED":
            assert agent is not None
            assert holder.get(task) is None, f"task {task} offered twice without a recycle"
            holder[task] = agent
            offered[task] += 1
            held[agent] += 1
            assert held[agent] <= capacity[agent], f"agent {agent} over capacity"
        elif kind in RELEASES and holder.get(task) is not None:
            owner = holder[task]
            assert owner is not None
            assert agent == owner, f"task {task} released by {agent}, held by {owner}"
            held[owner] -= 1
            holder[task] = None
    assert len(offered) == n_tasks, "every task is offered"
    return offered


def test_many_store_dispatchers_on_one_queue(store: AssignmentStore, engine: Engine) -> None:
    clock = ManualClock()
    n_tasks, n_agents = 100, 24
    for i in range(n_tasks):
        store.create_clue(
            new_clue(
                f"k{i}",
                f"1380000{i:04d}",
                f"h{i}",
                priority=i % 10,
                brands=("BMW",) if i % 3 == 0 else (),
            ),
            clock(),
            LineConfig(),
        )
    rnd = random.Random(7)
    capacity = {agent: rnd.randint(1, 3) for agent in range(1, n_agents + 1)}
    for agent, cap in capacity.items():
        brands = ("BMW",) if agent % 2 else ()
        spec = AgentSpec(
            id=agent, name=f"a{agent}", business_line=BusinessLine.SALE, brands=brands,
            capacity=cap,
        )  # fmt: skip
        store.upsert_agent(spec, clock())
        store.set_presence(agent, Presence.IDLE, clock())
    routing = RoutingConfig.from_values({"SALE": LineConfig(candidate_limit=10)}, 1)
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_agents)
    finished = threading.Event()

    def waiting() -> int:
        with engine.connect() as conn:
            return int(
                conn.scalar(
                    select(func.count())
                    .select_from(TaskRow)
                    .where(TaskRow.status.in_([Status.UNASSIGNED, Status.RECYCLED]))
                )
                or 0
            )

    def dispatcher(agent: int) -> None:
        held: list[int] = []
        local = random.Random(agent)
        try:
            barrier.wait()
            while True:
                offer = store.offer_next(agent, clock(), routing)
                if offer is not None:
                    held.append(offer.task.id)
                    if local.random() < 0.5:
                        continue  # hold it for now
                if not held:
                    if offer is None:
                        if waiting() == 0:
                            return
                        time.sleep(0.002)  # every waiting task is being taken by others
                    continue
                task_id = held.pop(0)
                try:
                    if local.random() < 0.15:
                        store.reject(task_id, agent, "busy", clock())
                    else:
                        store.accept(task_id, agent, clock())
                        store.complete(task_id, agent, "", None, clock())
                except FailedPrecondition:
                    pass  # the offer timed out under us (the recycler below)
        except BaseException as exc:
            errors.append(exc)

    def recycler() -> None:
        """Expire offers as if 31 s had passed, racing the dispatchers' accepts."""
        try:
            while not finished.is_set():
                store.recycle_expired(clock() + timedelta(seconds=31), 3)
                time.sleep(0.1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=dispatcher, args=(a,)) for a in capacity]
    timeouts = threading.Thread(target=recycler)
    timeouts.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    finished.set()
    timeouts.join(10)
    assert not errors, errors[:3]
    offered = _check_invariants(engine, n_tasks, capacity)
    kinds = Counter(kind for _, _, kind, _ in _events(engine))
    assert kinds["REJECTED"] > 0
    assert kinds["OFFERED"] == n_tasks + kinds["REJECTED"] + kinds["TIMED_OUT"]
    assert sum(offered.values()) == kinds["OFFERED"]
    with engine.connect() as conn:
        statuses = conn.execute(select(TaskRow.status)).scalars().all()
    assert set(statuses) == {Status.COMPLETED}


def test_many_offer_streams_on_one_queue(service: Service) -> None:
    n_agents, n_tasks = 24, 72
    capacity = {agent: 1 + agent % 2 for agent in range(1, n_agents + 1)}
    for agent, cap in capacity.items():
        service.agent(agent, capacity=cap)
    done: Counter[int] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()
    calls: list[grpc.Future] = []  # type: ignore[type-arg]

    def worker(agent: int) -> None:
        channel, stub = service.new_stub()
        call = stub.StreamOffers(pb.StreamOffersRequest(agent_id=agent))
        with lock:
            calls.append(call)
        try:
            for msg in call:
                task_id = msg.offer.task.id
                stub.AcceptTask(pb.AcceptTaskRequest(task_id=task_id, agent_id=agent))
                stub.CompleteTask(pb.CompleteTaskRequest(task_id=task_id, agent_id=agent))
                with lock:
                    done[task_id] += 1
        except grpc.RpcError as exc:
            if not stop.is_set():
                errors.append(exc)
        except BaseException as exc:
            errors.append(exc)
        finally:
            channel.close()

    threads = [threading.Thread(target=worker, args=(a,), daemon=True) for a in capacity]
    for t in threads:
        t.start()
    wait_until(lambda: len(service.app.hub) == n_agents, "every stream to open")

    def producer(offset: int) -> None:
        channel, stub = service.new_stub()
        try:
            for i in range(offset, n_tasks, 4):
                req = pb.CreateClueRequest(
                    idempotency_key=f"p{i}",
                    phone=f"1390000{i:04d}",
                    business_line=1,
                    source="app",
                    city="beijing",
                    priority=i % 10,
                )
                stub.CreateClue(req)
        finally:
            channel.close()

    producers = [threading.Thread(target=producer, args=(o,)) for o in range(4)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    try:
        wait_until(lambda: len(done) == n_tasks, "every task handled", timeout=60)
    finally:
        stop.set()
        for call in calls:
            call.cancel()
        for t in threads:
            t.join(10)
    assert not errors, errors[:3]
    assert set(done.values()) == {1}
    offered = _check_invariants(service.app.engine, n_tasks, capacity)
    assert set(offered.values()) == {1}
