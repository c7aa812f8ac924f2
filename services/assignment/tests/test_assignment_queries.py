"""ListTasks (filters, keyset paging, tokens), QueueStats and agents over gRPC."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import grpc
import pytest
from assignment_testlib import AFTER_SALE, FINANCE, SALE, ManualClock, OfferReader, Service
from crm.assignment.v1 import assignment_pb2 as pb
from crm.common.v1 import common_pb2
from crm_assignment.api.convert import timestamp
from crm_common.errors import field_violations
from crm_devstack.apps import rpc_error


def _list(service: Service, **kw: object) -> pb.ListTasksResponse:
    return service.stub.ListTasks(pb.ListTasksRequest(**kw))  # type: ignore[arg-type]


def _fields(err: grpc.RpcError) -> set[str]:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    return {f for f, _ in field_violations(err)}


def test_list_tasks_filters_and_paging(service: Service, clock: ManualClock) -> None:
    start = clock()
    ids: list[int] = []
    for i in range(7):
        line = SALE if i % 2 == 0 else AFTER_SALE
        city = "beijing" if i < 5 else "shanghai"
        ids.append(service.clue(f"l-{i}", f"1380013820{i}", business_line=line, city=city).task.id)
        if i % 3 == 0:
            clock.advance(0.5)  # some share a created_at: the id breaks the tie
    everything = _list(service)
    assert [t.id for t in everything.tasks] == list(reversed(ids))
    assert everything.page.next_page_token == ""

    # page through in threes
    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        page = _list(service, page=common_pb2.PageRequest(page_size=3, page_token=token))
        seen.extend(t.id for t in page.tasks)
        pages += 1
        token = page.page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids))
    assert pages == 3

    sale = _list(service, business_line=SALE)
    assert {t.id for t in sale.tasks} == {ids[0], ids[2], ids[4], ids[6]}
    sh = _list(service, city="shanghai")
    assert {t.id for t in sh.tasks} == {ids[5], ids[6]}
    assert _list(service, business_line=FINANCE).tasks == []
    assert len(_list(service, statuses=[pb.STATUS_UNASSIGNED]).tasks) == 7
    assert _list(service, statuses=[pb.STATUS_COMPLETED, pb.STATUS_FAILED]).tasks == []
    assert len(_list(service, category=pb.CATEGORY_NEW_CLUE).tasks) == 7
    assert _list(service, category=pb.CATEGORY_REVISIT).tasks == []
    window = _list(
        service,
        created_from=timestamp(start + timedelta(seconds=0.5)),
        created_to=timestamp(start + timedelta(seconds=1)),
    )
    assert [t.id for t in window.tasks] == [ids[3], ids[2], ids[1]]

    # filters with paging: the token only works with its filters
    p1 = _list(service, business_line=SALE, page=common_pb2.PageRequest(page_size=2))
    assert len(p1.tasks) == 2
    assert p1.page.next_page_token
    p2 = _list(
        service,
        business_line=SALE,
        page=common_pb2.PageRequest(page_size=2, page_token=p1.page.next_page_token),
    )
    assert [t.id for t in p2.tasks] == [ids[2], ids[0]]
    err = rpc_error(
        lambda: _list(
            service,
            business_line=AFTER_SALE,
            page=common_pb2.PageRequest(page_size=2, page_token=p1.page.next_page_token),
        )
    )
    assert _fields(err) == {"page.page_token"}


def test_list_tasks_by_agent(service: Service) -> None:
    service.agent(3)
    r = service.clue("a-1", "13800138300")
    service.clue("a-2", "13800138301")
    reader = OfferReader(service.stub, 3)
    try:
        offered = reader.next().task.id
    finally:
        reader.close()
    mine = _list(service, agent_id=3)
    assert [t.id for t in mine.tasks] == [offered]
    assert offered in (r.task.id, r.task.id + 1)
    assert _list(service, agent_id=3, statuses=[pb.STATUS_IN_PROGRESS]).tasks == []


def _token(body: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode()


@pytest.mark.parametrize(
    ("req", "fields"),
    [
        (pb.ListTasksRequest(page=common_pb2.PageRequest(page_size=501)), {"page.page_size"}),
        (pb.ListTasksRequest(page=common_pb2.PageRequest(page_size=-1)), {"page.page_size"}),
        (
            pb.ListTasksRequest(page=common_pb2.PageRequest(page_token="garbage")),
            {"page.page_token"},
        ),
        (
            pb.ListTasksRequest(
                page=common_pb2.PageRequest(page_token=_token({"c": "x", "i": 1, "f": "y"}))
            ),
            {"page.page_token"},
        ),
        (pb.ListTasksRequest(business_line=7), {"business_line"}),
        (pb.ListTasksRequest(category=9), {"category"}),
        (pb.ListTasksRequest(statuses=[1, 0, 42]), {"statuses[1]", "statuses[2]"}),
        (pb.ListTasksRequest(statuses=[1] * 17), {"statuses"}),
        (pb.ListTasksRequest(agent_id=-3), {"agent_id"}),
        (pb.ListTasksRequest(city="Not A Slug"), {"city"}),
        (
            pb.ListTasksRequest(
                created_from={"seconds": 2_000_000_000}, created_to={"seconds": 1_000_000_000}
            ),
            {"created_from"},
        ),
        (pb.ListTasksRequest(created_from={"seconds": -1}), {"created_from"}),
        (pb.ListTasksRequest(created_to={"seconds": 1, "nanos": -1}), {"created_to"}),
    ],
)
def test_list_tasks_invalid(
    shared_service: Service, req: pb.ListTasksRequest, fields: set[str]
) -> None:
    assert _fields(rpc_error(lambda: shared_service.stub.ListTasks(req))) == fields


def test_tampered_token(shared_service: Service) -> None:
    stub = shared_service.stub
    for i in range(3):
        shared_service.clue(f"tt-{i}", f"1380013840{i}")
    page = stub.ListTasks(pb.ListTasksRequest(page=common_pb2.PageRequest(page_size=1)))
    token = page.page.next_page_token
    body = json.loads(base64.urlsafe_b64decode(token))
    for bad in (token[:-4], token + "A", _token({**body, "i": "1"}), _token({**body, "f": "0"})):
        err = rpc_error(
            lambda bad=bad: stub.ListTasks(
                pb.ListTasksRequest(page=common_pb2.PageRequest(page_size=1, page_token=bad))
            )
        )
        assert _fields(err) == {"page.page_token"}


def test_queue_stats(service: Service, clock: ManualClock) -> None:
    service.agent(1, capacity=2)
    service.agent(2, idle=False)
    service.agent(3, line=FINANCE)
    a = service.clue("q-1", "13800138500").task.id
    clock.advance(60)
    service.clue("q-2", "13800138501")
    service.clue("q-3", "13800138502", business_line=FINANCE)
    clock.advance(30)
    reader = OfferReader(service.stub, 1)
    try:
        offered = {reader.next().task.id, reader.next().task.id}
    finally:
        reader.close()
    assert a in offered
    first = a
    service.stub.AcceptTask(pb.AcceptTaskRequest(task_id=first, agent_id=1))
    done = service.stub.CompleteTask(
        pb.CompleteTaskRequest(
            task_id=first, agent_id=1, revisit_at=timestamp(clock() + timedelta(hours=1))
        )
    )
    assert done.revisit.id
    service.clue("q-4", "13800138503")
    clock.advance(10)
    stats = service.stub.QueueStats(pb.QueueStatsRequest(business_line=SALE))
    queues = {(q.business_line, q.category): q for q in stats.queues}
    assert set(queues) == {(SALE, c) for c in (1, 2, 3)}
    new = queues[(SALE, pb.CATEGORY_NEW_CLUE)]
    assert (new.waiting, new.offered, new.in_progress, new.scheduled) == (1, 1, 0, 0)
    assert new.oldest_wait_seconds == pytest.approx(10)
    revisit = queues[(SALE, pb.CATEGORY_REVISIT)]
    assert (revisit.waiting, revisit.scheduled) == (0, 1)
    agents = {(p.business_line, p.presence): p.agents for p in stats.agents}
    assert agents == {(SALE, pb.PRESENCE_IDLE): 1, (SALE, pb.PRESENCE_OFFLINE): 1}
    all_lines = service.stub.QueueStats(pb.QueueStatsRequest())
    assert len(all_lines.queues) == 9
    fin = {(q.business_line, q.category): q for q in all_lines.queues}[(FINANCE, 1)]
    assert fin.waiting == 1
    assert fin.oldest_wait_seconds == pytest.approx(40)
    err = rpc_error(lambda: service.stub.QueueStats(pb.QueueStatsRequest(business_line=5)))
    assert _fields(err) == {"business_line"}


def test_agents(service: Service) -> None:
    stub = service.stub
    spec = pb.Agent(
        id=42,
        name="Li Lei",
        business_line=SALE,
        cities=["beijing", "tianjin", "beijing"],
        categories=[pb.CATEGORY_NEW_CLUE, pb.CATEGORY_REVISIT],
        brands=["BMW"],
        capacity=3,
        presence=pb.PRESENCE_IDLE,  # ignored
        active_tasks=9,  # ignored
    )
    created = stub.UpsertAgent(pb.UpsertAgentRequest(agent=spec))
    assert created.created
    a = created.agent
    assert (a.id, a.name, a.capacity, a.presence, a.active_tasks) == (
        42, "Li Lei", 3, pb.PRESENCE_OFFLINE, 0,
    )  # fmt: skip
    assert list(a.cities) == ["beijing", "tianjin"]
    assert list(a.categories) == [pb.CATEGORY_NEW_CLUE, pb.CATEGORY_REVISIT]
    spec.capacity = 5
    spec.business_line = FINANCE
    updated = stub.UpsertAgent(pb.UpsertAgentRequest(agent=spec))
    assert not updated.created
    assert updated.agent.capacity == 5
    assert updated.agent.business_line == FINANCE
    got = stub.GetAgent(pb.GetAgentRequest(id=42)).agent
    assert got == updated.agent
    idle = stub.SetPresence(pb.SetPresenceRequest(agent_id=42, presence=pb.PRESENCE_IDLE)).agent
    assert idle.presence == pb.PRESENCE_IDLE
    again = stub.UpsertAgent(pb.UpsertAgentRequest(agent=spec)).agent
    assert again.presence == pb.PRESENCE_IDLE  # upsert keeps presence
    nf = grpc.StatusCode.NOT_FOUND
    assert rpc_error(lambda: stub.GetAgent(pb.GetAgentRequest(id=43))).code() == nf
    assert (
        rpc_error(lambda: stub.SetPresence(pb.SetPresenceRequest(agent_id=43, presence=2))).code()
        == nf
    )
    assert _fields(rpc_error(lambda: stub.GetAgent(pb.GetAgentRequest(id=0)))) == {"id"}


@pytest.mark.parametrize(
    ("agent", "fields"),
    [
        (None, {"agent"}),
        (
            pb.Agent(),
            {"agent.id", "agent.name", "agent.business_line", "agent.capacity"},
        ),
        (
            pb.Agent(
                id=1,
                name="n" * 101,
                business_line=4,
                cities=["Beijing", "ok"],
                categories=[0, 1, 7],
                brands=["", "b" * 33],
                capacity=51,
            ),
            {
                "agent.name",
                "agent.business_line",
                "agent.cities[0]",
                "agent.categories[0]",
                "agent.categories[2]",
                "agent.brands[0]",
                "agent.brands[1]",
                "agent.capacity",
            },
        ),
        (
            pb.Agent(id=1, name="x", business_line=1, capacity=1, cities=["a"] * 51),
            {"agent.cities"},
        ),
    ],
)
def test_upsert_agent_invalid(
    shared_service: Service, agent: pb.Agent | None, fields: set[str]
) -> None:
    req = pb.UpsertAgentRequest() if agent is None else pb.UpsertAgentRequest(agent=agent)
    assert _fields(rpc_error(lambda: shared_service.stub.UpsertAgent(req))) == fields
