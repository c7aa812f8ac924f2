"""The assignment service wired to its neighbours: recommendations in the task detail
(real recommendation service; down; slow stand-in) and every task transition published
to the BI log through the outbox (real bilog service, real Tansu broker, dev registry)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from assignment_integration_lib import (
    BilogService,
    RecommendationService,
    car,
    read_avro_records,
    read_avro_topic,
    scratch_database,
    slow_recommendation_standin,
)
from assignment_testlib import SALE, ManualClock, OfferReader, Service, settings_for
from bilog_testlib import RegistryThread
from crm.assignment.v1 import assignment_pb2 as pb
from crm.bilog.v1 import bilog_pb2 as bpb
from crm.bilog.v1 import bilog_pb2_grpc
from crm.recommendation.v1 import recommendation_pb2 as rpb
from crm_assignment.api.convert import timestamp
from crm_assignment.clients.bilog_outbox import transition_payload
from crm_assignment.clients.recommendation import recommend_query
from crm_assignment.domain.model import (
    BusinessLine,
    Category,
    Clue,
    Customer,
    EventKind,
    OutboxEvent,
    Status,
    Task,
    TaskDetail,
)
from crm_assignment.store.schema import BiOutboxRow, TaskEventRow
from crm_devstack import free_port, wait_until
from crm_devstack.stack import Stack
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

PHONE = "13800001111"


@pytest.fixture
def service_with(migrated_db: str, etcd_endpoint: str, config_prefix: str) -> Iterator[Any]:
    """``service_with(**settings)``: the assignment service with extra settings."""
    made: list[Service] = []

    def make(**kw: Any) -> Service:
        svc = Service(settings_for(migrated_db, etcd_endpoint, config_prefix, **kw), ManualClock())
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()


# --------------------------------------------------------------------------- pure parts


def _task(**kw: Any) -> Task:
    now = datetime(2025, 11, 30, 8, 0, tzinfo=UTC)
    values: dict[str, Any] = {
        "id": 7,
        "business_line": BusinessLine.AFTER_SALE,
        "category": Category.NEW_CLUE,
        "status": Status.UNASSIGNED,
        "customer_id": 42,
        "city": "shanghai",
        "priority": 5,
        "star": False,
        "agent_id": None,
        "preferred_agent_id": None,
        "last_lost_agent_id": None,
        "parent_task_id": None,
        "brands": (),
        "created_at": now,
        "due_at": now,
        "offer_deadline": None,
        "recycle_count": 0,
        "clue_count": 2,
        "updated_at": now,
    }
    values.update(kw)
    return Task(**values)


def _clue(clue_id: int, cars: tuple[int, ...], lo: int, hi: int) -> Clue:
    return Clue(
        id=clue_id,
        task_id=7,
        source="app",
        city="shanghai",
        intent_car_ids=cars,
        brands=(),
        budget_min_yuan=lo,
        budget_max_yuan=hi,
        merged=clue_id > 1,
        created_at=datetime(2025, 11, 30, tzinfo=UTC),
    )


def test_recommend_query_unions_intent_cars_and_widens_the_budget() -> None:
    detail = TaskDetail(
        task=_task(),
        customer=Customer(42, "138****1111", False),
        clues=(
            _clue(1, (5, 6), 100_000, 150_000),
            _clue(2, (6, 9), 0, 220_000),
            _clue(3, (), 80_000, 0),
        ),
        history=(),
    )
    q = recommend_query(detail, 6)
    assert q.intent_car_ids == (6, 9, 5)  # newest clue first, no duplicates
    assert (q.budget_min_yuan, q.budget_max_yuan) == (80_000, 220_000)
    assert (q.city, q.customer_id, q.count, int(q.business_line or 0)) == ("shanghai", 42, 6, 2)
    many = TaskDetail(detail.task, detail.customer, (_clue(1, tuple(range(1, 40)), 0, 0),), ())
    q = recommend_query(many, 3)
    assert len(q.intent_car_ids) == 20
    assert (q.budget_min_yuan, q.budget_max_yuan) == (0, 0)


def test_transition_payload_follows_the_task_transition_schema() -> None:
    at = datetime(2025, 11, 30, 8, 0, 1, 234_567, tzinfo=UTC)
    ev = OutboxEvent(
        id=3,
        task_id=7,
        business_line=BusinessLine.FINANCE,
        category=Category.FAILED_ORDER,
        kind=EventKind.TIMED_OUT,
        from_status=Status.ASSIGNED,
        to_status=Status.RECYCLED,
        agent_id=11,
        at=at,
    )
    assert transition_payload(ev) == {
        "task_id": 7,
        "business_line": 3,
        "category": "FAILED_ORDER",
        "from_status": "ASSIGNED",
        "to_status": "RECYCLED",
        "agent_id": 11,
        "reason": "timed_out",
        "at": int(at.timestamp() * 1000),
    }
    created = OutboxEvent(3, 7, BusinessLine.SALE, Category.NEW_CLUE, EventKind.CREATED, None,
                          Status.UNASSIGNED, None, at)  # fmt: skip
    assert transition_payload(created)["from_status"] is None


# --------------------------------------------------------------------------- recommendations


def test_task_detail_has_recommendations_from_the_real_service(
    stack: Stack, service_with: Any
) -> None:
    with scratch_database() as url:
        rec = RecommendationService(url, stack.etcd_endpoint)
        try:
            rec.stub.UpsertCars(
                rpb.UpsertCarsRequest(
                    cars=[
                        car(101, "BMW", "3 Series", 220_000),
                        car(102, "BMW", "3 Series", 210_000),
                        car(103, "BMW", "X3", 260_000),
                        car(104, "Toyota", "Camry", 150_000),
                        car(105, "BMW", "3 Series", 215_000, city="shanghai"),
                    ]
                )
            )
            # 1 s: the first call also connects; the 0.3 s default is for a warm channel
            svc = service_with(recommendation_target=rec.target, recommendation_timeout_s=1.0)
            task = svc.clue(
                "rec-1",
                PHONE,
                intent_car_ids=[101],
                budget_min_yuan=150_000,
                budget_max_yuan=250_000,
            ).task
            detail = svc.task(task.id)
            recs = detail.recommendations
            assert recs.available, recs.unavailable_reason
            assert recs.unavailable_reason == ""
            ids = [c.car.id for c in recs.cars]
            assert ids
            assert 101 not in ids
            assert 105 not in ids  # other city
            assert ids[0] == 102  # same series, in budget
            assert all(c.reasons for c in recs.cars)
            assert all(c.car.city == "beijing" for c in recs.cars)
            assert detail.task.id == task.id
            assert len(detail.history) == 1
        finally:
            rec.close()


def test_task_detail_without_target_says_not_configured(service: Service) -> None:
    task = service.clue("nc-1", PHONE).task
    recs = service.task(task.id).recommendations
    assert not recs.available
    assert recs.unavailable_reason == "NOT_CONFIGURED"


def test_task_detail_when_recommendation_is_down(service_with: Any) -> None:
    svc = service_with(recommendation_target=f"127.0.0.1:{free_port()}")
    task = svc.clue("down-1", PHONE).task
    detail = svc.task(task.id)
    assert detail.task.id == task.id
    assert not detail.recommendations.available
    # the channel retries UNAVAILABLE within the call's deadline (crm_common.channels):
    # a peer that stays down ends as UNAVAILABLE, or DEADLINE_EXCEEDED when the retries'
    # backoff outlasts the 0.3 s deadline on a slow machine
    assert detail.recommendations.unavailable_reason in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert not detail.recommendations.cars


def test_task_detail_when_recommendation_is_slow(service_with: Any) -> None:
    with slow_recommendation_standin(delay_s=1.5) as (target, standin):
        svc = service_with(recommendation_target=target, recommendation_timeout_s=0.3)
        task = svc.clue("slow-1", PHONE, intent_car_ids=[7]).task
        started = time.monotonic()
        detail = svc.task(task.id)
        took = time.monotonic() - started
        assert detail.task.id == task.id
        assert not detail.recommendations.available
        assert detail.recommendations.unavailable_reason == "DEADLINE_EXCEEDED"
        assert took < 1.2
        assert standin.calls == 1


# --------------------------------------------------------------------------- BI outbox


def _events(database_url: str) -> list[TaskEventRow]:
    """Every task_event row (a fresh connection: what is committed now)."""
    engine = create_engine(database_url)
    try:
        with Session(engine) as s:
            return list(s.scalars(select(TaskEventRow).order_by(TaskEventRow.id)))
    finally:
        engine.dispose()


def _bi_rows(database_url: str) -> list[BiOutboxRow]:
    """Every bi_outbox row (call records, presence changes), committed now."""
    engine = create_engine(database_url)
    try:
        with Session(engine) as s:
            return list(s.scalars(select(BiOutboxRow).order_by(BiOutboxRow.id)))
    finally:
        engine.dispose()


def _rid(key: str, step: str) -> tuple[tuple[str, str]]:
    """The metadata of a call with the request id ``req-<key>-<step>``."""
    return (("x-request-id", f"req-{key}-{step}"),)


def _work_a_task(svc: Service, key: str, agent_id: int, *, call: bool = False) -> int:
    """Clue -> offered -> accepted -> (a call recorded) -> completed: four task events,
    one presence change (OFFLINE -> IDLE) and, with ``call``, one call record; each call
    with its own request id (``req-<key>-clue``, ``-stream``, ``-accept``, ``-complete``;
    ``req-<key>`` for the call record)."""
    clue = pb.CreateClueRequest(
        idempotency_key=key, phone=PHONE, business_line=SALE, source="app", city="beijing"
    )
    task = svc.stub.CreateClue(clue, metadata=_rid(key, "clue")).task
    svc.agent(agent_id, line=SALE)
    reader = OfferReader(svc.stub, agent_id, metadata=_rid(key, "stream"))
    try:
        offer = reader.next()
    finally:
        reader.close()
    assert offer.task.id == task.id
    accept = pb.AcceptTaskRequest(task_id=task.id, agent_id=agent_id)
    svc.stub.AcceptTask(accept, metadata=_rid(key, "accept"))
    if call:
        record = pb.RecordCallRequest(
            call_id=f"{key}-call", task_id=task.id, agent_id=agent_id,
            provider=pb.TELEPHONY_PROVIDER_RL, outcome=pb.CALL_OUTCOME_BUSY,
            started_at=timestamp(svc.clock()), duration_seconds=12,
        )  # fmt: skip
        svc.stub.RecordCall(record, metadata=(("x-request-id", f"req-{key}"),))
    complete = pb.CompleteTaskRequest(task_id=task.id, agent_id=agent_id, note="sold")
    svc.stub.CompleteTask(complete, metadata=_rid(key, "complete"))
    return task.id


_FLOW = [
    (None, "UNASSIGNED", "created"),
    ("UNASSIGNED", "ASSIGNED", "offered"),
    ("ASSIGNED", "IN_PROGRESS", "accepted"),
    ("IN_PROGRESS", "COMPLETED", "completed"),
]


def test_every_transition_reaches_kafka_through_bilog(
    stack: Stack, registry: RegistryThread, migrated_db: str, service_with: Any
) -> None:
    bilog = BilogService(stack.kafka_bootstrap, registry.url)
    try:
        # a poll interval longer than the test: only the commit hook wakes the relay
        svc = service_with(bilog_target=bilog.target, outbox_poll_s=60)
        task_id = _work_a_task(svc, "bi-1", 501, call=True)
        rows = wait_until(
            lambda: (r := _events(migrated_db)) and all(e.published_at for e in r) and r,
            "every task event published",
        )
        others = wait_until(
            lambda: (o := _bi_rows(migrated_db)) and all(e.published_at for e in o) and o,
            "the call record and the presence change published",
        )
        assert sorted(o.schema_name for o in others) == [
            "crm.bi.AgentPresenceChanged",
            "crm.bi.FactCallRecord",
        ]
        assert len(rows) == 4
        assert all(e.publish_error is None for e in rows)
        # each row records its request's id; each Kafka record carries it (issue #9)
        steps = ["clue", "stream", "accept", "complete"]
        assert [e.request_id for e in rows] == [f"req-bi-1-{step}" for step in steps]
        assert all(e.traceparent is None for e in rows)  # tracing is off
        with_headers = read_avro_records(
            stack.kafka_bootstrap, registry.url, bilog.transition_topic, expected=4
        )
        assert [h["x-request-id"] for _, _, h in with_headers] == [
            f"req-bi-1-{step}".encode() for step in steps
        ]
        records = [(k, v) for k, v, _ in with_headers]
        assert [(v["from_status"], v["to_status"], v["reason"]) for _, v in records] == _FLOW
        for key, value in records:
            assert key == f"1:{task_id}".encode()
            assert value["task_id"] == task_id
            assert value["business_line"] == 1
            assert value["category"] == "NEW_CLUE"
        assert [v["agent_id"] for _, v in records] == [None, 501, 501, 501]
        at = rows[0].at  # timestamp-millis, decoded as a datetime
        assert records[0][1]["at"] == at.replace(microsecond=at.microsecond // 1000 * 1000)
        (call_record,) = read_avro_records(
            stack.kafka_bootstrap, registry.url, bilog.topic("crm.bi.FactCallRecord"), expected=1
        )
        assert call_record[2] == {"x-request-id": b"req-bi-1"}
        assert [o.request_id for o in others if o.schema_name.endswith("FactCallRecord")] == [
            "req-bi-1"
        ]
        call = call_record[:2]
        assert call[0] == f"1:{task_id}".encode()
        assert call[1]["bundle_id"] == str(task_id)
        assert call[1]["contact_phone"] == "138****1111"
        assert call[1]["call_tag_id"] == "BUSY"
        assert call[1]["provider_type"] == "RL"
        assert call[1]["operator_header"]["operator_id"] == 501
        assert call[1]["operator_header"]["request_id"] == "req-bi-1"
        (presence,) = read_avro_topic(
            stack.kafka_bootstrap, registry.url, bilog.topic("crm.bi.AgentPresenceChanged"),
            expected=1,
        )  # fmt: skip
        assert presence[0] == b"1:501"
        assert (presence[1]["from_presence"], presence[1]["to_presence"]) == ("OFFLINE", "IDLE")
        relay = svc.app.outbox
        assert relay is not None
        assert relay.published_total == 6
        assert relay.rejected_total == 0
        registry_metrics = svc.app.metrics.registry
        assert registry_metrics.get_sample_value("crm_assignment_outbox_published_total") == 6
        wait_until(
            lambda: registry_metrics.get_sample_value("crm_assignment_outbox_pending") == 0,
            "the lag gauge to drop to 0",
        )
    finally:
        bilog.close()


def test_events_wait_while_bilog_is_down_and_none_is_lost(
    stack: Stack, registry: RegistryThread, migrated_db: str, service_with: Any
) -> None:
    port = free_port()
    svc = service_with(
        bilog_target=f"127.0.0.1:{port}", outbox_poll_s=0.2, outbox_backoff_max_s=0.3
    )
    first = _work_a_task(svc, "down-1", 601)
    second = svc.clue("down-2", "13900002222").task.id
    relay = svc.app.outbox
    assert relay is not None
    wait_until(lambda: relay.failures_total >= 2, "the relay to fail and retry")
    rows = _events(migrated_db)
    assert len(rows) == 5
    assert not any(e.published_at for e in rows)  # nothing acknowledged, nothing marked
    bilog = BilogService(stack.kafka_bootstrap, registry.url, port=port)
    try:
        wait_until(
            lambda: all(e.published_at for e in _events(migrated_db)),
            "every task event published once bilog is up",
        )
        records = read_avro_topic(
            stack.kafka_bootstrap, registry.url, bilog.transition_topic, expected=5
        )
        got = {(v["task_id"], v["from_status"], v["to_status"]) for _, v in records}
        want = {(first, a, b) for a, b, _ in _FLOW} | {(second, None, "UNASSIGNED")}
        assert got == want
        # per task, in the order they happened
        firsts = [v["to_status"] for _, v in records if v["task_id"] == first]
        assert firsts == [b for _, b, _ in _FLOW]
    finally:
        bilog.close()


class RejectingBilogStandIn(bilog_pb2_grpc.BilogServiceServicer):
    """A STAND-IN for the bilog service (not the real one): rejects the event of one
    task, and every event of the schemas in ``reject_schemas`` (as bilog does for a
    payload its schema refuses), accepts the others; records the schemas it saw."""

    def __init__(self, reject_task_id: int, reject_schemas: frozenset[str] = frozenset()) -> None:
        self.reject_task_id = reject_task_id
        self.reject_schemas = reject_schemas
        self.seen: list[str] = []

    def LogBatch(self, request: bpb.LogBatchRequest, context: Any) -> bpb.LogBatchResponse:
        import json

        results = []
        for i, ev in enumerate(request.events):
            self.seen.append(ev.schema)
            payload = json.loads(ev.payload_json)
            if ev.schema in self.reject_schemas or payload.get("task_id") == self.reject_task_id:
                errors = [bpb.FieldError(path="payload_json.category", reason="unknown symbol")]
                results.append(bpb.EventResult(index=i, rejected=bpb.EventRejection(errors=errors)))
            else:
                receipt = bpb.EventReceipt(topic="t", partition=0, offset=i, schema_id=1)
                results.append(bpb.EventResult(index=i, accepted=receipt))
        return bpb.LogBatchResponse(results=results)


def test_a_rejected_event_is_set_aside_and_does_not_block_the_outbox(
    migrated_db: str, service_with: Any
) -> None:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    standin = RejectingBilogStandIn(reject_task_id=1)
    bilog_pb2_grpc.add_BilogServiceServicer_to_server(standin, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        svc = service_with(bilog_target=f"127.0.0.1:{port}", outbox_poll_s=0.2)
        assert svc.clue("rej-1", PHONE).task.id == 1
        svc.clue("rej-2", "13900003333")
        rows = wait_until(
            lambda: (
                (r := _events(migrated_db))
                and all(e.published_at or e.publish_error for e in r)
                and r
            ),
            "every event published or set aside",
        )
        (bad,) = [e for e in rows if e.task_id == 1]
        assert bad.published_at is None
        assert bad.publish_error == "payload_json.category: unknown symbol"
        assert all(e.published_at for e in rows if e.task_id != 1)
        metrics = svc.app.metrics.registry
        assert metrics.get_sample_value("crm_assignment_outbox_rejected_total") == 1
        svc.clue("rej-3", "13900004444")  # later events still flow
        wait_until(lambda: all(e.published_at for e in _events(migrated_db) if e.task_id != 1), "3")
    finally:
        server.stop(0)


def test_outbox_tables_flow_independently_and_rejections_stay_in_their_table(
    migrated_db: str, service_with: Any
) -> None:
    """Transitions, presence changes and call records share one relay: a rejected presence
    event is set aside in bi_outbox, the transitions and the call record still go out."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    standin = RejectingBilogStandIn(-1, frozenset({"crm.bi.AgentPresenceChanged"}))
    bilog_pb2_grpc.add_BilogServiceServicer_to_server(standin, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        svc = service_with(bilog_target=f"127.0.0.1:{port}", outbox_poll_s=0.2)
        _work_a_task(svc, "mix-1", 701, call=True)
        wait_until(
            lambda: (
                all(e.published_at for e in _events(migrated_db))
                and all(o.published_at or o.publish_error for o in _bi_rows(migrated_db))
            ),
            "every event published or set aside",
        )
        others = {o.schema_name: o for o in _bi_rows(migrated_db)}
        presence = others["crm.bi.AgentPresenceChanged"]
        assert presence.published_at is None
        assert presence.publish_error == "payload_json.category: unknown symbol"
        assert others["crm.bi.FactCallRecord"].published_at is not None
        assert sorted(set(standin.seen)) == [
            "crm.bi.AgentPresenceChanged", "crm.bi.FactCallRecord", "crm.bi.TaskTransition",
        ]  # fmt: skip
        relay = svc.app.outbox
        assert relay is not None
        assert (relay.published_total, relay.rejected_total) == (5, 1)
        # a later presence change is rejected again, the transitions keep flowing
        svc.stub.SetPresence(pb.SetPresenceRequest(agent_id=701, presence=pb.PRESENCE_BREAK))
        svc.clue("mix-2", "13900005555")
        wait_until(lambda: relay.rejected_total == 2, "the second presence event set aside")
        wait_until(lambda: all(e.published_at for e in _events(migrated_db)), "transitions out")
    finally:
        server.stop(0)
