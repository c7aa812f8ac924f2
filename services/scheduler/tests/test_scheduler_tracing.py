"""Request ids and W3C trace context through the scheduler (issue #9): Schedule keeps the
caller's ``x-request-id`` and ``traceparent`` with the job, the pump's message carries
them, the worker's runner sends them on the target call (tracing off) or makes a CLIENT
span continuing them (tracing on, spans in the SDK's InMemorySpanExporter). Real
MariaDB, the API in-process, a real gRPC target; the runner gets messages directly."""

from __future__ import annotations

import io
import json
import logging
import random
import uuid
from datetime import timedelta

import pytest
from crm.scheduler.v1 import scheduler_pb2 as pb
from crm_common import tracing
from crm_common.logs import JsonFormatter
from crm_scheduler.domain.model import Dispatch, TraceOrigin
from crm_scheduler.store import SchedulerStore
from crm_scheduler.store.schema import JobRow
from crm_scheduler.worker.runner import JobRunner
from google.protobuf.duration_pb2 import Duration
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from scheduler_testlib import TARGET_METHOD, ApiService, TargetServer, now, spec
from sqlalchemy import select
from sqlalchemy.orm import Session

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def _runner(store: SchedulerStore) -> JobRunner:
    return JobRunner(
        lambda: store, worker_name="t", lease_grace_s=1, clock=now, rng=random.Random(5)
    )


def _run_due(store: SchedulerStore, keys: set[str]) -> list[Dispatch]:
    """Moves the due jobs (the pump's transaction) and runs them through a runner, each
    message through JSON-safe ``to_message``/``from_message`` as Celery carries it."""
    dispatches = [d for d in store.enqueue_due(now(), 100, 10) if d.idempotency_key in keys]
    runner = _runner(store)
    try:
        outcomes = runner.handle_batch([d.to_message() for d in dispatches])
    finally:
        runner.close()
    assert outcomes == ["succeeded"] * len(dispatches)
    return dispatches


def _hex(n: int, width: int) -> str:
    return format(n, f"0{width}x")


def test_message_carries_the_origin_and_older_messages_still_parse() -> None:
    d = Dispatch(
        job_id=1,
        uid="u",
        name="n",
        idempotency_key="k",
        method=TARGET_METHOD,
        address="127.0.0.1:1",
        request=b"",
        attempt=1,
        run_attempt=1,
        max_retries=0,
        backoff_initial_ms=10,
        backoff_max_ms=10,
        attempt_deadline_ms=100,
        due_at=now(),
        request_id="req-1",
        traceparent=TRACEPARENT,
    )
    assert Dispatch.from_message(d.to_message()) == d
    bare = d.to_message()
    del bare["request_id"], bare["traceparent"]  # a message of a scheduler before #9
    old = Dispatch.from_message(bare)
    assert (old.request_id, old.traceparent) == ("", "")
    with pytest.raises(TypeError):
        Dispatch.from_message({**bare, "traceparent": 7})


def test_stored_origin_reaches_the_target_with_tracing_off(
    store: SchedulerStore, target: TargetServer
) -> None:
    assert not tracing.enabled()
    t0 = now() - timedelta(milliseconds=10)
    store.schedule(spec("tr", target, t0, key="tr-with"), t0, TraceOrigin("req-1", TRACEPARENT))
    store.schedule(spec("tr", target, t0, key="tr-without"), t0, None)
    sent = {d.idempotency_key: d for d in _run_due(store, {"tr-with", "tr-without"})}
    assert (sent["tr-with"].request_id, sent["tr-with"].traceparent) == ("req-1", TRACEPARENT)
    assert (sent["tr-without"].request_id, sent["tr-without"].traceparent) == ("", "")
    seen = target.metadata["tr-with"]
    assert seen["x-request-id"] == "req-1"
    assert seen["traceparent"] == TRACEPARENT  # passed on as is: the trace goes on
    assert seen["x-idempotency-key"] == "tr-with"
    assert "x-request-id" not in target.metadata["tr-without"]
    assert "traceparent" not in target.metadata["tr-without"]


def test_worker_call_is_a_client_span_continuing_the_stored_trace(
    store: SchedulerStore, target: TargetServer, spans: InMemorySpanExporter
) -> None:
    t0 = now() - timedelta(milliseconds=10)
    store.schedule(spec("ts", target, t0, key="ts-traced"), t0, TraceOrigin("req-2", TRACEPARENT))
    store.schedule(spec("ts", target, t0, key="ts-new"), t0, TraceOrigin("req-3", ""))
    _run_due(store, {"ts-traced", "ts-new"})
    finished: list[ReadableSpan] = list(spans.get_finished_spans())
    assert len(finished) == 2
    (traced,) = [s for s in finished if s.parent is not None]
    assert traced.kind is SpanKind.CLIENT
    assert traced.name == TARGET_METHOD.lstrip("/")
    assert _hex(traced.context.trace_id, 32) == TRACE_ID
    assert traced.parent is not None
    assert _hex(traced.parent.span_id, 16) == PARENT_ID
    attributes = traced.attributes or {}
    assert attributes["crm.request_id"] == "req-2"
    assert attributes["rpc.grpc.status_code"] == 0
    assert traced.status.status_code is not StatusCode.ERROR
    # the target got the worker span's own traceparent (its child), same trace
    span_id = _hex(traced.context.span_id, 16)
    assert target.metadata["ts-traced"]["traceparent"] == f"00-{TRACE_ID}-{span_id}-01"
    assert target.metadata["ts-traced"]["x-request-id"] == "req-2"
    # no stored trace: a new one, still with the request id
    (fresh,) = [s for s in finished if s.parent is None]
    assert (fresh.attributes or {})["crm.request_id"] == "req-3"
    assert _hex(fresh.context.trace_id, 32) in target.metadata["ts-new"]["traceparent"]
    assert target.metadata["ts-new"]["x-request-id"] == "req-3"


def test_worker_log_lines_of_a_job_carry_its_request_id(
    store: SchedulerStore, target: TargetServer
) -> None:
    t0 = now() - timedelta(milliseconds=10)
    target.script["tl-fail"] = ["UNAVAILABLE"]
    store.schedule(spec("tl", target, t0, key="tl-fail"), t0, TraceOrigin("req-log", ""))
    (d,) = [d for d in store.enqueue_due(now(), 100, 10) if d.idempotency_key == "tl-fail"]
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("scheduler-worker"))
    worker_log = logging.getLogger("crm.scheduler.worker")
    worker_log.addHandler(handler)
    level = worker_log.level
    worker_log.setLevel(logging.INFO)
    runner = _runner(store)
    try:
        assert runner.handle(d.to_message()) == "retry"
    finally:
        runner.close()
        worker_log.removeHandler(handler)
        worker_log.setLevel(level)
    (line,) = [json.loads(x) for x in out.getvalue().splitlines() if "attempt failed" in x]
    assert line["request_id"] == "req-log"
    assert line["job_name"] == "tl"
    assert target.metadata["tl-fail"]["x-request-id"] == "req-log"


def _stored(store: SchedulerStore, key: str) -> tuple[str | None, str | None]:
    with Session(store.engine) as session:
        row = session.scalars(select(JobRow).where(JobRow.idempotency_key == key)).one()
        return row.request_id, row.traceparent


def _schedule(
    api: ApiService, target: TargetServer, key: str, metadata: tuple[tuple[str, str], ...]
) -> pb.ScheduleResponse:
    request = pb.ScheduleRequest(
        name="api-trace",
        target=pb.Target(method=TARGET_METHOD, address=target.address, request=b""),
        delay=Duration(seconds=3600),
        idempotency_key=key,
    )
    return api.stub.Schedule(request, metadata=metadata, timeout=10)


def test_schedule_keeps_the_callers_request_id_and_trace(
    api: ApiService, module_store: SchedulerStore, target: TargetServer
) -> None:
    key = f"api-{uuid.uuid4().hex[:8]}"
    _schedule(api, target, key, (("x-request-id", "req-api"), ("traceparent", TRACEPARENT)))
    assert _stored(module_store, key) == ("req-api", TRACEPARENT)
    # a retried Schedule from another request is the same job, which keeps its origin
    again = _schedule(api, target, key, (("x-request-id", "req-other"),))
    assert again.created is False
    assert _stored(module_store, key) == ("req-api", TRACEPARENT)
    # a malformed traceparent is not kept; a request id is always there (made if absent)
    bad = f"api-{uuid.uuid4().hex[:8]}"
    _schedule(api, target, bad, (("traceparent", "00-nonsense"),))
    request_id, traceparent = _stored(module_store, bad)
    assert request_id
    assert traceparent is None


def test_schedule_with_tracing_on_keeps_its_server_span(
    api: ApiService,
    module_store: SchedulerStore,
    target: TargetServer,
    spans: InMemorySpanExporter,
) -> None:
    key = f"api-{uuid.uuid4().hex[:8]}"
    _schedule(api, target, key, (("x-request-id", "req-on"), ("traceparent", TRACEPARENT)))
    (server,) = [
        s
        for s in spans.get_finished_spans()
        if s.name == "crm.scheduler.v1.SchedulerService/Schedule"
    ]
    assert server.parent is not None
    assert _hex(server.parent.span_id, 16) == PARENT_ID
    span_id = _hex(server.context.span_id, 16)
    assert _stored(module_store, key) == ("req-on", f"00-{TRACE_ID}-{span_id}-01")
