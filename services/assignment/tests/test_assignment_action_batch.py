"""Task action group commit (AcceptTask / CompleteTask / FailTask): the store's batch path
against MariaDB gives the results one-by-one calls would, errors stay per action, and many
agents working concurrently through the server leave a consistent audit trail."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import grpc
from assignment_testlib import SALE, OfferReader, Service
from crm.assignment.v1 import assignment_pb2 as pb
from crm_assignment.api import validation
from crm_assignment.config import RoutingConfig
from crm_assignment.domain.model import AgentSpec, BusinessLine, Offer, Presence, Status, Task
from crm_assignment.domain.phone import PhoneProtector
from crm_assignment.settings import AssignmentSettings
from crm_assignment.store import AssignmentStore
from crm_assignment.store.repository import ActionKind, TaskAction
from crm_assignment.store.schema import TaskEventRow
from crm_common.errors import FailedPrecondition, NotFound
from crm_devstack.apps import rpc_error
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def _offered(store: AssignmentStore, n: int, agent_id: int) -> list[Offer]:
    """``n`` tasks offered to ``agent_id`` (capacity n)."""
    settings = AssignmentSettings()
    prot = PhoneProtector(settings.phone_hash_key_bytes, settings.phone_encryption_key_bytes)
    cfg = RoutingConfig().line(BusinessLine.SALE)
    store.upsert_agent(AgentSpec(agent_id, "a", BusinessLine.SALE, capacity=n), NOW)
    store.set_presence(agent_id, Presence.IDLE, NOW)
    for i in range(n):
        req = pb.CreateClueRequest(
            idempotency_key=f"ab-{agent_id}-{i}", phone=f"1390000{agent_id:02d}{i:02d}",
            business_line=SALE, source="app", city="beijing",
        )  # fmt: skip
        store.create_clues([(validation.new_clue(req, prot, RoutingConfig()), NOW, cfg)])
    offers = [store.offer_next(agent_id, NOW, RoutingConfig()) for _ in range(n)]
    assert all(o is not None for o in offers)
    return [o for o in offers if o is not None]


def test_batch_results_and_errors_per_action(store: AssignmentStore, engine: Engine) -> None:
    a, b, c = (o.task.id for o in _offered(store, 3, 1))
    later = NOW + timedelta(seconds=1)
    actions = [
        TaskAction(ActionKind.ACCEPT, a, 1, "", later),
        TaskAction(ActionKind.COMPLETE, a, 1, "sold", later),  # same task, after its accept
        TaskAction(ActionKind.ACCEPT, b, 2, "", later),  # not offered to agent 2
        TaskAction(ActionKind.COMPLETE, c, 1, "", later),  # not accepted yet
        TaskAction(ActionKind.ACCEPT, 999_999, 1, "", later),  # unknown
        TaskAction(ActionKind.ACCEPT, b, 1, "", later),
        TaskAction(ActionKind.ACCEPT, b, 1, "", later),  # twice: the second is illegal
        TaskAction(ActionKind.ACCEPT, c, 1, "", NOW + timedelta(hours=1)),  # too late
    ]
    out = store.task_actions(actions)
    assert isinstance(out[0], Task)
    assert out[0].status is Status.IN_PROGRESS
    assert isinstance(out[1], Task)
    assert out[1].status is Status.COMPLETED
    assert isinstance(out[2], FailedPrecondition)
    assert isinstance(out[3], FailedPrecondition)
    assert isinstance(out[4], NotFound)
    assert isinstance(out[5], Task)
    assert out[5].status is Status.IN_PROGRESS
    assert out[5].offer_deadline is None
    assert isinstance(out[6], FailedPrecondition)
    assert isinstance(out[7], FailedPrecondition)
    assert store.find_task(a).status is Status.COMPLETED  # type: ignore[union-attr]
    assert store.find_task(b).status is Status.IN_PROGRESS  # type: ignore[union-attr]
    assert store.find_task(c).status is Status.ASSIGNED  # type: ignore[union-attr]
    with Session(engine) as s:
        kinds = [
            (e.task_id, e.kind.value, e.from_status, e.to_status, e.reason)
            for e in s.scalars(
                select(TaskEventRow)
                .where(TaskEventRow.kind != "CREATED", TaskEventRow.kind != "OFFERED")
                .order_by(TaskEventRow.id)
            )
        ]
    assert kinds == [
        (a, "ACCEPTED", Status.ASSIGNED, Status.IN_PROGRESS, ""),
        (a, "COMPLETED", Status.IN_PROGRESS, Status.COMPLETED, "sold"),
        (b, "ACCEPTED", Status.ASSIGNED, Status.IN_PROGRESS, ""),
    ]
    fail = store.task_actions([TaskAction(ActionKind.FAIL, b, 1, "no deal", later)])
    assert isinstance(fail[0], Task)
    assert fail[0].status is Status.FAILED


def test_many_agents_accept_and_complete_concurrently(service: Service) -> None:
    """16 agents, 3 tasks each, all accepted and completed at once through the server:
    every task ends COMPLETED with exactly one ACCEPTED and one COMPLETED event, and the
    batcher wrote fewer transactions than actions."""
    agents = list(range(100, 116))
    for aid in agents:
        service.agent(aid, line=SALE, capacity=3)
    for i in range(len(agents) * 3):
        service.clue(f"cc-{i}", f"1370000{i:04d}")
    offers: dict[int, list[int]] = {}
    for aid in agents:
        reader = OfferReader(service.stub, aid)
        try:
            offers[aid] = [reader.next().task.id for _ in range(3)]
        finally:
            reader.close()
    errors: list[BaseException] = []

    def work(aid: int) -> None:
        channel, stub = service.new_stub()
        try:
            for tid in offers[aid]:
                stub.AcceptTask(pb.AcceptTaskRequest(task_id=tid, agent_id=aid))
            for tid in offers[aid]:
                stub.CompleteTask(pb.CompleteTaskRequest(task_id=tid, agent_id=aid, note="ok"))
            # a repeated complete is refused, not applied twice
            again = pb.CompleteTaskRequest(task_id=offers[aid][0], agent_id=aid)
            code = rpc_error(lambda: stub.CompleteTask(again)).code()
            if code != grpc.StatusCode.FAILED_PRECONDITION:
                raise AssertionError(f"a second CompleteTask answered {code}")
        except BaseException as exc:
            errors.append(exc)
        finally:
            channel.close()

    threads = [threading.Thread(target=work, args=(aid,)) for aid in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for aid, tids in offers.items():
        for tid in tids:
            detail = service.task(tid)
            assert detail.task.status == pb.STATUS_COMPLETED
            assert detail.task.agent_id == aid
            kinds = [e.kind for e in detail.history]
            assert kinds == ["CREATED", "OFFERED", "ACCEPTED", "COMPLETED"]
    batcher = service.app.servicer.actions
    assert 0 < batcher.batches <= len(agents) * 7
