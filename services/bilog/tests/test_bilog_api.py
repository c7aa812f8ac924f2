"""The gRPC intake against real Tansu and the dev registry: acks, validation paths, bad
rows, PII, the Confluent wire format, the typed client, and fuzzing (never INTERNAL)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from bilog_testlib import (
    MASKED,
    PHONE,
    RegistryThread,
    ServiceThread,
    call_record,
    read_topic,
    settings_for,
)
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from crm.bilog.v1 import bilog_pb2 as pb
from crm.bilog.v1 import bilog_pb2_grpc
from crm_bilog.app import App
from crm_bilog.client import BiEvent, BilogClient
from crm_bilog.domain import wire
from crm_common.errors import field_violations
from crm_devstack.stack import Stack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FCR = "crm.bi.FactCallRecord"


def event(payload: Any, schema: str = FCR) -> pb.Event:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return pb.Event(schema=schema, payload_json=text)


@pytest.fixture
async def stub(app: App) -> Any:
    async with grpc.aio.insecure_channel(app.target) as channel:
        yield bilog_pb2_grpc.BilogServiceStub(channel)


async def test_log_is_acked_in_confluent_wire_format_with_pii_masked(
    app: App, stub: Any, registry: RegistryThread
) -> None:
    resp = await stub.Log(pb.LogRequest(event=event(call_record(1))), timeout=10)
    r = resp.receipt
    assert r.topic == f"{app.settings.topic_prefix}fact_call_record"
    assert r.schema_id > 0
    assert r.offset >= 0
    (msg,) = await asyncio.to_thread(read_topic, app.settings.kafka_bootstrap, r.topic, 1)
    assert (msg.partition(), msg.offset()) == (r.partition, r.offset)
    assert msg.key() == b"2:bundle-1"
    assert msg.timestamp()[1] == call_record(1)["operator_header"]["timestamp"]
    value = msg.value()
    assert value[0] == 0
    assert int.from_bytes(value[1:5], "big") == r.schema_id
    assert PHONE.encode() not in value
    # any Confluent consumer reads it: confluent-kafka's own AvroDeserializer
    client = SchemaRegistryClient({"url": registry.url})
    datum = AvroDeserializer(client)(value, SerializationContext(r.topic, MessageField.VALUE))
    assert datum["contact_phone"] == MASKED
    assert datum["provider_type"] == "RL"
    assert datum["operator_header"]["operator_id"] == 1001


async def test_log_invalid_event_is_invalid_argument_with_avro_paths(stub: Any) -> None:
    bad = call_record(2)
    bad["operator_header"]["operator_id"] = "x"
    bad["call_type"] = "SIDEWAYS"
    del bad["bundle_id"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Log(pb.LogRequest(event=event(bad)), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = dict(field_violations(err.value))
    assert set(fields) == {
        "event.payload_json.operator_header.operator_id",
        "event.payload_json.call_type",
        "event.payload_json.bundle_id",
    }
    assert "SIDEWAYS" not in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Log(pb.LogRequest(event=event({}, schema="crm.bi.Nope")), timeout=10)
    assert dict(field_violations(err.value)).keys() == {"event.schema"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Log(pb.LogRequest(event=event("{not json")), timeout=10)
    assert dict(field_violations(err.value)).keys() == {"event.payload_json"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Log(pb.LogRequest(), timeout=10)
    assert dict(field_violations(err.value)).keys() == {"event"}


async def test_log_batch_rejects_per_event_and_writes_masked_bad_rows(app: App, stub: Any) -> None:
    bad = call_record(3)
    bad["provider_type"] = "XX"
    bad["secret_note"] = "call me on 13900000000"
    events = [event(call_record(0)), event(bad), event(call_record(4))]
    resp = await stub.LogBatch(pb.LogBatchRequest(events=events), timeout=10)
    assert (resp.accepted_count, resp.rejected_count) == (2, 1)
    assert [r.WhichOneof("outcome") for r in resp.results] == ["accepted", "rejected", "accepted"]
    errors = {e.path: e.reason for e in resp.results[1].rejected.errors}
    assert set(errors) == {"payload_json.provider_type", "payload_json.secret_note"}
    failed_topic = app.settings.failed_topic
    (row_msg,) = await asyncio.to_thread(read_topic, app.settings.kafka_bootstrap, failed_topic, 1)
    assert PHONE.encode() not in row_msg.value()
    assert b"13900000000" not in row_msg.value()
    row = wire.decode(row_msg.value(), app.catalog["crm.bi.FailedEvent"].parsed)
    assert row["schema"] == FCR
    assert {(e["path"], e["reason"]) for e in row["errors"]} == set(errors.items())
    kept = json.loads(row["payload_json"])
    assert kept["contact_phone"] == MASKED
    assert kept["secret_note"] == "**redacted**"
    assert kept["provider_type"] == "XX"


async def test_each_record_carries_its_events_request_id_as_a_header(app: App, stub: Any) -> None:
    """An event's own request id (an outbox relaying many requests' events), else the
    call's, is the Kafka record's ``x-request-id`` header, and its bad row's request id;
    a malformed one rejects the event (never INTERNAL)."""
    bad = call_record(13)
    bad["provider_type"] = "XX"
    events = [
        pb.Event(schema=FCR, payload_json=json.dumps(call_record(10)), request_id="req-a"),
        event(call_record(11)),
        pb.Event(schema=FCR, payload_json=json.dumps(call_record(12)), request_id="bad id!"),
        pb.Event(schema=FCR, payload_json=json.dumps(bad), request_id="req-b"),
    ]
    resp = await stub.LogBatch(
        pb.LogBatchRequest(events=events), timeout=10, metadata=(("x-request-id", "call-1"),)
    )
    assert [r.WhichOneof("outcome") for r in resp.results] == [
        "accepted",
        "accepted",
        "rejected",
        "rejected",
    ]
    assert [e.path for e in resp.results[2].rejected.errors] == ["request_id"]
    topic = resp.results[0].accepted.topic
    records = await asyncio.to_thread(read_topic, app.settings.kafka_bootstrap, topic, 2)
    headers = {(m.partition(), m.offset()): m.headers() for m in records}
    first, second = (resp.results[i].accepted for i in (0, 1))
    assert headers[(first.partition, first.offset)] == [("x-request-id", b"req-a")]
    assert headers[(second.partition, second.offset)] == [("x-request-id", b"call-1")]
    rows = await asyncio.to_thread(
        read_topic, app.settings.kafka_bootstrap, app.settings.failed_topic, 2
    )
    failed = app.catalog["crm.bi.FailedEvent"].parsed
    seen = sorted(
        (wire.decode(m.value(), failed)["request_id"], m.headers()[0][1].decode()) for m in rows
    )
    assert seen == [("call-1", "call-1"), ("req-b", "req-b")]


async def test_log_batch_limits(stub: Any, app: App) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.LogBatch(pb.LogBatchRequest(events=[]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    too_many = [event(call_record(i)) for i in range(app.settings.max_batch_events + 1)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.LogBatch(pb.LogBatchRequest(events=too_many), timeout=10)
    assert dict(field_violations(err.value)).keys() == {"events"}


async def test_typed_client_log_batch_stream_and_schemas(app: App) -> None:
    async with BilogClient(app.target) as client:
        infos = {s.name: s for s in await client.schemas()}
        assert "crm.bi.FailedEvent" not in infos
        assert infos[FCR].pii_fields == ["contact_phone (mask)"]
        assert infos["crm.bi.RecommendationImpression"].pii_fields == ["customer_phone (hash)"]
        transition = {
            "task_id": 42,
            "business_line": 1,
            "category": "NEW_CLUE",
            "from_status": None,
            "to_status": "UNASSIGNED",
            "at": 1_763_800_000_000,
        }
        receipt = await client.log("crm.bi.TaskTransition", transition)
        assert receipt.topic.endswith("task_transition")
        results = await client.log_batch(
            [BiEvent("crm.bi.TaskTransition", transition), BiEvent(FCR, {"business_line": 1})]
        )
        assert results[0].accepted
        assert not results[1].accepted
        assert results[1].rejection is not None
        chunks = [[BiEvent(FCR, call_record(i)) for i in range(j, j + 50)] for j in (0, 50)]
        chunks.append([BiEvent(FCR, {"nope": 1})])
        accepted, rejected = await client.log_stream(chunks)
        assert accepted == 100
        assert [r.index for r in rejected] == [100]


@pytest.fixture(scope="module")
def stub_sync(stack: Stack, registry: RegistryThread) -> Iterator[Any]:
    svc = ServiceThread(settings_for(stack.kafka_bootstrap, registry.url))
    channel = grpc.insecure_channel(svc.app.target)
    try:
        yield bilog_pb2_grpc.BilogServiceStub(channel)
    finally:
        channel.close()
        svc.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


def _mutations(base: dict[str, Any]) -> st.SearchStrategy[Any]:
    keys = st.sampled_from([*base, "operator_header", "extra"])
    nested = st.sampled_from(["timestamp", "http_host", "request_id", "operator_id", "x"])

    def mutate(args: tuple[str, str, Any, bool]) -> Any:
        key, inner, value, top = args
        payload = json.loads(json.dumps(base))
        if top:
            payload[key] = value
        else:
            payload["operator_header"][inner] = value
        return payload

    return st.tuples(keys, nested, json_values, st.booleans()).map(mutate) | json_values


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([FCR, "crm.bi.TaskTransition", "crm.bi.RecommendationImpression"]),
            _mutations(call_record(9)),
            st.sampled_from(["json", "text"]),
            st.text(max_size=30),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_generated_events_never_fail_internally(stub_sync: Any, batch: list[Any]) -> None:
    events = []
    for schema, payload, form, text in batch:
        body = json.dumps(payload) if form == "json" else text
        events.append(pb.Event(schema=schema, payload_json=body))
    resp = stub_sync.LogBatch(pb.LogBatchRequest(events=events), timeout=20)
    assert len(resp.results) == len(events)
    codes = []
    for e in events[:3]:
        try:
            stub_sync.Log(pb.LogRequest(event=e), timeout=20)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
