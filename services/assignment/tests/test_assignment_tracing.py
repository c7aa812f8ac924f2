"""One request id and one trace across the real services (issue #9).

A console session's calls (one ``x-request-id`` and one W3C ``traceparent``) go to the
assignment service, which calls the real recommendation service (GetTask's detail), the
real scheduler (Schedule of the offer's timeout job, from the offer stream), whose
worker calls ExpireOffer back at the deadline; RecordCall's call record and every task
transition reach the real bilog service through the outbox, whose relay sends each batch
in a span of its own linked to the trace of every request of the batch, each event with
its request's id (the Kafka record's ``x-request-id`` header). Tracing is on in this
process (the SDK's InMemorySpanExporter; assignment, recommendation, bilog and the
scheduler API run here, each in its own thread and loop); the scheduler's pump and
worker are processes as in production, the worker tracing to its console
(``CRM_SCHEDULER_TRACING_EXPORTER``) so its span is read from its output. The JSON log
lines (``crm_common.logs``) of each hop are captured too."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from assignment_integration_lib import (
    BilogService,
    RecommendationService,
    car,
    read_avro_records,
    read_avro_topic,
    scratch_database,
)
from assignment_testlib import OfferReader, Service, settings_for
from bilog_testlib import RegistryThread
from crm.assignment.v1 import assignment_pb2 as pb
from crm.recommendation.v1 import recommendation_pb2 as rpb
from crm.scheduler.v1 import scheduler_pb2 as spb
from crm_assignment.api.convert import timestamp
from crm_assignment.clients.scheduler_timeouts import expire_offer_key
from crm_assignment.domain.model import utc_now
from crm_common.config_watch import put_json
from crm_common.logs import JsonFormatter
from crm_devstack import wait_until
from crm_devstack.stack import Stack
from crm_scheduler.domain.model import job_uuid
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from scheduler_testlib import RealScheduler, real_scheduler

PHONES = ("13800005555", "13800005556")  # two customers: two tasks
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SESSION_SPAN = "b7ad6b7169203331"
REQUEST_ID = "console-session-9"
METADATA = (("x-request-id", REQUEST_ID), ("traceparent", f"00-{TRACE_ID}-{SESSION_SPAN}-01"))

ASSIGNMENT = "crm.assignment.v1.AssignmentService"
RECOMMEND = "crm.recommendation.v1.RecommendationService/Recommend"
LOG_BATCH = "crm.bilog.v1.BilogService/LogBatch"
SCHEDULE = "crm.scheduler.v1.SchedulerService/Schedule"
EXPIRE_OFFER = f"{ASSIGNMENT}/ExpireOffer"


@pytest.fixture(scope="module")
def scheduler(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealScheduler]:
    """The real scheduler: API in-process, pump and worker processes (the worker tracing
    to its console, exported every 50 ms)."""
    with real_scheduler(
        tmp_path_factory.mktemp("scheduler"),
        CRM_SCHEDULER_TRACING_EXPORTER="console",
        OTEL_BSP_SCHEDULE_DELAY="50",
    ) as running:
        yield running


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Every log line of this process as the services write them (JSON, one a line)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("test"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _hex(n: int, width: int) -> str:
    return format(n, f"0{width}x")


def _console_spans(text: str) -> list[dict[str, Any]]:
    """The spans the ConsoleSpanExporter wrote (indented JSON objects) among log lines."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    at = text.find("{")
    while at >= 0:
        try:
            obj, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            at = text.find("{", at + 1)
            continue
        if isinstance(obj, dict) and "context" in obj and "kind" in obj:
            found.append(obj)
        at = text.find("{", end)
    return found


def _clue(svc: Service, key: str, phone: str, **kw: Any) -> int:
    fields: dict[str, Any] = {"business_line": 1, "source": "app", "city": "beijing", **kw}
    request = pb.CreateClueRequest(idempotency_key=key, phone=phone, **fields)
    return svc.stub.CreateClue(request, metadata=METADATA).task.id


def _offer(svc: Service, agent_id: int) -> pb.Offer:
    """The next offer of the agent's stream (opened with the session's metadata)."""
    reader = OfferReader(svc.stub, agent_id, metadata=METADATA)
    try:
        return reader.next()
    finally:
        reader.close()


def _session_spans(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    """The finished spans made for the session's calls (its request id)."""
    return [
        s
        for s in spans.get_finished_spans()
        if (s.attributes or {}).get("crm.request_id") == REQUEST_ID
    ]


def _server_spans(session: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in session if s.name == name and s.kind is SpanKind.SERVER]


def test_one_request_id_and_one_trace_across_the_services(
    stack: Stack,
    scheduler: RealScheduler,
    registry: RegistryThread,
    migrated_db: str,
    etcd_endpoint: str,
    config_prefix: str,
    spans: InMemorySpanExporter,
    json_logs: io.StringIO,
) -> None:
    with scratch_database() as rec_url:
        rec = RecommendationService(rec_url, stack.etcd_endpoint)
        bilog = BilogService(stack.kafka_bootstrap, registry.url)
        svc: Service | None = None
        try:
            rec.stub.UpsertCars(
                rpb.UpsertCarsRequest(
                    cars=[
                        car(201, "BMW", "3 Series", 220_000),
                        car(202, "BMW", "3 Series", 210_000),
                    ]
                )
            )
            settings = settings_for(
                migrated_db,
                etcd_endpoint,
                config_prefix,
                recycle_safety_sweep_s=600.0,
                scheduler_timeout_s=2.0,
                scheduler_target=scheduler.api.app.target,
                recommendation_target=rec.target,
                recommendation_timeout_s=2.0,
                bilog_target=bilog.target,
            )
            svc = Service(settings, utc_now)
            # the console: a task's detail (-> recommendation), its offer accepted and a
            # call record (-> bilog through the outbox)
            svc.agent(8)
            first = _clue(svc, "trace-1", PHONES[0], intent_car_ids=[201], budget_max_yuan=250_000)
            detail = svc.stub.GetTask(pb.GetTaskRequest(id=first), metadata=METADATA)
            assert detail.recommendations.available, detail.recommendations.unavailable_reason
            assert _offer(svc, 8).task.id == first
            svc.stub.AcceptTask(pb.AcceptTaskRequest(task_id=first, agent_id=8), metadata=METADATA)
            record = pb.RecordCallRequest(
                call_id="trace-1-call", task_id=first, agent_id=8,
                provider=pb.TELEPHONY_PROVIDER_RL, outcome=pb.CALL_OUTCOME_BUSY,
                started_at=timestamp(svc.clock()), duration_seconds=5,
            )  # fmt: skip
            svc.stub.RecordCall(record, metadata=METADATA)
            # another offer (-> scheduler: its timeout job), not accepted within 1 s: the
            # worker calls ExpireOffer back
            rev = svc.call(
                put_json(
                    settings.etcd_endpoints,
                    settings.assignment_config_prefix + "SALE",
                    {"accept_timeout_s": 1},
                )
            )
            svc.call(svc.app.watcher.wait_for_revision(rev, 10))
            svc.agent(7)
            second = _clue(svc, "trace-2", PHONES[1])
            assert _offer(svc, 7).task.id == second
            (offered,) = [e for e in svc.task(second).history if e.kind == "OFFERED"]
            key = expire_offer_key(second, offered.id)

            def expired() -> spb.Job | None:
                job = scheduler.job(key)
                return job if job.state == spb.JOB_STATE_SUCCEEDED else None

            wait_until(expired, "the expire-offer job SUCCEEDED", 30)
            assert svc.task(second).task.status == pb.STATUS_RECYCLED

            # -- one trace ---------------------------------------------------------------
            session = _session_spans(spans)
            by_id = {s.context.span_id: s for s in session}

            def parent(span: ReadableSpan) -> ReadableSpan:
                assert span.parent is not None, span.name
                return by_id[span.parent.span_id]

            # every span of the session's calls, server and client, in every in-process
            # service, is in the session's trace
            assert {_hex(s.context.trace_id, 32) for s in session} == {TRACE_ID}
            recommends = _server_spans(session, RECOMMEND)
            assert recommends
            for recommend in recommends:  # GetTask -> CLIENT -> Recommend
                assert parent(recommend).kind is SpanKind.CLIENT
                assert parent(parent(recommend)).name == f"{ASSIGNMENT}/GetTask"
            (expire,) = _server_spans(session, EXPIRE_OFFER)
            # the worker's CLIENT span (from its console): child of the second offer's
            # Schedule server span, parent of ExpireOffer's
            worker_spans = wait_until(
                lambda: [
                    s
                    for s in _console_spans(scheduler.worker.log_path.read_text())
                    if s["attributes"].get("crm.scheduler.job_id") == job_uuid(key)
                ],
                "the worker's span in its console output",
                15,
            )
            worker = worker_spans[-1]
            assert worker["kind"] == "SpanKind.CLIENT"
            assert worker["context"]["trace_id"] == f"0x{TRACE_ID}"
            assert worker["attributes"]["crm.request_id"] == REQUEST_ID
            assert expire.parent is not None
            assert worker["context"]["span_id"] == f"0x{_hex(expire.parent.span_id, 16)}"
            (schedule,) = [
                s
                for s in _server_spans(session, SCHEDULE)
                if worker["parent_id"] == f"0x{_hex(s.context.span_id, 16)}"
            ]
            # Schedule <- assignment's CLIENT span <- the offer stream of agent 7
            stream = parent(parent(schedule))
            assert stream.name == f"{ASSIGNMENT}/StreamOffers"
            assert stream.parent is not None  # the session's own span (the console's)
            assert _hex(stream.parent.span_id, 16) == SESSION_SPAN

            # -- bilog: the call record carries the request id to Kafka --------------------
            (call,) = read_avro_topic(
                stack.kafka_bootstrap, registry.url, bilog.topic("crm.bi.FactCallRecord"), 1
            )
            assert call[1]["operator_header"]["request_id"] == REQUEST_ID

            # -- bilog: every transition's record carries the request id of its request ----
            # (CreateClue, the offer streams, AcceptTask, the worker's ExpireOffer: all the
            # session's; the clue and the accept went through the group-commit batchers)
            transitions = read_avro_records(
                stack.kafka_bootstrap, registry.url, bilog.transition_topic, 6
            )
            reasons = {(v["task_id"], v["reason"]) for _, v, _ in transitions}
            assert {(first, "created"), (first, "offered"), (first, "accepted")} <= reasons
            assert {(second, "created"), (second, "offered"), (second, "timed_out")} <= reasons
            assert {h.get("x-request-id") for _, _, h in transitions} == {REQUEST_ID.encode()}

            # -- the relay's spans: a trace of their own, linked to the session's ------------
            def relayed(table: str) -> list[ReadableSpan]:
                return [
                    s
                    for s in spans.get_finished_spans()
                    if s.name == f"outbox publish {table}"
                    and any(_hex(link.context.trace_id, 32) == TRACE_ID for link in s.links)
                ]

            for table in ("task_event", "bi_outbox"):
                relay = wait_until(lambda t=table: relayed(t), f"a relay span of {table}")[0]
                assert relay.kind is SpanKind.PRODUCER
                assert relay.parent is None
                assert _hex(relay.context.trace_id, 32) != TRACE_ID
                assert (relay.attributes or {})["crm.outbox.table"] == table
                finished = spans.get_finished_spans()
                (client,) = [
                    s
                    for s in finished
                    if s.parent is not None and s.parent.span_id == relay.context.span_id
                ]
                assert (client.name, client.kind) == (LOG_BATCH, SpanKind.CLIENT)
                (server,) = [
                    s
                    for s in finished
                    if s.parent is not None and s.parent.span_id == client.context.span_id
                ]
                assert (server.name, server.kind) == (LOG_BATCH, SpanKind.SERVER)
                assert server.context.trace_id == relay.context.trace_id

            # -- one request id in the JSON log line of each hop -----------------------------
            lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
            finished = {
                line["method"]: line
                for line in lines
                if line["msg"].startswith("rpc finished") and line.get("request_id") == REQUEST_ID
            }
            for method in (
                f"/{ASSIGNMENT}/CreateClue",
                f"/{ASSIGNMENT}/GetTask",
                f"/{RECOMMEND}",
                f"/{ASSIGNMENT}/RecordCall",
                f"/{SCHEDULE}",
                f"/{EXPIRE_OFFER}",
            ):
                assert method in finished, (method, sorted(finished))
                assert finished[method]["trace_id"] == TRACE_ID, method
            scheduled = [ln for ln in lines if ln["msg"] == "job scheduled"]
            assert len(scheduled) == 2  # the two offers' timeout jobs
            assert {ln["request_id"] for ln in scheduled} == {REQUEST_ID}
        finally:
            if svc is not None:
                svc.close()
            bilog.close()
            rec.close()
