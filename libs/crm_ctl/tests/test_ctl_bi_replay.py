"""``crmctl bi replay`` against the real pipeline: the bilog intake service and the dev
schema registry (real MariaDB) on the shared Tansu broker. A bad row that no released
schema accepts stays failing (exit 1); offsets are committed after a real run."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import grpc
import pytest
from crm.bilog.v1 import bilog_pb2 as pb
from crm.bilog.v1 import bilog_pb2_grpc
from crm_bilog.app import build_app
from crm_bilog.registry.server import RegistryServer
from crm_bilog.settings import BilogSettings
from crm_bilog.store import RegistryStore, make_engine
from crm_bilog.store.migrate import upgrade
from crm_common.aio import BlockingExecutor
from crm_devstack.apps import LoopThread
from crm_devstack.stack import Stack, create_database, drop_database
from ctl_testlib import ThreadedApp, crmctl


@pytest.fixture
def registry_url(stack: Stack) -> Iterator[str]:
    """The dev schema registry over a database of its own, on a loop in a thread."""
    name = f"crm_t_{uuid.uuid4().hex[:12]}"
    url = create_database(name)
    loop = LoopThread()
    engine = make_engine(url, 2)
    executor = BlockingExecutor(2, name="ctl-test-registry")
    server = RegistryServer(RegistryStore(engine), executor, "127.0.0.1", 0)
    try:
        upgrade(url)
        loop.call(server.start(), 30)
        yield server.url
        loop.call(server.stop(), 30)
    finally:
        executor.shutdown()
        engine.dispose()
        loop.close()
        drop_database(name)


def test_bi_replay(stack: Stack, registry_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "CRM_BILOG_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "CRM_BILOG_SCHEMA_REGISTRY_URL": registry_url,
        "CRM_BILOG_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
        "CRM_BILOG_SINK_GROUP_ID": f"sink-{uuid.uuid4().hex[:8]}",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = BilogSettings(host="127.0.0.1", port=0, metrics_port=-1, readiness_interval_s=0.2,
                             readiness_timeout_s=10, shutdown_grace_s=2)  # fmt: skip
    app = ThreadedApp(lambda: build_app(settings))
    try:
        bad = {"schema_version": 1, "business_line": "SALE"}  # far from a FactCallRecord
        with grpc.insecure_channel(app.target) as ch:
            resp = bilog_pb2_grpc.BilogServiceStub(ch).LogBatch(
                pb.LogBatchRequest(events=[pb.Event(schema="crm.bi.FactCallRecord",
                                                    payload_json=json.dumps(bad))]),
                timeout=20,
            )  # fmt: skip
        assert resp.rejected_count == 1  # written to the failed-events topic as a bad row
    finally:
        app.close()

    dry = crmctl("bi", "replay", "--dry-run", "--from-beginning")
    assert dry.code == 1, dry.err  # still failing: no released schema accepts it
    assert "Read:           1" in dry.out
    assert "Still failing:  1" in dry.out
    assert "(dry run)" in dry.out

    real = crmctl("-o", "json", "bi", "replay")
    assert real.code == 1, real.err
    assert real.json() == {
        "read": 1, "replayed": 0, "still_failing": 1, "unrecoverable": 0, "by_schema": {},
        "dry_run": False,
    }  # fmt: skip
    # the offsets were committed: the next run reads only the bad row written again
    again = crmctl("-o", "json", "bi", "replay")
    assert again.json()["read"] == 1
    none_left = crmctl("-o", "json", "bi", "replay", "--schema", "crm.bi.TaskTransition")
    assert none_left.json()["still_failing"] == 0
    assert none_left.code == 0
