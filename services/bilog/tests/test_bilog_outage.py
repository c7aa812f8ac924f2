"""Broker outage (our own Tansu, paused with SIGSTOP): UNAVAILABLE within the deadline,
nothing acknowledged lost after SIGCONT; a full local queue is RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from bilog_testlib import RegistryThread, call_record, read_topic, settings_for
from crm.bilog.v1 import bilog_pb2 as pb
from crm.bilog.v1 import bilog_pb2_grpc
from crm_bilog.app import build_app
from crm_devstack.stack import Proc, Stack


def batch(start: int, n: int) -> pb.LogBatchRequest:
    return pb.LogBatchRequest(
        events=[
            pb.Event(schema="crm.bi.FactCallRecord", payload_json=json.dumps(call_record(i)))
            for i in range(start, start + n)
        ]
    )


async def test_paused_broker_is_unavailable_within_deadline_and_loses_no_ack(
    tansu: Proc, registry: RegistryThread
) -> None:
    bootstrap = f"127.0.0.1:{tansu.port}"
    settings = settings_for(bootstrap, registry.url, message_timeout_ms=4000)
    app = build_app(settings)
    await app.start()
    try:
        await app.wait_ready(30)
        async with grpc.aio.insecure_channel(app.target) as ch:
            stub = bilog_pb2_grpc.BilogServiceStub(ch)
            before = await stub.LogBatch(batch(0, 50), timeout=10)
            assert before.accepted_count == 50
            tansu.pause()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LogBatch(batch(100, 50), timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            tansu.resume()
            after = None
            codes = []
            for _ in range(40):  # the client retries, as told by UNAVAILABLE
                try:
                    after = await stub.LogBatch(batch(200, 50), timeout=10)
                    break
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
                    await asyncio.sleep(0.25)
            assert set(codes) <= {grpc.StatusCode.UNAVAILABLE}
            assert after is not None
            assert after.accepted_count == 50
        topic = before.results[0].accepted.topic
        msgs = await asyncio.to_thread(read_topic, bootstrap, topic, 100)
        stored = {(m.partition(), m.offset()) for m in msgs}
        acked = {
            (r.accepted.partition, r.accepted.offset) for r in [*before.results, *after.results]
        }
        assert acked <= stored
    finally:
        await app.stop()


async def test_full_local_queue_is_resource_exhausted(
    stack: Stack, registry: RegistryThread
) -> None:
    settings = settings_for(stack.kafka_bootstrap, registry.url, queue_max_messages=10)
    app = build_app(settings)
    await app.start()
    try:
        await app.wait_ready(30)
        async with grpc.aio.insecure_channel(app.target) as ch:
            stub = bilog_pb2_grpc.BilogServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LogBatch(batch(0, 20), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            ok = await stub.LogBatch(batch(0, 5), timeout=10)
            assert ok.accepted_count == 5
    finally:
        await app.stop()
