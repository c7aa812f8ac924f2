"""Arbitrary requests never make the service answer INTERNAL (or UNKNOWN)."""

from __future__ import annotations

import base64
import json

import grpc
from assignment_testlib import Service
from crm.assignment.v1 import assignment_pb2 as pb
from crm.common.v1 import common_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 25))
INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-2, 12))
TEXT = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.characters(codec="ascii"), max_size=140),
    st.text(min_size=200, max_size=3000),
    st.sampled_from(["", " ", "beijing", "app", "BMW", "13800138000", "\x00", "a" * 64]),
)
SLUG = st.from_regex(r"[a-z][a-z0-9_-]{0,70}", fullmatch=True)
PHONE = st.one_of(TEXT, st.from_regex(r"\+{0,2}[0-9 \-]{5,22}", fullmatch=True))
KEY = st.one_of(TEXT, st.from_regex(r"[ -~]{1,130}", fullmatch=True))
ENUM = st.one_of(st.integers(0, 4), INT32)


VALID_CLUE = {
    "idempotency_key": st.from_regex(r"[!-~][ -~]{0,40}", fullmatch=True),
    "phone": st.from_regex(r"\+?1[0-9]{6,14}", fullmatch=True),
    "business_line": st.integers(1, 3),
    "source": st.text(
        alphabet=st.characters(categories=["L", "N", "P", "S"]), min_size=1, max_size=64
    ),
    "city": st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True),
    "intent_car_ids": st.lists(st.integers(1, 2**63 - 1), max_size=20),
    "brands": st.lists(
        st.text(alphabet=st.characters(categories=["L", "N"]), min_size=1, max_size=32),
        max_size=20,
    ),
    "budget_min_yuan": st.integers(0, 10**6),
    "budget_max_yuan": st.just(0),
    "priority": st.integers(0, 9),
}
WILD_CLUE = {
    "idempotency_key": KEY,
    "phone": PHONE,
    "business_line": ENUM,
    "source": TEXT,
    "city": st.one_of(SLUG, TEXT),
    "intent_car_ids": st.lists(INT64, max_size=25),
    "brands": st.lists(TEXT, max_size=22),
    "budget_min_yuan": INT64,
    "budget_max_yuan": INT64,
    "priority": INT32,
}


@st.composite
def clue_requests(draw: st.DrawFn) -> tuple[str, pb.CreateClueRequest]:
    """(mode, request): ``valid`` (every field valid), ``one_bad`` (one field arbitrary)
    or ``wild`` (every field arbitrary)."""
    mode = draw(st.sampled_from(["valid", "one_bad", "wild"]))
    bad = draw(st.sampled_from(sorted(WILD_CLUE))) if mode == "one_bad" else None
    fields = {
        name: draw(WILD_CLUE[name] if mode == "wild" or name == bad else VALID_CLUE[name])
        for name in VALID_CLUE
    }
    return mode, pb.CreateClueRequest(**fields)


def _token(draw: st.DrawFn) -> str:
    body = draw(
        st.one_of(
            st.fixed_dictionaries({"c": TEXT, "i": INT64, "f": TEXT}),
            st.fixed_dictionaries(
                {
                    "c": st.datetimes().map(lambda d: d.isoformat() + "+00:00"),
                    "i": INT64,
                    "f": st.text(alphabet="0123456789abcdef", min_size=16, max_size=16),
                }
            ),
            st.lists(st.integers(), max_size=3),
        )
    )
    raw = base64.urlsafe_b64encode(json.dumps(body).encode()).decode()
    return draw(st.one_of(st.just(raw), TEXT))


@st.composite
def list_requests(draw: st.DrawFn) -> pb.ListTasksRequest:
    req = pb.ListTasksRequest(
        business_line=draw(ENUM),
        category=draw(ENUM),
        statuses=draw(st.lists(st.one_of(st.integers(0, 8), INT32), max_size=20)),
        agent_id=draw(INT64),
        city=draw(st.one_of(st.just(""), SLUG, TEXT)),
        page=common_pb2.PageRequest(
            page_size=draw(st.one_of(st.integers(-1, 600), INT32)),
            page_token=_token(draw) if draw(st.booleans()) else "",
        ),
    )
    for field in ("created_from", "created_to"):
        if draw(st.booleans()):
            ts = getattr(req, field)
            ts.seconds = draw(st.one_of(INT64, st.integers(0, 4_000_000_000)))
            ts.nanos = draw(st.one_of(INT32, st.integers(0, 999_999_999)))
    return req


def _call(fn: object) -> grpc.StatusCode:
    try:
        fn()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@FUZZ
@given(case=clue_requests())
def test_create_clue_never_internal(
    shared_service: Service, case: tuple[str, pb.CreateClueRequest]
) -> None:
    mode, req = case
    code = _call(lambda: shared_service.stub.CreateClue(req, timeout=30))
    assert code not in BAD
    if mode == "valid":  # a reused random key may meet another payload
        assert code in {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS}
    else:
        assert code in {
            grpc.StatusCode.OK,
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.ALREADY_EXISTS,
        }


@FUZZ
@given(req=list_requests())
def test_list_tasks_never_internal(shared_service: Service, req: pb.ListTasksRequest) -> None:
    code = _call(lambda: shared_service.stub.ListTasks(req, timeout=30))
    assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


@FUZZ
@given(
    agent=st.builds(
        pb.Agent,
        id=INT64,
        name=TEXT,
        business_line=ENUM,
        cities=st.lists(st.one_of(SLUG, TEXT), max_size=55),
        categories=st.lists(ENUM, max_size=55),
        brands=st.lists(TEXT, max_size=55),
        capacity=INT32,
        presence=ENUM,
    ),
    task_id=INT64,
    agent_id=INT64,
    text=TEXT,
    seconds=INT64,
)
def test_other_rpcs_never_internal(
    shared_service: Service, agent: pb.Agent, task_id: int, agent_id: int, text: str, seconds: int
) -> None:
    stub = shared_service.stub
    calls = [
        lambda: stub.UpsertAgent(pb.UpsertAgentRequest(agent=agent)),
        lambda: stub.GetAgent(pb.GetAgentRequest(id=agent_id)),
        lambda: stub.SetPresence(pb.SetPresenceRequest(agent_id=agent_id, presence=agent.presence)),
        lambda: stub.GetTask(pb.GetTaskRequest(id=task_id)),
        lambda: stub.AcceptTask(pb.AcceptTaskRequest(task_id=task_id, agent_id=agent_id)),
        lambda: stub.RejectTask(
            pb.RejectTaskRequest(task_id=task_id, agent_id=agent_id, reason=text)
        ),
        lambda: stub.FailTask(pb.FailTaskRequest(task_id=task_id, agent_id=agent_id, reason=text)),
        lambda: stub.CancelTask(pb.CancelTaskRequest(task_id=task_id, reason=text)),
        lambda: stub.CompleteTask(
            pb.CompleteTaskRequest(
                task_id=task_id, agent_id=agent_id, note=text, revisit_at={"seconds": seconds}
            )
        ),
        lambda: stub.QueueStats(pb.QueueStatsRequest(business_line=agent.business_line)),
        lambda: stub.SetCustomerStar(pb.SetCustomerStarRequest(customer_id=task_id, star=True)),
        lambda: stub.RecordCall(
            pb.RecordCallRequest(
                call_id=text,
                task_id=task_id,
                agent_id=agent_id,
                call_type=agent.presence,
                provider=agent.business_line,
                outcome=agent.capacity % 7,
                started_at={"seconds": seconds},
                duration_seconds=agent.capacity,
                note=text,
            )
        ),
        lambda: stub.SignIn(pb.SignInRequest(agent_id=agent_id, ttl_seconds=agent.capacity)),
        lambda: stub.GetAgent(
            # (metadata values must be printable ASCII, or the client refuses to send them)
            pb.GetAgentRequest(id=agent_id),
            metadata=(("authorization", "Bearer " + "".join(c for c in text if " " < c <= "~")),),
        ),
    ]
    for call in calls:
        assert _call(call) not in BAD
