"""bilog benchmark (issue #5), called by `make bench` through ``run(seconds)``.

Same broker (the stack's Tansu), same run, side by side:

  raw        baseline: confluent-kafka (acks=all, idempotence, zstd) + fastavro in a loop,
             batches of 500 FactCallRecords framed in the wire format, each batch waited
             for until every ack arrived (what bilog promises its callers)
  LogBatch   the bilog service as its own process (python -m crm_bilog serve), LogBatch of
             500 JSON events (validation, PII masking, Avro, produce, acks) from
             ``CONCURRENCY`` clients; target >= 0.5x raw events/s; p50/p99 per batch
  sink       the file sink catching up on everything LogBatch produced: records/s
             written to Avro files (published and committed)

    PYTHONPATH=tools .venv/bin/python -m crm_tools.bench_bilog --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
from confluent_kafka import Producer
from crm.bilog.v1 import bilog_pb2 as pb
from crm.bilog.v1 import bilog_pb2_grpc
from crm_bilog.domain.pii import PiiPolicy
from crm_bilog.schemas import SchemaCatalog, topic_name
from crm_bilog.sink.runner import Sink, SinkConfig
from crm_bilog.sink.storage import LocalStorage
from crm_devstack import create_database, drop_database, free_port, up
from fastavro import schemaless_writer

from crm_tools.bench import Measure, closed_loop, pct
from crm_tools.procs import ServiceProc, run_module, start_service, wait_serving

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".bench"
BATCH = 500
CONCURRENCY = 4
TARGET = 0.5
FCR = "crm.bi.FactCallRecord"


def payload(i: int) -> dict[str, Any]:
    return {
        "business_line": 1 + i % 3,
        "bundle_id": f"bundle-{i % 97}",
        "call_type": "CALLIN" if i % 2 else "CALLOUT",
        "contact_phone": f"138{i % 100_000_000:08d}",
        "call_tag_id": f"tag-{i}",
        "provider_type": ("ZT", "RL", "TR")[i % 3],
        "operator_header": {
            "timestamp": int(time.time() * 1000),
            "http_host": "console.local",
            "request_id": uuid.uuid4().hex,
            "operator_id": 1000 + i % 50,
        },
    }


def bench_raw(bootstrap: str, topic: str, schema: Any, seconds: float) -> Measure:
    """The baseline loop (own thread: it blocks)."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "compression.type": "zstd",
            "linger.ms": 5,
        }
    )
    header = struct.pack(">bI", 0, 1)
    payloads = [payload(i) for i in range(BATCH)]
    lat: list[float] = []
    events = 0
    t_measure = time.perf_counter() + 1.0
    t_end = t_measure + seconds
    while True:
        t0 = time.perf_counter()
        if t0 >= t_end:
            break
        pending = [BATCH]

        def done(err: Any, msg: Any, pending: list[int] = pending) -> None:
            pending[0] -= 1

        for p in payloads:
            buf = io.BytesIO()
            buf.write(header)
            schemaless_writer(buf, schema, p)
            key = f"{p['business_line']}:{p['bundle_id']}".encode()
            producer.produce(topic, buf.getvalue(), key, on_delivery=done)
        while pending[0] > 0:
            producer.poll(0.01)
        if t0 >= t_measure:
            lat.append(time.perf_counter() - t0)
            events += BATCH
    producer.flush(10)
    return Measure("raw confluent-kafka + fastavro", events, seconds, pct(lat, 0.5), pct(lat, 0.99))


async def start_bilog(bootstrap: str, registry_url: str, prefix: str, log: Path) -> ServiceProc:
    port = free_port()
    env = {
        "CRM_BILOG_PORT": str(port),
        "CRM_BILOG_HOST": "127.0.0.1",
        "CRM_BILOG_METRICS_PORT": "-1",
        "CRM_BILOG_KAFKA_BOOTSTRAP": bootstrap,
        "CRM_BILOG_SCHEMA_REGISTRY_URL": registry_url,
        "CRM_BILOG_TOPIC_PREFIX": prefix,
        "CRM_BILOG_LOG_LEVEL": "WARNING",
        "CRM_BILOG_READINESS_TIMEOUT_S": "10",
    }
    proc = start_service("bilog", "crm_bilog", port, env, log)
    await wait_serving(proc)
    return proc


def _spawn_registry(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "crm_bilog", "registry"],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def start_registry(db_url: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The dev registry as its own process (python -m crm_bilog registry)."""
    port = free_port()
    env = {
        "CRM_BILOG_DATABASE_URL": db_url,
        "CRM_BILOG_REGISTRY_HOST": "127.0.0.1",
        "CRM_BILOG_REGISTRY_PORT": str(port),
        "CRM_BILOG_LOG_LEVEL": "WARNING",
    }
    await asyncio.to_thread(run_module, "crm_bilog", ["migrate"], env, log)
    popen = await asyncio.to_thread(_spawn_registry, env, log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if await asyncio.to_thread(_answers, url):
            return popen, url
        await asyncio.sleep(0.1)
    popen.kill()
    raise RuntimeError(f"registry did not start; see {log}")


def bench_sink(bootstrap: str, registry_url: str, topic: str, expected: int) -> Measure:
    root = Path(tempfile.mkdtemp(prefix="bilog-bench-sink-"))
    config = SinkConfig(
        bootstrap=bootstrap,
        group_id=f"bench-sink-{uuid.uuid4().hex[:8]}",
        topics=[topic],
        registry_url=registry_url,
        flush_records=10_000,
        idle_flush_s=0.5,
        session_timeout_ms=3000,
    )
    sink = Sink(config, LocalStorage(root))
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    thread.start()
    try:
        if not sink.ready.wait(60):
            raise RuntimeError("sink got no partitions")
        t0 = time.perf_counter()
        deadline = t0 + 300
        while sink.stats.records < expected and time.perf_counter() < deadline:
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        return Measure("sink: records written", sink.stats.records, elapsed, 0.0, 0.0)
    finally:
        stop.set()
        thread.join(30)
        shutil.rmtree(root, ignore_errors=True)


async def run(seconds: float) -> list[dict[str, Any]]:
    """The measures as result rows (see module doc)."""
    OUT.mkdir(exist_ok=True)
    stack = await asyncio.to_thread(up)
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    db = f"crm_bench_bilog_{uuid.uuid4().hex[:6]}"
    db_url = await asyncio.to_thread(create_database, db)
    log = OUT / "bilog.log"
    log.write_bytes(b"")
    registry, registry_url = await start_registry(db_url, log)
    svc: ServiceProc | None = None
    try:
        svc = await start_bilog(stack.kafka_bootstrap, registry_url, prefix, log)
        catalog = SchemaCatalog.load(PiiPolicy(b"bench-key-0123456789"))
        schema = catalog[FCR].parsed
        topic = topic_name(FCR, prefix)
        raw = await asyncio.to_thread(
            bench_raw, stack.kafka_bootstrap, topic_name(FCR, prefix + "raw."), schema, seconds
        )
        batches = [
            pb.LogBatchRequest(
                events=[
                    pb.Event(schema=FCR, payload_json=json.dumps(payload(b * BATCH + i)))
                    for i in range(BATCH)
                ]
            )
            for b in range(8)
        ]
        sent = 0
        async with grpc.aio.insecure_channel(svc.target) as ch:
            stub = bilog_pb2_grpc.BilogServiceStub(ch)

            async def call(i: int) -> None:
                nonlocal sent
                resp = await stub.LogBatch(batches[i % len(batches)], timeout=30)
                if resp.accepted_count != BATCH:
                    raise RuntimeError(f"only {resp.accepted_count} of {BATCH} accepted")
                sent += BATCH

            batch_m = await closed_loop("LogBatch(500)", call, CONCURRENCY, seconds)
        logged = Measure(
            "bilog LogBatch(500)", batch_m.ops * BATCH, seconds, batch_m.p50_ms, batch_m.p99_ms
        )
        sink = await asyncio.to_thread(bench_sink, stack.kafka_bootstrap, registry_url, topic, sent)
    finally:
        if svc is not None:
            svc.stop()
        registry.terminate()
        registry.wait(10)
        await asyncio.to_thread(drop_database, db)
    ratio = logged.rate / raw.rate if raw.rate else 0.0
    rows: list[dict[str, Any]] = []
    for m, ratio_of, target in (
        (raw, 1.0, None),
        (logged, ratio, TARGET),
        (sink, sink.rate / raw.rate if raw.rate else 0.0, None),
    ):
        rows.append(
            {
                "measure": m.name,
                "rate": m.rate,
                "unit": "events/s",
                "ratio": ratio_of,
                "target": target,
                "ops": m.ops,
                "seconds": m.seconds,
                "p50_ms": m.p50_ms,
                "p99_ms": m.p99_ms,
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window per measure")
    args = ap.parse_args()
    rows = asyncio.run(run(args.seconds))
    print(f"{'measure':<34}{'events/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>7}{'target':>8}")
    for r in rows:
        target = f">={r['target']}" if r["target"] else ""
        print(
            f"{r['measure']:<34}{r['rate']:>10.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
            f"{r['ratio']:>7.2f}{target:>8}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
