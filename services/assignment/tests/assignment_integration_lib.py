"""Helpers of the integration tests: the recommendation and bilog services (real, each in
a thread with its own event loop), the dev schema registry and a Kafka reader (bilog's
own, from its tests), a stand-in slow recommendation server."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc
from bilog_testlib import ServiceThread, read_topic
from bilog_testlib import settings_for as bilog_settings
from crm.recommendation.v1 import recommendation_pb2 as rpb
from crm.recommendation.v1 import recommendation_pb2_grpc
from crm_devstack.apps import AppThread
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


class BilogService(ServiceThread):
    """The real bilog service (crm_bilog.app.build_app) against the shared Tansu broker,
    with topics of its own (``topic_prefix``)."""

    def __init__(self, kafka_bootstrap: str, registry_url: str, port: int = 0) -> None:
        super().__init__(
            bilog_settings(kafka_bootstrap, registry_url, port=port, shutdown_grace_s=1),
            stop_grace=1,
        )

    @property
    def transition_topic(self) -> str:
        return self.topic("crm.bi.TaskTransition")


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
    ctx = SerializationContext(topic, MessageField.VALUE)
    return [
        (msg.key(), deserialize(msg.value(), ctx), dict(msg.headers() or ()))
        for msg in read_topic(bootstrap, topic, expected, timeout)
    ]
