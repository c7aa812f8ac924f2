"""Wiring of the bilog service: ``build_app(settings) -> App``.

Used by ``python -m crm_bilog serve``, the tests (in-process on port 0) and the
benchmark::

    app = build_app(BilogSettings(port=0, metrics_port=-1, kafka_bootstrap=..., ...))
    async with app:                 # start(); stop() on exit
        await app.wait_ready(10)    # Kafka answers, topics exist, schema ids known
        channel = grpc.aio.insecure_channel(app.target)

Building does no I/O. ``start()`` starts the producer's poll thread and the gRPC server;
health stays NOT_SERVING until Kafka answers a metadata request (topics are created on
the first success) and the schemas are registered (or looked up) in the registry.
``stop()`` drains the server, then flushes the producer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from crm.bilog.v1 import bilog_pb2, bilog_pb2_grpc
from crm_common.app import ServiceApp
from crm_common.metrics import RpcMetrics
from crm_common.server import GrpcServer
from prometheus_client import Counter

from crm_bilog.api.servicer import BilogServicer
from crm_bilog.domain.pii import PiiPolicy
from crm_bilog.producer.intake import Intake
from crm_bilog.producer.kafka import KafkaProducer, producer_config
from crm_bilog.registry.ids import SchemaIds
from crm_bilog.schemas import SchemaCatalog
from crm_bilog.settings import BilogSettings

__all__ = ["SERVICE_NAME", "App", "build_app"]

log = logging.getLogger("crm.bilog")

SERVICE_NAME: str = bilog_pb2.DESCRIPTOR.services_by_name["BilogService"].full_name


@dataclass
class App(ServiceApp):
    """The assembled service (see module doc); attributes are for tests and tools."""

    settings: BilogSettings
    catalog: SchemaCatalog
    producer: KafkaProducer
    ids: SchemaIds
    intake: Intake
    servicer: BilogServicer
    server: GrpcServer
    metrics: RpcMetrics

    async def start(self) -> None:
        if self.settings.uses_dev_key:
            log.warning(
                "the PII hash key is the development default: set CRM_BILOG_PII_HASH_KEY "
                "outside development"
            )
        await self.producer.start()
        await self.server.start()


def build_app(settings: BilogSettings, *, catalog: SchemaCatalog | None = None) -> App:
    """Assemble the service from its settings (no I/O); ``catalog`` replaces the packaged
    schemas (tests)."""
    pii = PiiPolicy(settings.pii_hash_key_bytes)
    catalog = catalog or SchemaCatalog.load(pii)
    producer = KafkaProducer(
        producer_config(
            settings.kafka_bootstrap,
            compression=settings.compression,
            linger_ms=settings.linger_ms,
            queue_max_messages=settings.queue_max_messages,
            message_timeout_ms=settings.message_timeout_ms,
        ),
        produce_timeout_s=settings.produce_timeout_s,
    )
    ids = SchemaIds(settings.schema_registry_url, auto_register=settings.auto_register_schemas)
    metrics = RpcMetrics("bilog")
    events_total = Counter(
        "crm_bilog_events_total",
        "Events handled, by schema and outcome (accepted / rejected).",
        ["schema", "outcome"],
        registry=metrics.registry,
    )

    def on_outcomes(schema: str, accepted: int, rejected: int) -> None:
        if accepted:
            events_total.labels(schema, "accepted").inc(accepted)
        if rejected:
            events_total.labels(schema, "rejected").inc(rejected)

    intake = Intake(
        catalog,
        producer,
        ids,
        topic_prefix=settings.topic_prefix,
        max_payload_bytes=settings.max_payload_bytes,
        on_outcomes=on_outcomes,
    )
    servicer = BilogServicer(intake, max_batch_events=settings.max_batch_events)
    topics_ready = False

    async def kafka_ready() -> None:
        nonlocal topics_ready
        await producer.ping(timeout=settings.readiness_timeout_s)
        if not topics_ready:
            await producer.ensure_topics(
                intake.topics, settings.topic_partitions, settings.topic_replication
            )
            topics_ready = True

    async def registry_ready() -> None:
        if not ids.resolved:
            await ids.resolve(intake.subjects)

    server = GrpcServer(
        [SERVICE_NAME],
        settings,
        [(bilog_pb2_grpc.add_BilogServiceServicer_to_server, servicer)],
        readiness_checks={"kafka": kafka_ready, "schema_registry": registry_ready},
        metrics=metrics,
    )

    async def close_resources() -> None:
        await producer.aclose()
        await asyncio.to_thread(ids.close)

    server.on_stop.append(close_resources)
    return App(
        settings=settings,
        catalog=catalog,
        producer=producer,
        ids=ids,
        intake=intake,
        servicer=servicer,
        server=server,
        metrics=metrics,
    )
