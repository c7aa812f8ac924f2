"""Offer streams and the task life cycle through the real gRPC server."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from assignment_testlib import ManualClock, OfferReader, Service, new_clue
from crm.assignment.v1 import assignment_pb2 as pb
from crm_assignment.api.convert import timestamp
from crm_assignment.config import RoutingConfig
from crm_assignment.store import AssignmentStore
from crm_common.errors import FailedPrecondition, field_violations
from crm_devstack import wait_until
from crm_devstack.apps import rpc_error


def _presence(service: Service, agent_id: int, presence: int) -> None:
    service.stub.SetPresence(pb.SetPresenceRequest(agent_id=agent_id, presence=presence))


def _status(service: Service, task_id: int) -> int:
    return service.task(task_id).task.status


def test_offer_accept_complete_with_revisit_to_same_agent(
    service: Service, clock: ManualClock
) -> None:
    service.agent(1)
    service.agent(2, idle=False)
    r = service.clue("r-1", "13800138010", brands=["BMW"])
    one = OfferReader(service.stub, 1)
    try:
        offer = one.next()
        assert offer.task.id == r.task.id
        assert offer.task.status == pb.STATUS_ASSIGNED
        assert offer.task.agent_id == 1
        assert offer.customer.phone.masked == "138****8010"
        assert offer.deadline.ToDatetime() == (clock() + timedelta(seconds=30)).replace(tzinfo=None)
        accepted = service.stub.AcceptTask(pb.AcceptTaskRequest(task_id=r.task.id, agent_id=1))
        assert accepted.task.status == pb.STATUS_IN_PROGRESS
        assert not accepted.task.HasField("offer_deadline")
        revisit_at = clock() + timedelta(hours=1)
        done = service.stub.CompleteTask(
            pb.CompleteTaskRequest(
                task_id=r.task.id, agent_id=1, note="call back", revisit_at=timestamp(revisit_at)
            )
        )
        assert done.task.status == pb.STATUS_COMPLETED
        rv = done.revisit
        assert rv.category == pb.CATEGORY_REVISIT
        assert rv.status == pb.STATUS_UNASSIGNED
        assert rv.parent_task_id == r.task.id
        assert rv.customer_id == service.task(r.task.id).customer.id
        assert list(rv.brands) == ["BMW"]
        assert rv.due_at == timestamp(revisit_at)
        history = [e.kind for e in service.task(r.task.id).history]
        assert history == ["CREATED", "OFFERED", "ACCEPTED", "COMPLETED"]
        assert [e.kind for e in service.task(rv.id).history] == ["REVISIT_SCHEDULED"]

        # agent 2 is idle and streaming, but the revisit waits for agent 1
        _presence(service, 2, pb.PRESENCE_IDLE)
        two = OfferReader(service.stub, 2)
        try:
            clock.advance(3600)
            again = one.next()
            assert again.task.id == rv.id
            assert again.task.agent_id == 1
            assert two.drain() == []
        finally:
            two.close()
    finally:
        one.close()


def test_revisit_goes_to_another_agent_after_the_window(
    service: Service, clock: ManualClock
) -> None:
    service.agent(1)
    r = service.clue("r-2", "13800138011")
    one = OfferReader(service.stub, 1)
    try:
        assert one.next().task.id == r.task.id
        service.stub.AcceptTask(pb.AcceptTaskRequest(task_id=r.task.id, agent_id=1))
        _presence(service, 1, pb.PRESENCE_BREAK)
        rv = service.stub.CompleteTask(
            pb.CompleteTaskRequest(
                task_id=r.task.id, agent_id=1, revisit_at=timestamp(clock() + timedelta(hours=2))
            )
        ).revisit
    finally:
        one.close()
    service.agent(2)
    two = OfferReader(service.stub, 2)
    try:
        clock.advance(7200 + 60)  # due, but agent 1's window (300 s) is still open
        app = service.app
        assert app.store.offer_next(2, clock(), app.routing()) is None
        assert two.drain() == []
        clock.advance(300)
        offer = two.next()
        assert offer.task.id == rv.id
    finally:
        two.close()


def test_reject_recycles_to_another_agent(service: Service) -> None:
    service.agent(1)
    service.agent(2)
    r = service.clue("j-1", "13800138012")
    one = OfferReader(service.stub, 1)
    try:
        assert one.next().task.id == r.task.id
        _presence(service, 1, pb.PRESENCE_BUSY)
        two = OfferReader(service.stub, 2)
        try:
            rejected = service.stub.RejectTask(
                pb.RejectTaskRequest(task_id=r.task.id, agent_id=1, reason="wrong city")
            )
            assert rejected.task.status == pb.STATUS_RECYCLED
            assert rejected.task.recycle_count == 1
            assert rejected.task.agent_id == 0
            offer = two.next()
            assert offer.task.id == r.task.id
            assert offer.task.recycle_count == 1
        finally:
            two.close()
    finally:
        one.close()
    events = service.task(r.task.id).history
    assert [(e.kind, e.agent_id) for e in events] == [
        ("CREATED", 0),
        ("OFFERED", 1),
        ("REJECTED", 1),
        ("OFFERED", 2),
    ]
    assert events[2].reason == "wrong city"
    assert events[2].to_status == pb.STATUS_RECYCLED


def test_offer_timeout_recycles_and_offers_again(service: Service, clock: ManualClock) -> None:
    service.agent(1)
    r = service.clue("t-1", "13800138013")
    one = OfferReader(service.stub, 1)
    try:
        assert one.next().task.id == r.task.id
        _presence(service, 1, pb.PRESENCE_BUSY)
        clock.advance(31)
        wait_until(lambda: _status(service, r.task.id) == pb.STATUS_RECYCLED, "recycle")
        late = rpc_error(
            lambda: service.stub.AcceptTask(pb.AcceptTaskRequest(task_id=r.task.id, agent_id=1))
        )
        assert late.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        one.close()
    d = service.task(r.task.id)
    assert d.task.recycle_count == 1
    assert d.history[-1].kind == "TIMED_OUT"
    assert d.history[-1].agent_id == 1
    service.agent(2)
    two = OfferReader(service.stub, 2)
    try:
        offer = two.next()
        assert offer.task.id == r.task.id
        assert offer.task.agent_id == 2
    finally:
        two.close()


def test_accept_after_deadline_is_offer_expired(store: AssignmentStore, clock: ManualClock) -> None:
    from crm_assignment.domain.model import AgentSpec, BusinessLine, Presence

    store.upsert_agent(AgentSpec(id=5, name="a", business_line=BusinessLine.SALE), clock())
    store.set_presence(5, Presence.IDLE, clock())
    _seed_tasks(store, clock, 1)
    offer = store.offer_next(5, clock(), RoutingConfig())
    assert offer is not None
    with pytest.raises(FailedPrecondition, match="offer expired"):
        store.accept(offer.task.id, 5, offer.deadline)
    assert store.accept(offer.task.id, 5, offer.deadline - timedelta(microseconds=1)).status == 3


def _seed_tasks(store: AssignmentStore, clock: ManualClock, n: int) -> None:
    from crm_assignment.config import LineConfig

    for i in range(n):
        store.create_clue(new_clue(f"seed-{i}", f"1390000{i:04d}", f"h{i}"), clock(), LineConfig())


def test_fail_cancel_and_illegal_transitions(service: Service) -> None:
    service.agent(1, capacity=3)
    service.agent(2)
    a = service.clue("f-1", "13800138014")
    one = OfferReader(service.stub, 1)
    try:
        assert one.next().task.id == a.task.id
        stub = service.stub

        def code(fn: object) -> grpc.StatusCode:
            return rpc_error(fn).code()  # type: ignore[arg-type]

        fp = grpc.StatusCode.FAILED_PRECONDITION
        nf = grpc.StatusCode.NOT_FOUND
        tid = a.task.id
        # not offered to agent 2
        assert code(lambda: stub.AcceptTask(pb.AcceptTaskRequest(task_id=tid, agent_id=2))) == fp
        assert code(lambda: stub.RejectTask(pb.RejectTaskRequest(task_id=tid, agent_id=2))) == fp
        # not in progress yet
        complete = pb.CompleteTaskRequest(task_id=tid, agent_id=1)
        assert code(lambda: stub.CompleteTask(complete)) == fp
        stub.AcceptTask(pb.AcceptTaskRequest(task_id=tid, agent_id=1))
        err = rpc_error(lambda: stub.AcceptTask(pb.AcceptTaskRequest(task_id=tid, agent_id=1)))
        assert err.code() == fp
        assert f"task {tid} is IN_PROGRESS" in (err.details() or "")
        assert code(lambda: stub.CancelTask(pb.CancelTaskRequest(task_id=tid, reason="x"))) == fp
        wrong = pb.FailTaskRequest(task_id=tid, agent_id=2, reason="x")
        assert code(lambda: stub.FailTask(wrong)) == fp
        failed = stub.FailTask(pb.FailTaskRequest(task_id=tid, agent_id=1, reason="no answer"))
        assert failed.task.status == pb.STATUS_FAILED
        assert code(lambda: stub.CompleteTask(complete)) == fp
        # cancel an offered task: frees the agent
        b = service.clue("f-2", "13800138015").task.id
        assert one.next().task.id == b
        cancelled = stub.CancelTask(pb.CancelTaskRequest(task_id=b, reason="duplicate"))
        assert cancelled.task.status == pb.STATUS_CANCELLED
        assert code(lambda: stub.CancelTask(pb.CancelTaskRequest(task_id=b, reason="x"))) == fp
        assert service.stub.GetAgent(pb.GetAgentRequest(id=1)).agent.active_tasks == 0
        assert code(lambda: stub.AcceptTask(pb.AcceptTaskRequest(task_id=10**9, agent_id=1))) == nf
        assert code(lambda: stub.CancelTask(pb.CancelTaskRequest(task_id=10**9, reason="x"))) == nf
    finally:
        one.close()


@pytest.mark.parametrize(
    ("call", "fields"),
    [
        (lambda s: s.AcceptTask(pb.AcceptTaskRequest()), {"task_id", "agent_id"}),
        (
            lambda s: s.RejectTask(pb.RejectTaskRequest(task_id=1, agent_id=1, reason="r" * 501)),
            {"reason"},
        ),
        (lambda s: s.FailTask(pb.FailTaskRequest(task_id=1, agent_id=1)), {"reason"}),
        (lambda s: s.FailTask(pb.FailTaskRequest(task_id=1, agent_id=1, reason="  ")), {"reason"}),
        (lambda s: s.CancelTask(pb.CancelTaskRequest(task_id=-1)), {"task_id", "reason"}),
        (
            lambda s: s.CompleteTask(pb.CompleteTaskRequest(task_id=1, agent_id=1, note="n" * 501)),
            {"note"},
        ),
        (
            lambda s: s.CompleteTask(
                pb.CompleteTaskRequest(task_id=1, agent_id=1, revisit_at={"seconds": 1})
            ),
            {"revisit_at"},
        ),
        (
            lambda s: s.CompleteTask(
                pb.CompleteTaskRequest(task_id=1, agent_id=1, revisit_at={"seconds": 2**40})
            ),
            {"revisit_at"},
        ),
        (lambda s: s.StreamOffers(pb.StreamOffersRequest()).next(), {"agent_id"}),
        (lambda s: s.SetPresence(pb.SetPresenceRequest(agent_id=1)), {"presence"}),
        (lambda s: s.SetPresence(pb.SetPresenceRequest(agent_id=1, presence=9)), {"presence"}),
    ],
)
def test_action_field_violations(shared_service: Service, call: object, fields: set[str]) -> None:
    err = rpc_error(lambda: call(shared_service.stub))  # type: ignore[operator]
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in field_violations(err)} == fields


def test_revisit_time_limits(service: Service, clock: ManualClock) -> None:
    service.agent(1)
    r = service.clue("v-1", "13800138016")
    one = OfferReader(service.stub, 1)
    try:
        one.next()
    finally:
        one.close()
    service.stub.AcceptTask(pb.AcceptTaskRequest(task_id=r.task.id, agent_id=1))
    for at in (clock() - timedelta(seconds=1), clock() + timedelta(days=367)):
        err = rpc_error(
            lambda at=at: service.stub.CompleteTask(
                pb.CompleteTaskRequest(task_id=r.task.id, agent_id=1, revisit_at=timestamp(at))
            )
        )
        assert {f for f, _ in field_violations(err)} == {"revisit_at"}
    ok = service.stub.CompleteTask(
        pb.CompleteTaskRequest(
            task_id=r.task.id, agent_id=1, revisit_at=timestamp(clock() + timedelta(days=365))
        )
    )
    assert ok.revisit.id > 0


def test_stream_unknown_agent_and_replacement(service: Service) -> None:
    err = rpc_error(lambda: next(service.stub.StreamOffers(pb.StreamOffersRequest(agent_id=77))))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    service.agent(1, capacity=2)
    r = service.clue("s-1", "13800138017")
    first = OfferReader(service.stub, 1)
    assert first.next().task.id == r.task.id
    second = OfferReader(service.stub, 1)
    try:
        wait_until(first.ended.is_set, "the replaced stream to end")
        assert first.error is not None
        assert first.error.code() == grpc.StatusCode.ABORTED
        # the still-open offer is pushed again on the new stream
        assert second.next().task.id == r.task.id
        r2 = service.clue("s-2", "13800138018")
        assert second.next().task.id == r2.task.id
    finally:
        first.close()
        second.close()


def test_capacity_and_skills(service: Service) -> None:
    service.agent(1, capacity=2, cities=("beijing",), categories=(pb.CATEGORY_NEW_CLUE,))
    ids = [service.clue(f"cap-{i}", f"1380013810{i}").task.id for i in range(3)]
    sh = service.clue("cap-sh", "13800138199", city="shanghai").task.id
    one = OfferReader(service.stub, 1)
    try:
        got = {one.next().task.id, one.next().task.id}
        assert got <= set(ids)
        assert service.stub.GetAgent(pb.GetAgentRequest(id=1)).agent.active_tasks == 2
        first = got.pop()
        service.stub.AcceptTask(pb.AcceptTaskRequest(task_id=first, agent_id=1))
        service.stub.CompleteTask(pb.CompleteTaskRequest(task_id=first, agent_id=1))
        third = one.next().task.id
        assert third in ids
        assert third not in got
        assert _status(service, sh) == pb.STATUS_UNASSIGNED  # another city
    finally:
        one.close()


def test_star_customer_is_served_first(service: Service) -> None:
    plain = service.clue("st-1", "13800138020").task.id
    starred = service.clue("st-2", "13800138021").task.id
    customer = service.task(starred).customer.id
    service.stub.SetCustomerStar(pb.SetCustomerStarRequest(customer_id=customer, star=True))
    service.agent(1)
    reader = OfferReader(service.stub, 1)
    try:
        assert reader.next().task.id == starred
        service.stub.RejectTask(pb.RejectTaskRequest(task_id=starred, agent_id=1))
        # the rejected star task now carries the recently-lost penalty for agent 1
        assert reader.next().task.id == plain
    finally:
        reader.close()
