"""The file sink: LogBatch -> Kafka -> Avro files read back equal (PII masked), and
exactly once across kill -9 (also right between a publish and its offset commit)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import grpc
from bilog_testlib import MASKED, PHONE, call_record
from crm.bilog.v1 import bilog_pb2 as pb
from crm.bilog.v1 import bilog_pb2_grpc
from crm_bilog.app import App
from crm_bilog.sink.runner import FILE_NAME, Sink, SinkConfig
from crm_bilog.sink.storage import LocalStorage
from crm_devstack import wait_until

HOUR_MS = 3_600_000
BASE_MS = 1_763_798_400_000  # 2025-11-22T08:00:00Z


def read_files(root: Path, topic: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """``(relative path, records)`` of every published file of a topic."""
    out = []
    for path in sorted((root / topic).rglob("*.avro")):
        with path.open("rb") as f:
            out.append((path.relative_to(root).as_posix(), list(fastavro.reader(f))))
    return out


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def count_records(root: Path, topic: str) -> int:
    return sum(len(recs) for _, recs in read_files(root, topic))


def expected_record(payload: dict[str, Any]) -> dict[str, Any]:
    rec = json.loads(json.dumps(payload))
    rec["contact_phone"] = MASKED
    ts = rec["operator_header"]["timestamp"]
    rec["operator_header"]["timestamp"] = datetime.fromtimestamp(ts / 1000, UTC)
    return rec


async def log_batches(app: App, payloads: list[dict[str, Any]], size: int = 500) -> int:
    accepted = 0
    async with grpc.aio.insecure_channel(app.target) as ch:
        stub = bilog_pb2_grpc.BilogServiceStub(ch)
        for i in range(0, len(payloads), size):
            events = [
                pb.Event(schema="crm.bi.FactCallRecord", payload_json=json.dumps(p))
                for p in payloads[i : i + size]
            ]
            resp = await stub.LogBatch(pb.LogBatchRequest(events=events), timeout=20)
            accepted += resp.accepted_count
    return accepted


def check_exactly_once(root: Path, topic: str, payloads: list[dict[str, Any]]) -> None:
    files = read_files(root, topic)
    records = [r for _, recs in files for r in recs]
    tags = Counter(r["call_tag_id"] for r in records)
    duplicates = {t: n for t, n in tags.items() if n > 1}
    assert not duplicates, f"duplicated records: {list(duplicates)[:5]}"
    assert set(tags) == {p["call_tag_id"] for p in payloads}
    by_tag = {p["call_tag_id"]: expected_record(p) for p in payloads}
    for rel, recs in files:
        m = FILE_NAME.match(rel.rpartition("/")[2])
        assert m is not None
        assert int(m.group("end")) - int(m.group("start")) + 1 == len(recs)
        for r in recs:
            assert r == by_tag[r["call_tag_id"]]
            t = r["operator_header"]["timestamp"]
            assert f"/dt={t:%Y-%m-%d}/hour={t:%H}/" in f"/{rel}"
    # offsets of each partition are covered without overlap
    spans: dict[int, list[tuple[int, int]]] = {}
    for rel, _ in files:
        m = FILE_NAME.match(rel.rpartition("/")[2])
        assert m is not None
        spans.setdefault(int(m.group("partition")), []).append(
            (int(m.group("start")), int(m.group("end")))
        )
    for ranges in spans.values():
        ranges.sort()
        for (_, end), (start, _) in itertools.pairwise(ranges):
            assert start == end + 1


async def test_round_trip_log_batch_to_files(app: App, tmp_path: Path) -> None:
    payloads = [call_record(i, ts=BASE_MS + (i % 3) * HOUR_MS + i) for i in range(300)]
    bad = call_record(999)
    bad["call_type"] = "NOPE"
    assert await log_batches(app, [*payloads, bad]) == 300
    topic = f"{app.settings.topic_prefix}fact_call_record"
    config = SinkConfig(
        bootstrap=app.settings.kafka_bootstrap,
        group_id=app.settings.sink_group_id,
        topics=[topic, app.settings.failed_topic],
        registry_url=app.settings.schema_registry_url,
        flush_records=64,
        idle_flush_s=0.5,
        session_timeout_ms=3000,
    )
    sink = Sink(config, LocalStorage(tmp_path))
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    thread.start()
    try:
        await asyncio.to_thread(
            wait_until, lambda: count_records(tmp_path, topic) >= 300, "300 records in files", 60
        )
        await asyncio.to_thread(
            wait_until,
            lambda: count_records(tmp_path, app.settings.failed_topic) >= 1,
            "the bad row in a file",
        )
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
    check_exactly_once(tmp_path, topic, payloads)
    hours = {rel.split("/")[2] for rel, _ in read_files(tmp_path, topic)}
    assert hours == {"hour=08", "hour=09", "hour=10"}
    assert not files_containing(tmp_path, PHONE.encode())
    ((_, (row,)),) = read_files(tmp_path, app.settings.failed_topic)
    assert row["schema"] == "crm.bi.FactCallRecord"
    assert json.loads(row["payload_json"])["contact_phone"] == MASKED


def start_sink(app: App, root: Path, topic: str, crash_after: int = 0) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CRM_BILOG_KAFKA_BOOTSTRAP": app.settings.kafka_bootstrap,
        "CRM_BILOG_SCHEMA_REGISTRY_URL": app.settings.schema_registry_url,
        "CRM_BILOG_TOPIC_PREFIX": app.settings.topic_prefix,
        "CRM_BILOG_SINK_DIR": str(root),
        "CRM_BILOG_SINK_GROUP_ID": app.settings.sink_group_id,
        "CRM_BILOG_SINK_TOPICS": topic,
        "CRM_BILOG_SINK_FLUSH_RECORDS": "40",
        "CRM_BILOG_SINK_IDLE_FLUSH_S": "1",
        "CRM_BILOG_SINK_SESSION_TIMEOUT_MS": "3000",
        "CRM_BILOG_SINK_TEST_CRASH_AFTER_PUBLISHES": str(crash_after),
        "CRM_BILOG_SINK_PORT": "0",  # health on a free port
        "CRM_BILOG_SINK_METRICS_PORT": "-1",
        "CRM_BILOG_LOG_LEVEL": "WARNING",
    }
    log = (root.parent / "sink.log").open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "crm_bilog", "sink"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def kill9(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


async def test_kill_9_mid_batch_leaves_every_acked_event_exactly_once(
    app: App, tmp_path: Path
) -> None:
    payloads = [call_record(i, ts=BASE_MS + (i // 150) * HOUR_MS + i) for i in range(900)]
    assert await log_batches(app, payloads) == 900
    topic = f"{app.settings.topic_prefix}fact_call_record"
    root = tmp_path / "files"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # 1. dies right after its 3rd publish, before committing it (the worst moment)
        procs.append(start_sink(app, root, topic, crash_after=3))
        code = await asyncio.to_thread(procs[-1].wait, 90)
        assert code == 137
        published = count_records(root, topic)
        assert 0 < published < 900
        # 2. killed with SIGKILL from outside while it is writing
        procs.append(start_sink(app, root, topic))
        await asyncio.to_thread(
            wait_until,
            lambda: count_records(root, topic) >= published + 120,
            "more files after the restart",
            60,
        )
        kill9(procs[-1])
        assert count_records(root, topic) < 900
        # 3. runs to the end
        procs.append(start_sink(app, root, topic))
        await asyncio.to_thread(
            wait_until, lambda: count_records(root, topic) >= 900, "all 900 records", 90
        )
        procs[-1].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(procs[-1].wait, 30) == 0
    finally:
        for p in procs:
            kill9(p)
    check_exactly_once(root, topic, payloads)
    assert not list(root.rglob(".*.tmp"))
