"""The gRPC API in-process: idempotent Schedule, precise INVALID_ARGUMENT field paths,
Get/List/Cancel/Rerun, the typed client, and a fuzz of Schedule (never INTERNAL)."""

from __future__ import annotations

import uuid
from datetime import UTC, timedelta
from typing import Any

import grpc
import pytest
from crm.common.v1 import common_pb2
from crm.scheduler.v1 import scheduler_pb2 as pb
from crm_common.errors import error_reason, field_violations
from crm_scheduler.client import SchedulerClient
from crm_scheduler.domain.model import default_idempotency_key, job_uuid
from crm_scheduler.store import SchedulerStore
from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduler_testlib import TARGET_METHOD, ApiService, later, now
from sqlalchemy import text

ADDRESS = "127.0.0.1:9"


def ts(seconds_from_now: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(later(seconds_from_now))
    return out


def dur(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(timedelta(seconds=seconds))
    return out


def target(**kw: Any) -> pb.Target:
    return pb.Target(**{"method": TARGET_METHOD, "address": ADDRESS, "request": b"x", **kw})


def request(**kw: Any) -> pb.ScheduleRequest:
    base: dict[str, Any] = {"name": "recycle-offer", "target": target(), "eta": ts(3600)}
    base.update(kw)
    return pb.ScheduleRequest(**base)


def fails(api: ApiService, req: pb.ScheduleRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        api.stub.Schedule(req, timeout=10)
    return info.value


def set_state(store: SchedulerStore, key: str, state: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            text("UPDATE job SET state = :s, due_at = NULL WHERE idempotency_key = :k"),
            {"s": state, "k": key},
        )


def test_schedule_is_idempotent_by_key(api: ApiService) -> None:
    req = request(name="idem", eta=ts(600), max_retries=2)
    first = api.stub.Schedule(req, timeout=10)
    assert first.created
    job = first.job
    eta = req.eta.ToDatetime(tzinfo=UTC)
    assert job.idempotency_key == default_idempotency_key("idem", eta)
    assert job.id == job_uuid(job.idempotency_key)
    assert job.state == pb.JOB_STATE_SCHEDULED
    assert job.max_retries == 2
    assert job.attempt_deadline.ToTimedelta() == timedelta(seconds=30)
    assert job.backoff.initial.ToTimedelta() == timedelta(seconds=1)
    assert job.next_run_time == req.eta
    again = api.stub.Schedule(req, timeout=10)
    assert not again.created
    assert again.job.id == job.id
    err = fails(api, request(name="idem", eta=req.eta, max_retries=3))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(err) == "IDEMPOTENCY_KEY_REUSED"


def test_delay_with_a_key_is_idempotent(api: ApiService) -> None:
    req = request(name="revisit", eta=None, delay=dur(120), idempotency_key="revisit/task-7")
    first = api.stub.Schedule(req, timeout=10)
    second = api.stub.Schedule(req, timeout=10)
    assert first.created
    assert not second.created
    assert second.job.id == first.job.id
    eta = first.job.eta.ToDatetime()
    assert abs((eta - later(120).replace(tzinfo=None)).total_seconds()) < 10


CASES: list[tuple[str, dict[str, Any], str]] = [
    ("no name", {"name": ""}, "name"),
    ("bad name", {"name": "bad name!"}, "name"),
    ("no target", {"target": None}, "target"),
    ("malformed method", {"target": target(method="Apply")}, "target.method"),
    ("unknown service", {"target": target(method="/evil.v1.Svc/Do")}, "target.method"),
    ("no address", {"target": target(address="")}, "target.address"),
    ("address without port", {"target": target(address="assignment")}, "target.address"),
    ("port 0", {"target": target(address="h:0")}, "target.address"),
    ("port too big", {"target": target(address="h:70000")}, "target.address"),
    ("oversized", {"target": target(request=b"x" * (64 * 1024 + 1))}, "target.request"),
    ("no time", {"eta": None}, "eta"),
    ("eta far in the past", {"eta": ts(-120)}, "eta"),
    ("eta too far ahead", {"eta": ts(401 * 86400)}, "eta"),
    ("bad timestamp", {"eta": timestamp_pb2.Timestamp(seconds=1, nanos=-5)}, "eta"),
    ("negative delay", {"eta": None, "delay": dur(-1)}, "delay"),
    ("max_retries < 0", {"max_retries": -1}, "max_retries"),
    ("max_retries > 100", {"max_retries": 101}, "max_retries"),
    ("tiny backoff", {"backoff": pb.Backoff(initial=dur(0.001))}, "backoff.initial"),
    (
        "backoff max < initial",
        {"backoff": pb.Backoff(initial=dur(2), max=dur(1))},
        "backoff.max",
    ),
    ("tiny deadline", {"attempt_deadline": dur(0.01)}, "attempt_deadline"),
    ("huge deadline", {"attempt_deadline": dur(3600)}, "attempt_deadline"),
    ("non-ascii key", {"idempotency_key": "clé"}, "idempotency_key"),
    ("long key", {"idempotency_key": "k" * 256}, "idempotency_key"),
]


@pytest.mark.parametrize(("case", "change", "field"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_the_field(
    api: ApiService, case: str, change: dict[str, Any], field: str
) -> None:
    kw: dict[str, Any] = {"name": "bad-input", "target": target(), "eta": ts(60)}
    kw.update(change)
    err = fails(api, pb.ScheduleRequest(**{k: v for k, v in kw.items() if v is not None}))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [f for f, _ in field_violations(err)]
    assert fields == [field], (case, field_violations(err))


def test_every_violation_is_reported_at_once(api: ApiService) -> None:
    err = fails(
        api,
        pb.ScheduleRequest(
            name="",
            target=pb.Target(method="x", address="y"),
            max_retries=500,
        ),
    )
    fields = {f for f, _ in field_violations(err)}
    assert fields == {"name", "target.method", "target.address", "eta", "max_retries"}


def test_eta_slightly_in_the_past_runs_now(api: ApiService) -> None:
    resp = api.stub.Schedule(request(name="late", eta=ts(-5)), timeout=10)
    assert resp.job.state == pb.JOB_STATE_SCHEDULED


def test_get_cancel_rerun(api: ApiService, module_store: SchedulerStore) -> None:
    job = api.stub.Schedule(request(name="gcr", idempotency_key="gcr-1"), timeout=10).job
    assert api.stub.Get(pb.GetRequest(id=job.id), timeout=10).job == job
    assert api.stub.Get(pb.GetRequest(idempotency_key="gcr-1"), timeout=10).job.id == job.id
    cancelled = api.stub.Cancel(pb.CancelRequest(id=job.id), timeout=10).job
    assert cancelled.state == pb.JOB_STATE_CANCELLED
    assert cancelled.HasField("finish_time")
    assert not cancelled.HasField("next_run_time")
    again = api.stub.Cancel(pb.CancelRequest(idempotency_key="gcr-1"), timeout=10).job
    assert again.state == pb.JOB_STATE_CANCELLED

    for state in ("RUNNING", "SUCCEEDED", "DEAD"):
        key = f"gcr-{state}"
        api.stub.Schedule(request(name="gcr", idempotency_key=key), timeout=10)
        set_state(module_store, key, state)
        with pytest.raises(grpc.RpcError) as info:
            api.stub.Cancel(pb.CancelRequest(idempotency_key=key), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(info.value) == "JOB_NOT_CANCELLABLE"

    with pytest.raises(grpc.RpcError) as info:
        api.stub.Rerun(pb.RerunRequest(idempotency_key="gcr-RUNNING"), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    rerun = api.stub.Rerun(pb.RerunRequest(idempotency_key="gcr-DEAD"), timeout=10).job
    assert rerun.state == pb.JOB_STATE_SCHEDULED
    assert rerun.reruns == 1


@pytest.mark.parametrize(
    ("kw", "field"),
    [({}, "id"), ({"id": "nope"}, "id"), ({"id": str(uuid.uuid4()), "idempotency_key": "k"}, "id")],
)
def test_bad_job_refs(api: ApiService, kw: dict[str, str], field: str) -> None:
    for call, msg in (
        (api.stub.Get, pb.GetRequest),
        (api.stub.Cancel, pb.CancelRequest),
        (api.stub.Rerun, pb.RerunRequest),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call(msg(**kw), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in field_violations(info.value)] == [field]


def test_unknown_jobs_are_not_found(api: ApiService) -> None:
    with pytest.raises(grpc.RpcError) as info:
        api.stub.Get(pb.GetRequest(id=str(uuid.uuid4())), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        api.stub.Cancel(pb.CancelRequest(idempotency_key="never-scheduled"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_filters_and_pages(api: ApiService) -> None:
    ids = [
        api.stub.Schedule(
            request(
                name="listed", idempotency_key=f"listed-{i}", target=target(address=f"h{i % 2}:1")
            ),
            timeout=10,
        ).job.id
        for i in range(5)
    ]
    api.stub.Cancel(pb.CancelRequest(id=ids[4]), timeout=10)
    seen: list[str] = []
    token = ""
    while True:
        resp = api.stub.List(
            pb.ListRequest(
                name="listed",
                states=[pb.JOB_STATE_SCHEDULED],
                page=common_pb2.PageRequest(page_size=2, page_token=token),
            ),
            timeout=10,
        )
        seen.extend(j.id for j in resp.jobs)
        token = resp.page.next_page_token
        if not token:
            break
    assert seen == ids[:4]
    by_address = api.stub.List(
        pb.ListRequest(name="listed", target_address="h0:1", target_method=TARGET_METHOD),
        timeout=10,
    )
    assert [j.id for j in by_address.jobs] == [ids[0], ids[2], ids[4]]
    cancelled = api.stub.List(
        pb.ListRequest(name="listed", states=[pb.JOB_STATE_CANCELLED]), timeout=10
    )
    assert [j.id for j in cancelled.jobs] == [ids[4]]
    first = api.stub.List(
        pb.ListRequest(name="listed", page=common_pb2.PageRequest(page_size=1)), timeout=10
    )
    for bad, field in (
        (
            pb.ListRequest(page=common_pb2.PageRequest(page_token=first.page.next_page_token)),
            "page.page_token",
        ),
        (pb.ListRequest(page=common_pb2.PageRequest(page_size=501)), "page.page_size"),
        (pb.ListRequest(states=[42]), "states[0]"),  # type: ignore[list-item]
    ):
        with pytest.raises(grpc.RpcError) as info:
            api.stub.List(bad, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in field_violations(info.value)] == [field]


async def test_typed_client(api: ApiService) -> None:
    async with SchedulerClient.connect(api.app.target, default_timeout=5) as client:
        result = await client.schedule(
            "client-job",
            method=TARGET_METHOD,
            address=ADDRESS,
            request=duration_pb2.Duration(seconds=3),
            delay=timedelta(minutes=5),
            idempotency_key="client-1",
            max_retries=1,
            backoff_initial=timedelta(milliseconds=100),
            attempt_deadline=timedelta(seconds=2),
        )
        assert result.created
        assert result.job.backoff.max.ToTimedelta() == timedelta(minutes=5)
        assert result.job.target.request == duration_pb2.Duration(seconds=3).SerializeToString()
        assert (await client.get(idempotency_key="client-1")).id == result.job.id
        assert await client.try_cancel(job_id=result.job.id)
        assert await client.try_cancel(job_id=result.job.id)  # cancelled already: fine
        assert not await client.try_cancel(idempotency_key="client-unknown")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.schedule(
                "client-job", method="bad", address=ADDRESS, request=b"", eta=now()
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ValueError, match="exactly one"):
            await client.schedule("x", method=TARGET_METHOD, address=ADDRESS, request=b"")


_int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
_durations = st.builds(duration_pb2.Duration, seconds=_int64, nanos=_int32)
_timestamps = st.builds(timestamp_pb2.Timestamp, seconds=_int64, nanos=_int32) | st.builds(
    lambda s: ts(s), st.floats(min_value=-1e6, max_value=1e6)
)
_methods = st.sampled_from([TARGET_METHOD, "/crm.a.v1.S/M", "", "/", "//"]) | st.text(max_size=300)
_addresses = st.sampled_from([ADDRESS, "[::1]:50051", "h:1", ":1", "h:"]) | st.text(max_size=300)


@st.composite
def schedule_requests(draw: st.DrawFn) -> pb.ScheduleRequest:
    req = pb.ScheduleRequest(
        name=draw(st.sampled_from(["fuzz", "a/b:c.d-e_f"]) | st.text(max_size=200)),
        idempotency_key=draw(st.text(max_size=300)),
    )
    if draw(st.booleans()):
        req.target.CopyFrom(
            pb.Target(
                method=draw(_methods),
                address=draw(_addresses),
                request=draw(st.binary(max_size=70_000)),
            )
        )
    when = draw(st.sampled_from(["eta", "delay", None]))
    if when == "eta":
        req.eta.CopyFrom(draw(_timestamps))
    elif when == "delay":
        req.delay.CopyFrom(draw(_durations))
    if draw(st.booleans()):
        req.max_retries = draw(_int32)
    if draw(st.booleans()):
        req.backoff.CopyFrom(pb.Backoff(initial=draw(_durations), max=draw(_durations)))
    if draw(st.booleans()):
        req.attempt_deadline.CopyFrom(draw(_durations))
    return req


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(req=schedule_requests())
def test_fuzzed_schedule_is_never_internal(api: ApiService, req: pb.ScheduleRequest) -> None:
    error: grpc.RpcError | None = None
    try:
        api.stub.Schedule(req, timeout=10)
    except grpc.RpcError as err:
        error = err
    if error is not None:
        code = error.code()
        assert code in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS}, (
            code,
            error.details(),
        )
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert field_violations(error)
