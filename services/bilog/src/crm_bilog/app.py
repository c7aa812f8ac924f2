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
import signal
from dataclasses import dataclass, field
from types import TracebackType

from crm.bilog.v1 import bilog_pb2, bilog_pb2_grpc
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
class App:
    """The assembled service (see module doc); attributes are for tests and tools."""

    settings: BilogSettings
    catalog: SchemaCatalog
    producer: KafkaProducer
    ids: SchemaIds
    intake: Intake
    servicer: BilogServicer
    server: GrpcServer
    metrics: RpcMetrics
    _stopped: bool = field(default=False, repr=False)

    @property
    def port(self) -> int:
        if self.server.port is None:
            raise RuntimeError("the app is not started")
        return self.server.port

    @property
    def target(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self) -> None:
        if self.settings.uses_dev_key:
            log.warning(
                "the PII hash key is the development default: set CRM_BILOG_PII_HASH_KEY "
                "outside development"
            )
        await self.producer.start()
        await self.server.start()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until Kafka answers and the schema ids are known (what health waits for)."""
        async with asyncio.timeout(timeout):
            while True:
                if not await self.server.check_readiness():
                    return
                await asyncio.sleep(0.05)

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.server.stop(grace)

    async def run_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        requested = asyncio.Event()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, requested.set)
        try:
            await self.start()
            await requested.wait()
            log.info("stop signal received")
        finally:
            try:
                await self.stop()
            finally:
                for sig in signals:
                    loop.remove_signal_handler(sig)

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


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
