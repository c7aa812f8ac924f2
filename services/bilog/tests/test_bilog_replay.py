"""Bad rows are replayed after a fix: a schema release that accepts them."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import grpc
from bilog_testlib import MASKED, PHONE, call_record, read_topic
from crm.bilog.v1 import bilog_pb2 as pb
from crm.bilog.v1 import bilog_pb2_grpc
from crm_bilog.app import App
from crm_bilog.domain import wire
from crm_bilog.domain.pii import PiiPolicy
from crm_bilog.replay import replay
from crm_bilog.schemas import AVSC_DIR, SchemaCatalog


async def test_replay_after_schema_fix(app: App, tmp_path: Path) -> None:
    new_provider = call_record(1)
    new_provider["provider_type"] = "XY"  # a provider the released schema does not know
    hopeless = call_record(2)
    del hopeless["bundle_id"]
    async with grpc.aio.insecure_channel(app.target) as ch:
        stub = bilog_pb2_grpc.BilogServiceStub(ch)
        events = [
            pb.Event(schema="crm.bi.FactCallRecord", payload_json=json.dumps(p), request_id=r)
            for p, r in ((new_provider, "req-new"), (hopeless, "req-hopeless"))
        ]
        resp = await stub.LogBatch(pb.LogBatchRequest(events=events), timeout=10)
    assert resp.rejected_count == 2
    # the fix: a new schema version with the provider added (BACKWARD compatible)
    fixed_dir = tmp_path / "avsc"
    shutil.copytree(AVSC_DIR, fixed_dir)
    path = fixed_dir / "crm.bi.FactCallRecord.avsc"
    schema = json.loads(path.read_text())
    schema["fields"][5]["type"]["symbols"].append("XY")
    path.write_text(json.dumps(schema))
    fixed = SchemaCatalog.load(PiiPolicy(app.settings.pii_hash_key_bytes), fixed_dir)

    report = await replay(app.settings, catalog=fixed)
    assert (report.read, report.replayed, report.still_failing) == (2, 1, 1)
    topic = f"{app.settings.topic_prefix}fact_call_record"
    (msg,) = await asyncio.to_thread(read_topic, app.settings.kafka_bootstrap, topic, 1)
    datum = wire.decode(msg.value(), fixed["crm.bi.FactCallRecord"].parsed)
    assert datum["provider_type"] == "XY"
    assert msg.headers() == [("x-request-id", b"req-new")]  # the original request's
    assert datum["contact_phone"] == MASKED
    assert PHONE.encode() not in msg.value()
    rows = await asyncio.to_thread(
        read_topic, app.settings.kafka_bootstrap, app.settings.failed_topic, 3
    )
    parsed = app.catalog["crm.bi.FailedEvent"].parsed
    replays = sorted(
        (wire.decode(m.value(), parsed)["replays"], m.headers()[0][1].decode()) for m in rows
    )
    assert replays == [(0, "req-hopeless"), (0, "req-new"), (1, "req-hopeless")]
    # offsets were committed: a second run finds only the re-written bad row
    again = await replay(app.settings, catalog=fixed)
    assert (again.read, again.replayed, again.still_failing) == (1, 0, 1)
