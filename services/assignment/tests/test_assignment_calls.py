"""RecordCall: idempotent call records on tasks in progress, shown in the task detail and
written to the BI outbox (FactCallRecord, masked phone only); presence changes written to
the BI outbox (AgentPresenceChanged) only when the presence really changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro
import grpc
import pytest
from assignment_testlib import SALE, ManualClock, OfferReader, Service
from crm.assignment.v1 import assignment_pb2 as pb
from crm_assignment.api.convert import timestamp
from crm_assignment.domain.bi_events import (
    CALL_RECORD_SCHEMA,
    PRESENCE_SCHEMA,
    call_record_payload,
    presence_payload,
)
from crm_assignment.domain.model import (
    BusinessLine,
    CallOutcome,
    CallRecord,
    CallType,
    Presence,
    TelephonyProvider,
)
from crm_assignment.store.schema import BiOutboxRow, CallRecordRow
from crm_bilog.schemas import AVSC_DIR, load_schema_file
from crm_common.errors import error_reason, field_violations
from crm_devstack.apps import rpc_error
from sqlalchemy import select
from sqlalchemy.orm import Session

PHONE = "13812345678"


def _schema(name: str) -> Any:
    return fastavro.parse_schema(load_schema_file(AVSC_DIR / f"{name}.avsc"))


def _in_progress(svc: Service, key: str, phone: str, agent_id: int) -> int:
    """A task taken by ``agent_id`` (offered, accepted): IN_PROGRESS."""
    task_id = svc.clue(key, phone).task.id
    svc.agent(agent_id, line=SALE)
    reader = OfferReader(svc.stub, agent_id)
    try:
        assert reader.next().task.id == task_id
    finally:
        reader.close()
    svc.stub.AcceptTask(pb.AcceptTaskRequest(task_id=task_id, agent_id=agent_id))
    return task_id


def _call(
    task_id: int, agent_id: int, call_id: str = "call-1", at: datetime | None = None, **kw: Any
) -> pb.RecordCallRequest:
    """A RecordCall request; the call started ``at`` (default: an hour ago, in real time)."""
    fields: dict[str, Any] = {
        "call_id": call_id,
        "task_id": task_id,
        "agent_id": agent_id,
        "provider": pb.TELEPHONY_PROVIDER_ZT,
        "outcome": pb.CALL_OUTCOME_CONNECTED,
        "duration_seconds": 95,
        "note": "wants a test drive",
    }
    fields.update(kw)
    req = pb.RecordCallRequest(**fields)
    if "started_at" not in kw:
        start = at or datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
        req.started_at.CopyFrom(timestamp(start))
    return req


def _outbox(svc: Service, schema: str) -> list[BiOutboxRow]:
    with Session(svc.app.engine) as s:
        return list(
            s.scalars(
                select(BiOutboxRow)
                .where(BiOutboxRow.schema_name == schema)
                .order_by(BiOutboxRow.id)
            )
        )


@pytest.fixture
def svc(service: Service, clock: ManualClock) -> Service:
    clock.advance(0)  # the manual clock starts at the real time
    return service


def test_record_call_shows_in_the_detail_and_goes_to_the_outbox(
    svc: Service, clock: ManualClock
) -> None:
    task_id = _in_progress(svc, "rc-1", PHONE, 7)
    clock.advance(300)
    started = svc.clock() - timedelta(minutes=3)
    r = svc.stub.RecordCall(_call(task_id, 7, started_at=timestamp(started)))
    assert not r.replayed
    call = r.call
    assert call.id > 0
    assert (call.task_id, call.agent_id, call.call_id) == (task_id, 7, "call-1")
    assert call.call_type == pb.CALL_TYPE_CALLOUT  # unset means CALLOUT
    assert call.provider == pb.TELEPHONY_PROVIDER_ZT
    assert call.outcome == pb.CALL_OUTCOME_CONNECTED
    assert call.duration_seconds == 95
    assert call.started_at.ToDatetime(UTC) == started.replace(microsecond=started.microsecond)
    second = svc.stub.RecordCall(
        _call(task_id, 7, "call-2", svc.clock(), outcome=pb.CALL_OUTCOME_NO_ANSWER,
              call_type=pb.CALL_TYPE_CALLIN, provider=pb.TELEPHONY_PROVIDER_TR, note="")
    ).call  # fmt: skip
    detail = svc.task(task_id)
    assert [c.call_id for c in detail.calls] == ["call-1", "call-2"]
    assert detail.calls[1].outcome == pb.CALL_OUTCOME_NO_ANSWER
    assert detail.calls[1] == second

    rows = _outbox(svc, CALL_RECORD_SCHEMA)
    assert len(rows) == 2
    payload = rows[0].payload
    fastavro.validation.validate(payload, _schema(CALL_RECORD_SCHEMA), raise_errors=True)
    assert payload["business_line"] == 1
    assert payload["bundle_id"] == str(task_id)
    assert payload["contact_phone"] == "138****5678"  # masked, never the number
    assert payload["call_tag_id"] == "CONNECTED"
    assert payload["call_type"] == "CALLOUT"
    assert payload["provider_type"] == "ZT"
    header = payload["operator_header"]
    assert header["operator_id"] == 7
    assert header["timestamp"] == int(started.timestamp() * 1000)
    assert header["request_id"]  # the call's x-request-id
    assert header["http_host"]
    assert rows[1].payload["call_type"] == "CALLIN"
    assert rows[1].payload["provider_type"] == "TR"


def test_record_call_is_idempotent_by_call_id(svc: Service) -> None:
    task_id = _in_progress(svc, "rc-2", PHONE, 8)
    at = svc.clock()
    first = svc.stub.RecordCall(_call(task_id, 8, "same", at))
    again = svc.stub.RecordCall(_call(task_id, 8, "same", at))
    assert again.replayed
    assert again.call == first.call
    # a retry still answers after the task is completed
    svc.stub.CompleteTask(pb.CompleteTaskRequest(task_id=task_id, agent_id=8))
    assert svc.stub.RecordCall(_call(task_id, 8, "same", at)).call == first.call
    # the same id for another call
    other = _call(task_id, 8, "same", at, duration_seconds=5)
    err = rpc_error(lambda: svc.stub.RecordCall(other))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(err) == "CALL_ID_REUSED"
    assert len(svc.task(task_id).calls) == 1
    assert len(_outbox(svc, CALL_RECORD_SCHEMA)) == 1


def test_only_the_agent_holding_the_task_in_progress_records(svc: Service) -> None:
    task_id = _in_progress(svc, "rc-3", PHONE, 9)
    svc.agent(10, line=SALE)
    err = rpc_error(lambda: svc.stub.RecordCall(_call(task_id, 10, "other")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err) == "NOT_TASK_AGENT"
    err = rpc_error(lambda: svc.stub.RecordCall(_call(task_id + 1000, 9, "gone")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(lambda: svc.stub.RecordCall(_call(task_id, 999, "nobody")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    waiting = svc.clue("rc-3b", "13900001111").task.id  # UNASSIGNED
    err = rpc_error(lambda: svc.stub.RecordCall(_call(waiting, 9, "early")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err) == "TASK_NOT_IN_PROGRESS"
    svc.stub.FailTask(pb.FailTaskRequest(task_id=task_id, agent_id=9, reason="no deal"))
    err = rpc_error(lambda: svc.stub.RecordCall(_call(task_id, 9, "late")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert svc.task(task_id).calls == []
    assert _outbox(svc, CALL_RECORD_SCHEMA) == []


def test_a_call_starts_after_the_agent_got_the_task_and_not_in_the_future(
    svc: Service, clock: ManualClock
) -> None:
    """The start of a call lies between the offer of the task to the recording agent and
    now, give or take a minute of clock skew (the console's clock is not the service's):
    INVALID_ARGUMENT on started_at otherwise, nothing recorded."""
    offered = svc.clock()
    task_id = _in_progress(svc, "rc-4", PHONE, 11)
    clock.advance(600)  # ten minutes after the offer the agent records its calls
    now = svc.clock()
    for n, start in enumerate(
        [
            offered - timedelta(minutes=2),  # before the agent got the task
            offered - timedelta(days=3),  # the console's "now - duration" of a long call
            now + timedelta(minutes=2),  # in the future beyond the skew
        ]
    ):
        bad = _call(task_id, 11, f"bad-{n}", start)
        err = rpc_error(lambda: svc.stub.RecordCall(bad))  # noqa: B023 (called at once)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, start
        assert [f for f, _ in field_violations(err)] == ["started_at"]
    assert svc.task(task_id).calls == []
    assert _outbox(svc, CALL_RECORD_SCHEMA) == []
    # within the skew on both sides, and anything in between, is a call
    for n, start in enumerate(
        [
            offered - timedelta(seconds=30),
            offered + timedelta(minutes=5),
            now + timedelta(seconds=30),
        ]
    ):
        svc.stub.RecordCall(_call(task_id, 11, f"ok-{n}", start))
    assert len(svc.task(task_id).calls) == 3


def test_the_start_bound_is_this_agents_offer_not_an_earlier_agents(
    svc: Service, clock: ManualClock
) -> None:
    """A task lost by agent 12 (rejected) and then taken by 13: 13's calls start at 13's
    offer, not at 12's."""
    first_offer = svc.clock()
    task_id = svc.clue("rc-5", "13900002222").task.id
    svc.agent(12, line=SALE)
    reader = OfferReader(svc.stub, 12)
    try:
        assert reader.next().task.id == task_id
    finally:
        reader.close()
    svc.stub.RejectTask(pb.RejectTaskRequest(task_id=task_id, agent_id=12, reason="busy"))
    svc.stub.SetPresence(pb.SetPresenceRequest(agent_id=12, presence=pb.PRESENCE_OFFLINE))
    clock.advance(3600)
    second_offer = svc.clock()
    svc.agent(13, line=SALE)
    reader = OfferReader(svc.stub, 13)
    try:
        assert reader.next().task.id == task_id
    finally:
        reader.close()
    svc.stub.AcceptTask(pb.AcceptTaskRequest(task_id=task_id, agent_id=13))
    clock.advance(60)
    early = _call(task_id, 13, "before-13", first_offer + timedelta(minutes=5))
    err = rpc_error(lambda: svc.stub.RecordCall(early))
    assert [f for f, _ in field_violations(err)] == ["started_at"]
    assert svc.stub.RecordCall(_call(task_id, 13, "after-13", second_offer)).call.agent_id == 13


def test_record_call_validation_names_every_bad_field(svc: Service) -> None:
    now = svc.clock()
    req = pb.RecordCallRequest(
        call_id="", task_id=0, agent_id=-1, call_type=pb.CallType.ValueType(9),
        duration_seconds=86401, note="x" * 501,
    )  # fmt: skip
    err = rpc_error(lambda: svc.stub.RecordCall(req))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {f for f, _ in field_violations(err)}
    assert fields == {
        "call_id", "task_id", "agent_id", "call_type", "provider", "outcome", "started_at",
        "duration_seconds", "note",
    }  # fmt: skip
    future = _call(1, 1, started_at=timestamp(now + timedelta(hours=1)))
    err = rpc_error(lambda: svc.stub.RecordCall(future))
    assert [f for f, _ in field_violations(err)] == ["started_at"]
    old = _call(1, 1, started_at=timestamp(now - timedelta(days=400)))
    assert [f for f, _ in field_violations(rpc_error(lambda: svc.stub.RecordCall(old)))] == [
        "started_at"
    ]
    bad_key = _call(1, 1, call_id="caf\u00e9")
    assert [f for f, _ in field_violations(rpc_error(lambda: svc.stub.RecordCall(bad_key)))] == [
        "call_id"
    ]


def test_presence_changes_go_to_the_outbox_only_when_they_change(svc: Service) -> None:
    svc.agent(21, line=SALE, idle=False)  # created OFFLINE: no change yet
    assert _outbox(svc, PRESENCE_SCHEMA) == []
    for presence in (pb.PRESENCE_IDLE, pb.PRESENCE_IDLE, pb.PRESENCE_BREAK, pb.PRESENCE_OFFLINE):
        svc.stub.SetPresence(pb.SetPresenceRequest(agent_id=21, presence=presence))
    rows = _outbox(svc, PRESENCE_SCHEMA)
    got = [(r.payload["from_presence"], r.payload["to_presence"]) for r in rows]
    assert got == [("OFFLINE", "IDLE"), ("IDLE", "BREAK"), ("BREAK", "OFFLINE")]
    schema = _schema(PRESENCE_SCHEMA)
    for r in rows:
        fastavro.validation.validate(r.payload, schema, raise_errors=True)
        assert r.payload["agent_id"] == 21
        assert r.payload["business_line"] == 1
        assert r.payload["at"] == int(svc.clock().timestamp() * 1000)


def test_bi_payloads_follow_their_schemas() -> None:
    at = datetime(2026, 1, 5, 9, 30, 1, 234_567, tzinfo=UTC)
    call = CallRecord(
        id=1, call_id="c", task_id=42, agent_id=2**31, call_type=CallType.CALLIN,
        provider=TelephonyProvider.RL, started_at=at, duration_s=0,
        outcome=CallOutcome.WRONG_NUMBER, note="", recorded_at=at,
    )  # fmt: skip
    payload = call_record_payload(
        call, business_line=BusinessLine.FINANCE, masked_phone="138****5678",
        host="pod-1", request_id="r-1",
    )  # fmt: skip
    fastavro.validation.validate(payload, _schema(CALL_RECORD_SCHEMA), raise_errors=True)
    assert payload["operator_header"] == {
        "timestamp": 1767605401234,
        "http_host": "pod-1",
        "request_id": "r-1",
        "operator_id": None,  # does not fit the schema's int
    }
    assert payload["call_tag_id"] == "WRONG_NUMBER"
    assert payload["business_line"] == 3
    p = presence_payload(5, BusinessLine.AFTER_SALE, None, Presence.IDLE, at)
    fastavro.validation.validate(p, _schema(PRESENCE_SCHEMA), raise_errors=True)
    assert p == {"agent_id": 5, "business_line": 2, "from_presence": None,
                 "to_presence": "IDLE", "at": 1767605401234}  # fmt: skip


def test_call_records_are_stored_without_any_phone(svc: Service) -> None:
    task_id = _in_progress(svc, "rc-9", PHONE, 30)
    svc.stub.RecordCall(_call(task_id, 30, "np", svc.clock()))
    with Session(svc.app.engine) as s:
        (row,) = s.scalars(select(CallRecordRow))
        values = [str(getattr(row, c.key)) for c in CallRecordRow.__table__.columns]
    assert not any("12345678" in v for v in values)
