"""Helpers of the integration tests: the recommendation and bilog services (real, each in
a thread with its own event loop), the dev schema registry, a Kafka reader, a stand-in
slow recommendation server, free ports."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from crm.recommendation.v1 import recommendation_pb2 as rpb
from crm.recommendation.v1 import recommendation_pb2_grpc
from crm_bilog.app import App as BilogApp
from crm_bilog.app import build_app as build_bilog
from crm_bilog.registry.server import RegistryServer
from crm_bilog.schemas import topic_name
from crm_bilog.settings import BilogSettings
from crm_bilog.store import RegistryStore, make_engine
from crm_bilog.store.migrate import upgrade as upgrade_bilog
from crm_common.aio import BlockingExecutor
from crm_devstack.apps import AppThread, LoopThread
from crm_devstack.stack import create_database, drop_database
from crm_recommendation.app import App as RecommendationApp
from crm_recommendation.app import build_app as build_recommendation
from crm_recommendation.settings import RecommendationSettings
from crm_recommendation.store.migrate import upgrade as upgrade_recommendation

T = TypeVar("T")


@contextmanager
def scratch_database() -> Iterator[str]:
    """A fresh MariaDB database for another service, dropped afterwards."""
    name = f"crm_t_{uuid.uuid4().hex[:12]}"
    url = create_database(name)
    try:
        yield url
    finally:
        drop_database(name)


# --------------------------------------------------------------------------- recommendation


class RecommendationService(AppThread[RecommendationApp]):
    """The real recommendation service (crm_recommendation.app.build_app), port 0."""

    def __init__(self, database_url: str, etcd: str) -> None:
        upgrade_recommendation(database_url)
        settings = RecommendationSettings(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            database_url=database_url,
            db_pool_size=4,
            etcd_endpoints=etcd,
            config_prefix=f"/crm-test/{uuid.uuid4().hex[:12]}/config",
            refresh_interval_s=0.1,
            shutdown_grace_s=1.0,
            readiness_interval_s=0.2,
        )
        super().__init__(lambda: build_recommendation(settings), stop_grace=1)
        self.stub = recommendation_pb2_grpc.RecommendationServiceStub(self.channel)


def car(car_id: int, brand: str, series: str, price: int, city: str = "beijing") -> rpb.Car:
    return rpb.Car(
        id=car_id,
        brand=brand,
        series=series,
        model_year=2020,
        mileage_km=30_000,
        price_yuan=price,
        city=city,
        body_type=rpb.BODY_TYPE_SEDAN,
        status=rpb.CAR_STATUS_ON_SALE,
    )


class SlowRecommendationStandIn(recommendation_pb2_grpc.RecommendationServiceServicer):
    """A STAND-IN for the recommendation service (not the real one): its Recommend
    answers only after ``delay_s``, to test the caller's deadline."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.calls = 0

    def Recommend(self, request: rpb.RecommendRequest, context: Any) -> rpb.RecommendResponse:
        self.calls += 1
        time.sleep(self.delay_s)
        return rpb.RecommendResponse()


@contextmanager
def slow_recommendation_standin(delay_s: float) -> Iterator[tuple[str, SlowRecommendationStandIn]]:
    """``(target, servicer)`` of a running :class:`SlowRecommendationStandIn`."""
    servicer = SlowRecommendationStandIn(delay_s)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    recommendation_pb2_grpc.add_RecommendationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0)


# --------------------------------------------------------------------------- bilog


class Registry(LoopThread):
    """The bilog service's dev schema registry (real aiohttp server, real MariaDB)."""

    def __init__(self, database_url: str) -> None:
        super().__init__()
        upgrade_bilog(database_url)
        self.engine = make_engine(database_url, 4)
        self.executor = BlockingExecutor(4, name="test-registry-db")
        self.server = RegistryServer(RegistryStore(self.engine), self.executor, "127.0.0.1", 0)
        self.call(self.server.start())
        self.url: str = self.server.url

    def close(self) -> None:
        try:
            self.call(self.server.stop())
            self.executor.shutdown()
            self.engine.dispose()
        finally:
            super().close()


class BilogService(AppThread[BilogApp]):
    """The real bilog service (crm_bilog.app.build_app) against the shared Tansu broker,
    with topics of its own (``topic_prefix``)."""

    def __init__(self, kafka_bootstrap: str, registry_url: str, port: int = 0) -> None:
        self.settings = BilogSettings(
            host="127.0.0.1",
            port=port,
            metrics_port=-1,
            kafka_bootstrap=kafka_bootstrap,
            topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
            schema_registry_url=registry_url,
            readiness_interval_s=0.2,
            readiness_timeout_s=10,
            shutdown_grace_s=1,
        )
        super().__init__(lambda: build_bilog(self.settings), stop_grace=1)

    @property
    def transition_topic(self) -> str:
        return self.topic("crm.bi.TaskTransition")

    def topic(self, schema: str) -> str:
        """The Kafka topic of a schema's events (with this instance's prefix)."""
        return topic_name(schema, self.settings.topic_prefix)


def read_avro_topic(
    bootstrap: str, registry_url: str, topic: str, expected: int, timeout: float = 30.0
) -> list[tuple[bytes, dict[str, Any]]]:
    """``(key, decoded value)`` of every message of ``topic`` (all partitions, from the
    start) once at least ``expected`` arrived and nothing more comes for a moment; values
    decoded by confluent-kafka's own AvroDeserializer through the registry."""
    return [
        (key, value)
        for key, value, _ in read_avro_records(bootstrap, registry_url, topic, expected, timeout)
    ]


def read_avro_records(
    bootstrap: str, registry_url: str, topic: str, expected: int, timeout: float = 30.0
) -> list[tuple[bytes, dict[str, Any], dict[str, bytes]]]:
    """:func:`read_avro_topic` with each record's headers: ``(key, value, headers)``, in
    offset order per partition."""
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    deserialize = AvroDeserializer(SchemaRegistryClient({"url": registry_url}))
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
        out: list[tuple[bytes, dict[str, Any], dict[str, bytes]]] = []
        deadline = time.monotonic() + timeout
        quiet_until: float | None = None
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                if len(out) >= expected:
                    quiet_until = quiet_until or time.monotonic() + 0.5
                    if time.monotonic() >= quiet_until:
                        break
                continue
            if msg.error() is None:
                ctx = SerializationContext(topic, MessageField.VALUE)
                headers = dict(msg.headers() or ())
                out.append((msg.key(), deserialize(msg.value(), ctx), headers))
                quiet_until = None
        return out
    finally:
        consumer.close()
