"""Test helpers: the dev registry in a thread, settings, Kafka reading, sample events."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from crm_bilog.app import App, build_app
from crm_bilog.registry.server import RegistryServer
from crm_bilog.schemas import topic_name
from crm_bilog.settings import BilogSettings
from crm_bilog.store import RegistryStore, make_engine
from crm_bilog.store.migrate import upgrade
from crm_common.aio import BlockingExecutor
from crm_devstack.apps import AppThread, LoopThread
from crm_devstack.stack import create_database, drop_database

T = TypeVar("T")

PHONE = "13812345678"
MASKED = "138****5678"


class RegistryThread(LoopThread):
    """The dev registry (real aiohttp server, real MariaDB) on its own loop and thread,
    so blocking clients (confluent's SchemaRegistryClient) can call it from tests."""

    def __init__(self, database_url: str) -> None:
        super().__init__()
        self.engine = make_engine(database_url, 4)
        self.executor = BlockingExecutor(4, name="test-registry-db")
        self.server = RegistryServer(RegistryStore(self.engine), self.executor, "127.0.0.1", 0)
        self.call(self.server.start())

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        self.call(self.server.stop())
        self.executor.shutdown()
        self.engine.dispose()
        super().close()


@contextlib.contextmanager
def scratch_registry() -> Iterator[RegistryThread]:
    """The dev registry on a fresh MariaDB database of its own (schema at head), dropped
    afterwards; bilog's tests and other services' tests that read BI topics use it."""
    name = f"crm_t_{uuid.uuid4().hex[:12]}"
    url = create_database(name)
    try:
        upgrade(url)
        reg = RegistryThread(url)
        try:
            yield reg
        finally:
            reg.close()
    finally:
        drop_database(name)


def settings_for(bootstrap: str, registry_url: str, **overrides: Any) -> BilogSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": -1,
        "kafka_bootstrap": bootstrap,
        "topic_prefix": f"t{uuid.uuid4().hex[:10]}.",
        "schema_registry_url": registry_url,
        "readiness_interval_s": 0.2,
        "readiness_timeout_s": 10,
        "shutdown_grace_s": 2,
        "sink_session_timeout_ms": 3000,
        "sink_group_id": f"sink-{uuid.uuid4().hex[:8]}",
    }
    values.update(overrides)
    return BilogSettings(**values)


def call_record(i: int, *, line: int = 2, ts: int | None = None) -> dict[str, Any]:
    """A valid FactCallRecord payload (the seed's example)."""
    return {
        "business_line": line,
        "bundle_id": f"bundle-{i % 7}",
        "call_type": "CALLIN" if i % 2 else "CALLOUT",
        "contact_phone": PHONE,
        "call_tag_id": f"tag-{i}",
        "provider_type": ("ZT", "RL", "TR")[i % 3],
        "operator_header": {
            "timestamp": ts if ts is not None else 1_763_800_000_000 + i * 1000,
            "http_host": "console.local",
            "request_id": f"req-{i}",
            "operator_id": None if i % 5 == 0 else 1000 + i,
        },
    }


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[Any]:
    """Every message of ``topic`` (all partitions, from the start), once at least
    ``expected`` arrived and nothing more comes for a moment."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)]
        )
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        quiet_until = None
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                if len(out) >= expected:
                    quiet_until = quiet_until or time.monotonic() + 0.5
                    if time.monotonic() >= quiet_until:
                        break
                continue
            if msg.error() is None:
                out.append(msg)
                quiet_until = None
        return out
    finally:
        consumer.close()


class ServiceThread(AppThread[App]):
    """The bilog app served from a thread with its own event loop (for sync tests)."""

    def __init__(self, settings: BilogSettings, stop_grace: float = 2.0) -> None:
        self.settings = settings
        super().__init__(lambda: build_app(settings), stop_grace=stop_grace)

    def topic(self, schema: str) -> str:
        """The Kafka topic of a schema's events (with this instance's prefix)."""
        return topic_name(schema, self.settings.topic_prefix)
