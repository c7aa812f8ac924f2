"""The sink's gRPC health (the one its Kubernetes probes check): SERVING while it
consumes, NOT_SERVING while its broker (our own Tansu) is paused with SIGSTOP, SERVING
again after SIGCONT; ``liveness`` stays SERVING through the outage (a broker outage must
not restart the sink) and turns NOT_SERVING only when the consume loop hangs."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from bilog_testlib import RegistryThread, call_record, settings_for
from crm.bilog.v1 import bilog_pb2 as pb
from crm.bilog.v1 import bilog_pb2_grpc
from crm_bilog.app import build_app
from crm_bilog.sink.process import SINK_HEALTH_NAME, sink_config, sink_health
from crm_bilog.sink.runner import Sink
from crm_bilog.sink.storage import LocalStorage
from crm_devstack import wait_until
from crm_devstack.stack import Proc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def status(port: int, name: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status)


def files_records(root: Path, topic: str) -> int:
    import fastavro

    total = 0
    for path in (root / topic).rglob("*.avro"):
        with path.open("rb") as f:
            total += sum(1 for _ in fastavro.reader(f))
    return total


async def test_sink_health_follows_the_broker_and_liveness_the_loop(
    tansu: Proc, registry: RegistryThread, tmp_path: Path
) -> None:
    bootstrap = f"127.0.0.1:{tansu.port}"
    settings = settings_for(
        bootstrap,
        registry.url,
        sink_port=0,
        sink_metrics_port=0,
        sink_idle_flush_s=0.3,
        sink_stall_s=60,
        readiness_timeout_s=2,
    )
    topic = f"{settings.topic_prefix}fact_call_record"
    settings = settings.model_copy(update={"sink_topics": topic})
    app = build_app(settings)
    await app.start()
    sink = Sink(sink_config(settings), LocalStorage(tmp_path / "files"))
    health = sink_health(sink, settings)
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    health.start()
    port = health.port
    assert port
    try:
        await app.wait_ready(30)
        # not consuming yet: not ready, but alive
        assert status(port, SINK_HEALTH_NAME) == NOT_SERVING
        assert status(port, "liveness") == SERVING
        thread.start()
        async with grpc.aio.insecure_channel(app.target) as ch:
            stub = bilog_pb2_grpc.BilogServiceStub(ch)
            events = [
                pb.Event(schema="crm.bi.FactCallRecord", payload_json=json.dumps(call_record(i)))
                for i in range(20)
            ]
            reply = await stub.LogBatch(pb.LogBatchRequest(events=events), timeout=10)
            assert reply.accepted_count == 20
        await asyncio.to_thread(
            wait_until, lambda: files_records(tmp_path / "files", topic) >= 20, "20 records", 60
        )
        for name in (SINK_HEALTH_NAME, ""):
            await asyncio.to_thread(
                wait_until, lambda n=name: status(port, n) == SERVING, "sink SERVING", 30
            )
        metrics_port = health.server.metrics_port
        assert metrics_port
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
        )
        assert b"crm_bilog_sink_records_total 20.0" in body

        tansu.pause()
        await asyncio.to_thread(
            wait_until,
            lambda: status(port, SINK_HEALTH_NAME) == NOT_SERVING,
            "sink NOT_SERVING while the broker is paused",
            30,
        )
        assert status(port, "") == NOT_SERVING
        assert status(port, "liveness") == SERVING  # an outage is no reason to restart

        tansu.resume()
        await asyncio.to_thread(
            wait_until,
            lambda: status(port, SINK_HEALTH_NAME) == SERVING,
            "sink SERVING again after SIGCONT",
            60,
        )
    finally:
        stop.set()
        tansu.resume()
        if thread.is_alive():
            await asyncio.to_thread(thread.join, 30)
        health.stop()
        await app.stop()


def test_a_stuck_loop_fails_liveness(tmp_path: Path) -> None:
    now = [0.0]
    settings = settings_for(
        "127.0.0.1:1", "http://127.0.0.1:1", sink_port=0, sink_metrics_port=-1, sink_stall_s=5
    )
    sink = Sink(sink_config(settings), LocalStorage(tmp_path), clock=lambda: now[0])
    health = sink_health(sink, settings)
    health.start()
    try:
        port = health.port
        assert port
        wait_until(lambda: status(port, "liveness") == SERVING, "liveness SERVING")
        now[0] = 6.0  # the loop did not come round for 6 s (> sink_stall_s)
        wait_until(lambda: status(port, "liveness") == NOT_SERVING, "liveness NOT_SERVING")
        assert status(port, SINK_HEALTH_NAME) == NOT_SERVING
        with pytest.raises(RuntimeError, match="stuck"):
            sink.check_progress(5)
    finally:
        health.stop()
