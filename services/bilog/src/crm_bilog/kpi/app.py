"""Wiring of the KPI consumer: ``build_kpi_app(settings) -> KpiApp``::

    app = build_kpi_app(BilogSettings(kpi_port=0, kpi_metrics_port=0, ...))
    async with app:                  # consumer thread + health/metrics server
        await app.wait_ready(30)     # every owned partition replayed its history
        ...                          # scrape app.server.metrics_port

Building does no I/O. The gRPC server (``crm_common`` kit) serves only health and
reflection on ``kpi_port``; ``/metrics`` on ``kpi_metrics_port`` carries the KPIs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field

from confluent_kafka.schema_registry import SchemaRegistryClient
from crm_common.app import ServiceApp
from crm_common.metrics import RpcMetrics
from crm_common.server import GrpcServer

from crm_bilog.kpi.consumer import KpiConsumer, KpiConsumerConfig
from crm_bilog.kpi.decode import Decoder, kpi_topics
from crm_bilog.kpi.metrics import KpiMetrics
from crm_bilog.settings import BilogSettings

__all__ = ["KPI_HEALTH_NAME", "KpiApp", "build_kpi_app"]

log = logging.getLogger("crm.bilog.kpi")

KPI_HEALTH_NAME = "crm.bilog.kpi"
"""Health name of the KPI consumer (besides ``""`` and ``liveness``)."""


@dataclass
class KpiApp(ServiceApp):
    """The assembled KPI consumer (see module doc)."""

    settings: BilogSettings
    server: GrpcServer
    consumer: KpiConsumer
    metrics: KpiMetrics
    stop_event: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    async def start(self) -> None:
        self._thread = threading.Thread(
            target=self.consumer.run, args=(self.stop_event,), name="crm-kpi-consumer", daemon=True
        )
        self._thread.start()
        await self.server.start()

    async def before_stop(self) -> None:
        self.stop_event.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)


def build_kpi_app(settings: BilogSettings) -> KpiApp:
    """Assemble the KPI consumer from its settings (no I/O)."""
    stop_event = threading.Event()
    rpc_metrics = RpcMetrics("bilog-kpi")
    consumer_box: list[KpiConsumer] = []
    metrics = KpiMetrics(rpc_metrics.registry, lambda: consumer_box[0].gauges())
    decoder = Decoder(
        SchemaRegistryClient({"url": settings.schema_registry_url, "timeout": 5}),
        should_stop=stop_event.is_set,
    )
    consumer = KpiConsumer(
        KpiConsumerConfig(
            bootstrap=settings.kafka_bootstrap,
            group_id=settings.kpi_group_id,
            topics=kpi_topics(settings.topic_prefix),
            retention_ms=int(settings.kpi_retention_s * 1000),
            window_ms=int(settings.kpi_window_s * 1000),
            max_call_tags=settings.kpi_max_call_tags,
            session_timeout_ms=settings.kpi_session_timeout_ms,
        ),
        decoder,
        metrics,
    )
    consumer_box.append(consumer)

    async def rebuilt() -> None:
        if not consumer.rebuilt:
            raise RuntimeError("partitions not assigned or history not replayed yet")

    server = GrpcServer(
        [KPI_HEALTH_NAME],
        settings.model_copy(
            update={"port": settings.kpi_port, "metrics_port": settings.kpi_metrics_port}
        ),
        readiness_checks={"kafka": rebuilt},
        metrics=rpc_metrics,
    )
    return KpiApp(
        settings=settings,
        server=server,
        consumer=consumer,
        metrics=metrics,
        stop_event=stop_event,
    )
