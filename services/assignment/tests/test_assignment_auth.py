"""Agent sign-in for the console: signed tokens, and what a call carrying one may do."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from assignment_testlib import SALE, ManualClock, OfferReader, Service
from crm.assignment.v1 import assignment_pb2 as pb
from crm_assignment.api.auth import bearer_metadata
from crm_assignment.api.convert import timestamp
from crm_assignment.domain.token import InvalidToken, TokenSigner
from crm_common.errors import error_reason
from crm_devstack.apps import rpc_error

SECRET = b"0123456789abcdef-test-secret"
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- tokens (pure)


def test_token_round_trip_and_expiry() -> None:
    signer = TokenSigner(SECRET)
    token = signer.issue(42, T0 + timedelta(hours=1))
    assert token.startswith("crm1.42.")
    assert signer.verify(token, T0) == 42
    assert signer.verify(token, T0 + timedelta(minutes=59, seconds=59)) == 42
    with pytest.raises(InvalidToken, match="expired"):
        signer.verify(token, T0 + timedelta(hours=1))


def test_tampered_or_foreign_tokens_are_refused() -> None:
    signer = TokenSigner(SECRET)
    token = signer.issue(42, T0 + timedelta(hours=1))
    _, agent, expires, sig = token.split(".")
    forged = [
        f"crm1.43.{expires}.{sig}",  # another agent, same signature
        f"crm1.{agent}.{int(expires) + 3600}.{sig}",  # a later expiry
        TokenSigner(b"another-secret-of-16+").issue(42, T0 + timedelta(hours=1)),
        token[:-1] + ("A" if token[-1] != "A" else "B"),
        "",
        "garbage",
        f"crm2.{agent}.{expires}.{sig}",
        f"crm1.042.{expires}.{sig}",
    ]
    for bad in forged:
        with pytest.raises(InvalidToken):
            signer.verify(bad, T0)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        TokenSigner(b"short")


# --------------------------------------------------------------------------- the service


@pytest.fixture
def svc(service: Service) -> Service:
    service.agent(1, line=SALE, capacity=3)
    service.agent(2, line=SALE, capacity=3)
    return service


def _sign_in(svc: Service, agent_id: int, **kw: Any) -> tuple[tuple[str, str]]:
    r = svc.stub.SignIn(pb.SignInRequest(agent_id=agent_id, **kw))
    assert r.agent.id == agent_id
    return bearer_metadata(r.token)


def _code(fn: Callable[[], Any]) -> grpc.StatusCode:
    code = rpc_error(fn).code()
    assert code is not None
    return code


def test_sign_in(svc: Service, clock: ManualClock) -> None:
    r = svc.stub.SignIn(pb.SignInRequest(agent_id=1))
    ttl = svc.settings.auth_token_ttl_s
    assert r.expires_at.ToDatetime(UTC) == clock().replace(microsecond=0) + timedelta(seconds=ttl)
    short = svc.stub.SignIn(pb.SignInRequest(agent_id=1, ttl_seconds=60))
    assert short.expires_at.ToDatetime(UTC) == clock().replace(microsecond=0) + timedelta(
        seconds=60
    )
    assert _code(lambda: svc.stub.SignIn(pb.SignInRequest(agent_id=77))) == (
        grpc.StatusCode.NOT_FOUND
    )
    bad = pb.SignInRequest(agent_id=0, ttl_seconds=ttl + 1)
    assert _code(lambda: svc.stub.SignIn(bad)) == grpc.StatusCode.INVALID_ARGUMENT
    me = bearer_metadata(r.token)
    # a token may renew itself, not sign in as somebody else
    assert svc.stub.SignIn(pb.SignInRequest(agent_id=1), metadata=me).token
    err = rpc_error(lambda: svc.stub.SignIn(pb.SignInRequest(agent_id=2), metadata=me))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_invalid_and_expired_tokens_are_unauthenticated(svc: Service, clock: ManualClock) -> None:
    me = _sign_in(svc, 1, ttl_seconds=60)
    get = pb.GetAgentRequest(id=1)
    assert svc.stub.GetAgent(get, metadata=me).agent.id == 1
    for header in ("Bearer nope", "Basic dXNlcjpwYXNz", "Bearer ", me[0][1] + "x"):
        err = rpc_error(lambda h=header: svc.stub.GetAgent(get, metadata=(("authorization", h),)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, header
    clock.advance(61)
    err = rpc_error(lambda: svc.stub.GetAgent(get, metadata=me))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(err) == "INVALID_TOKEN"
    assert "expired" in (err.details() or "")
    assert svc.stub.GetAgent(get).agent.id == 1  # no header: a trusted service call


def test_an_agent_acts_only_for_itself(svc: Service) -> None:
    task_id = svc.clue("au-1", "13800000001").task.id
    me, other = _sign_in(svc, 1), _sign_in(svc, 2)
    # the offer stream of another agent
    call = svc.stub.StreamOffers(pb.StreamOffersRequest(agent_id=1), metadata=other)
    with pytest.raises(grpc.RpcError) as info:
        next(iter(call))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reader = OfferReader(svc.stub, 1)  # (a service call)
    try:
        offer = reader.next()
    finally:
        reader.close()
    holder = offer.task.agent_id
    assert holder in (1, 2)
    mine, theirs = (me, other) if holder == 1 else (other, me)
    s = svc.stub
    forbidden: list[Callable[[], Any]] = [
        lambda: s.AcceptTask(
            pb.AcceptTaskRequest(task_id=task_id, agent_id=holder), metadata=theirs
        ),
        lambda: s.RejectTask(
            pb.RejectTaskRequest(task_id=task_id, agent_id=holder), metadata=theirs
        ),
        lambda: s.SetPresence(
            pb.SetPresenceRequest(agent_id=holder, presence=pb.PRESENCE_BREAK), metadata=theirs
        ),
        lambda: s.GetAgent(pb.GetAgentRequest(id=holder), metadata=theirs),
        lambda: s.ListTasks(pb.ListTasksRequest(agent_id=holder), metadata=theirs),
    ]
    for fn in forbidden:
        assert _code(fn) == grpc.StatusCode.PERMISSION_DENIED
    s.AcceptTask(pb.AcceptTaskRequest(task_id=task_id, agent_id=holder), metadata=mine)
    record = pb.RecordCallRequest(
        call_id="au-call", task_id=task_id, agent_id=holder, provider=pb.TELEPHONY_PROVIDER_ZT,
        outcome=pb.CALL_OUTCOME_CONNECTED, started_at=timestamp(svc.clock()),
    )  # fmt: skip
    assert _code(lambda: s.RecordCall(record, metadata=theirs)) == grpc.StatusCode.PERMISSION_DENIED
    s.RecordCall(record, metadata=mine)
    complete = pb.CompleteTaskRequest(task_id=task_id, agent_id=holder)
    fail = pb.FailTaskRequest(task_id=task_id, agent_id=holder, reason="x")
    assert _code(lambda: s.CompleteTask(complete, metadata=theirs)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert _code(lambda: s.FailTask(fail, metadata=theirs)) == grpc.StatusCode.PERMISSION_DENIED
    # reads: only what was offered to the caller; NOT_FOUND hides the others
    assert s.GetTask(pb.GetTaskRequest(id=task_id), metadata=mine).task.id == task_id
    err = rpc_error(lambda: s.GetTask(pb.GetTaskRequest(id=task_id), metadata=theirs))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert [t.id for t in s.ListTasks(pb.ListTasksRequest(), metadata=mine).tasks] == [task_id]
    assert list(s.ListTasks(pb.ListTasksRequest(), metadata=theirs).tasks) == []
    assert len(s.ListTasks(pb.ListTasksRequest()).tasks) == 1  # a service sees all
    s.CompleteTask(complete, metadata=mine)
    # a finished task stays readable by its agent
    assert s.GetTask(pb.GetTaskRequest(id=task_id), metadata=mine).task.id == task_id


def test_service_only_rpcs_refuse_agent_tokens(svc: Service) -> None:
    me = _sign_in(svc, 1)
    s = svc.stub
    clue = pb.CreateClueRequest(
        idempotency_key="au-x", phone="13800000002", business_line=SALE, source="app",
        city="beijing",
    )  # fmt: skip
    calls: list[Callable[[], Any]] = [
        lambda: s.CreateClue(clue, metadata=me),
        lambda: s.UpsertAgent(
            pb.UpsertAgentRequest(agent=pb.Agent(id=1, name="me", business_line=SALE, capacity=9)),
            metadata=me,
        ),
        lambda: s.CancelTask(pb.CancelTaskRequest(task_id=1, reason="x"), metadata=me),
        lambda: s.SetCustomerStar(pb.SetCustomerStarRequest(customer_id=1), metadata=me),
        lambda: s.ExpireOffer(pb.ExpireOfferRequest(task_id=1, offer_event_id=1), metadata=me),
        lambda: s.WakeRevisit(pb.WakeRevisitRequest(task_id=1), metadata=me),
    ]
    for fn in calls:
        err = rpc_error(fn)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(err) == "SERVICE_ONLY"
    assert s.QueueStats(pb.QueueStatsRequest(), metadata=me).queues  # aggregate reads allowed
    assert s.CreateClue(clue).task.id > 0  # the same call from a service


def test_tokens_survive_a_restart_with_a_configured_secret(
    migrated_db: str, etcd_endpoint: str, config_prefix: str
) -> None:
    from assignment_testlib import settings_for

    settings = settings_for(migrated_db, etcd_endpoint, config_prefix, auth_token_secret="s" * 32)
    first = Service(settings, ManualClock())
    try:
        first.agent(5, line=SALE)
        token = first.stub.SignIn(pb.SignInRequest(agent_id=5)).token
    finally:
        first.close()
    second = Service(settings, ManualClock())
    try:
        got = second.stub.GetAgent(pb.GetAgentRequest(id=5), metadata=bearer_metadata(token))
        assert got.agent.id == 5
    finally:
        second.close()


async def test_a_replica_without_the_required_secret_refuses_to_start(
    migrated_db: str, etcd_endpoint: str, config_prefix: str
) -> None:
    """Several replicas (the chart sets CRM_ASSIGNMENT_AUTH_TOKEN_SECRET_REQUIRED): a
    random per-process secret would make tokens fail on the other replicas."""
    from assignment_testlib import settings_for
    from crm_assignment.app import build_app

    settings = settings_for(
        migrated_db, etcd_endpoint, config_prefix, auth_token_secret_required=True
    )
    app = build_app(settings)
    with pytest.raises(RuntimeError, match="CRM_ASSIGNMENT_AUTH_TOKEN_SECRET is not set"):
        await app.start()
    await app.stop(0)
    # with the secret it starts
    app = build_app(settings.model_copy(update={"auth_token_secret": "s" * 32}))
    await app.start()
    await app.stop(0)
