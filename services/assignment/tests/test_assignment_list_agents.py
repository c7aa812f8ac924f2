"""ListAgents over gRPC: filters, keyset paging, active task counts, validation, auth."""

from __future__ import annotations

import base64
import json

import grpc
import pytest
from assignment_testlib import AFTER_SALE, FINANCE, SALE, OfferReader, Service
from crm.assignment.v1 import assignment_pb2 as pb
from crm.common.v1 import common_pb2
from crm_assignment.api.auth import bearer_metadata
from crm_common.errors import field_violations
from crm_devstack.apps import rpc_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def _list(service: Service, **kw: object) -> pb.ListAgentsResponse:
    return service.stub.ListAgents(pb.ListAgentsRequest(**kw))  # type: ignore[arg-type]


def _ids(resp: pb.ListAgentsResponse) -> list[int]:
    return [a.id for a in resp.agents]


def _fields(err: grpc.RpcError) -> set[str]:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    return {f for f, _ in field_violations(err)}


def _token(body: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode()


def test_list_agents_filters_paging_and_active_tasks(service: Service) -> None:
    # ids out of order: the list is by id
    for agent_id, line, idle in [
        (30, SALE, True),
        (10, SALE, False),
        (20, AFTER_SALE, True),
        (50, FINANCE, False),
        (40, SALE, True),
    ]:
        service.agent(agent_id, line=line, idle=idle)
    service.stub.SetPresence(pb.SetPresenceRequest(agent_id=40, presence=pb.PRESENCE_BREAK))

    everyone = _list(service)
    assert _ids(everyone) == [10, 20, 30, 40, 50]
    assert everyone.page.next_page_token == ""
    assert [a.presence for a in everyone.agents] == [
        pb.PRESENCE_OFFLINE, pb.PRESENCE_IDLE, pb.PRESENCE_IDLE, pb.PRESENCE_BREAK,
        pb.PRESENCE_OFFLINE,
    ]  # fmt: skip
    assert everyone.agents[0].name == "agent 10"

    assert _ids(_list(service, business_line=SALE)) == [10, 30, 40]
    assert _ids(_list(service, presences=[pb.PRESENCE_IDLE])) == [20, 30]
    assert _ids(
        _list(service, business_line=SALE, presences=[pb.PRESENCE_BREAK, pb.PRESENCE_OFFLINE])
    ) == [10, 40]
    assert _ids(_list(service, presences=[pb.PRESENCE_BUSY])) == []

    # keyset paging in twos; the token is bound to its filters
    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        page = _list(service, page=common_pb2.PageRequest(page_size=2, page_token=token))
        seen.extend(_ids(page))
        pages += 1
        token = page.page.next_page_token
        if not token:
            break
    assert (seen, pages) == ([10, 20, 30, 40, 50], 3)
    first = _list(service, business_line=SALE, page=common_pb2.PageRequest(page_size=2))
    assert _ids(first) == [10, 30]
    rest = _list(
        service,
        business_line=SALE,
        page=common_pb2.PageRequest(page_size=2, page_token=first.page.next_page_token),
    )
    assert (_ids(rest), rest.page.next_page_token) == ([40], "")
    err = rpc_error(
        lambda: _list(
            service,
            business_line=AFTER_SALE,
            page=common_pb2.PageRequest(page_token=first.page.next_page_token),
        )
    )
    assert _fields(err) == {"page.page_token"}

    # active_tasks is counted per agent of the page
    service.clue("la-1", "13800138400")
    reader = OfferReader(service.stub, 30)
    try:
        offered = reader.next().task.id
    finally:
        reader.close()
    assert offered
    by_id = {a.id: a.active_tasks for a in _list(service, business_line=SALE).agents}
    assert by_id == {10: 0, 30: 1, 40: 0}


def test_agents_cannot_list_agents(service: Service) -> None:
    service.agent(7)
    token = service.stub.SignIn(pb.SignInRequest(agent_id=7)).token
    err = rpc_error(
        lambda: service.stub.ListAgents(pb.ListAgentsRequest(), metadata=bearer_metadata(token))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("req", "fields"),
    [
        (pb.ListAgentsRequest(page=common_pb2.PageRequest(page_size=501)), {"page.page_size"}),
        (pb.ListAgentsRequest(page=common_pb2.PageRequest(page_size=-1)), {"page.page_size"}),
        (
            pb.ListAgentsRequest(page=common_pb2.PageRequest(page_token="garbage")),
            {"page.page_token"},
        ),
        (
            pb.ListAgentsRequest(page=common_pb2.PageRequest(page_token=_token({"i": 1}))),
            {"page.page_token"},
        ),
        (
            pb.ListAgentsRequest(
                page=common_pb2.PageRequest(page_token=_token({"i": -1, "f": "x"}))
            ),
            {"page.page_token"},
        ),
        (
            pb.ListAgentsRequest(page=common_pb2.PageRequest(page_token="x" * 300)),
            {"page.page_token"},
        ),
        (pb.ListAgentsRequest(business_line=99), {"business_line"}),
        (pb.ListAgentsRequest(presences=[2, 0, 9]), {"presences[1]", "presences[2]"}),
        (pb.ListAgentsRequest(presences=[1] * 5), {"presences"}),
        (
            pb.ListAgentsRequest(
                business_line=99, presences=[0], page=common_pb2.PageRequest(page_size=501)
            ),
            {"business_line", "presences[0]", "page.page_size"},
        ),
    ],
)
def test_list_agents_invalid(
    shared_service: Service, req: pb.ListAgentsRequest, fields: set[str]
) -> None:
    assert _fields(rpc_error(lambda: shared_service.stub.ListAgents(req))) == fields


ENUM = st.one_of(st.integers(0, 5), st.integers(-(2**31), 2**31 - 1))
TOKEN = st.one_of(
    st.just(""),
    st.text(max_size=300),
    st.builds(
        lambda a, f: _token({"i": a, "f": f}),
        st.one_of(st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=5), st.none()),
        st.one_of(st.text(max_size=20), st.integers()),
    ),
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    line=ENUM,
    presences=st.lists(ENUM, max_size=6),
    size=st.one_of(st.integers(-1, 600), st.integers(-(2**31), 2**31 - 1)),
    token=TOKEN,
)
def test_list_agents_never_internal(
    shared_service: Service, line: int, presences: list[int], size: int, token: str
) -> None:
    req = pb.ListAgentsRequest(
        business_line=line,  # type: ignore[arg-type]
        presences=presences,  # type: ignore[arg-type]
        page=common_pb2.PageRequest(page_size=size, page_token=token),
    )
    code = grpc.StatusCode.OK
    try:
        shared_service.stub.ListAgents(req, timeout=30)
    except grpc.RpcError as exc:
        code = exc.code()
    assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
