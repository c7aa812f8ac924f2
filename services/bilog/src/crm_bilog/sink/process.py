"""``python -m crm_bilog sink``: the sink in the main thread, its health and ``/metrics``
in a thread (:class:`crm_common.health.HealthThread`).

Health on ``sink_port`` (names :data:`SINK_HEALTH_NAME` and ``""``): SERVING while the
consume loop comes round (at least every ``sink_stall_s``), the sink joined its group
and the broker answers a metadata request; a paused or unreachable broker turns it
NOT_SERVING. ``liveness`` turns NOT_SERVING only when the loop itself is stuck (a hung
consumer or file system), never for a broker or registry outage, so the liveness probe
restarts a hung sink and nothing else. ``/metrics`` on ``sink_metrics_port``.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

from crm_common.health import HealthThread
from crm_common.metrics import RpcMetrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from crm_bilog.settings import BilogSettings
from crm_bilog.sink.runner import Sink, SinkConfig
from crm_bilog.sink.storage import LocalStorage

__all__ = [
    "SINK_HEALTH_NAME",
    "SinkCollector",
    "run_sink",
    "sink_config",
    "sink_health",
    "sink_topics",
]

SINK_HEALTH_NAME = "crm.bilog.sink"
"""Health name of the file sink (besides ``""`` and ``liveness``)."""


class SinkCollector(Collector):
    """The sink's counters, read at scrape time."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def collect(self) -> Iterator[Metric]:
        stats = self._sink.stats
        for name, doc, value in (
            ("crm_bilog_sink_records", "Records written to published files.", stats.records),
            ("crm_bilog_sink_files", "Files published.", stats.files),
            ("crm_bilog_sink_unreadable", "Records kept in _unreadable/.", stats.unreadable),
            ("crm_bilog_sink_skipped", "Tombstones skipped.", stats.skipped),
            (
                "crm_bilog_sink_commit_failures",
                "Offset commits that failed (the files stay the truth).",
                stats.commits_failed,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "crm_bilog_sink_assigned_partitions",
            "Partitions this sink owns now.",
            value=len(self._sink.assigned),
        )
        yield GaugeMetricFamily(
            "crm_bilog_sink_seconds_since_progress",
            "Seconds since the consume loop last came round.",
            value=self._sink.seconds_since_progress(),
        )


def sink_topics(settings: BilogSettings) -> list[str]:
    """The configured topics, or every schema topic (bad rows included)."""
    if settings.sink_topics.strip():
        raw = settings.sink_topics.strip()
        return [raw] if raw.startswith("^") else [t.strip() for t in raw.split(",") if t.strip()]
    from crm_bilog.domain.pii import PiiPolicy
    from crm_bilog.schemas import SchemaCatalog, topic_name

    catalog = SchemaCatalog.load(PiiPolicy(settings.pii_hash_key_bytes))
    return [topic_name(s.name, settings.topic_prefix) for s in catalog]


def sink_config(settings: BilogSettings) -> SinkConfig:
    crash = int(os.environ.get("CRM_BILOG_SINK_TEST_CRASH_AFTER_PUBLISHES", "0") or 0)
    return SinkConfig(
        bootstrap=settings.kafka_bootstrap,
        group_id=settings.sink_group_id,
        topics=sink_topics(settings),
        registry_url=settings.schema_registry_url,
        flush_records=settings.sink_flush_records,
        rotate_interval_s=settings.sink_rotate_interval_s,
        idle_flush_s=settings.sink_idle_flush_s,
        session_timeout_ms=settings.sink_session_timeout_ms,
        crash_after_publishes=crash,
    )


def sink_health(sink: Sink, settings: BilogSettings) -> HealthThread:
    """The sink's health/metrics server (not started)."""
    metrics = RpcMetrics("bilog-sink")
    metrics.registry.register(SinkCollector(sink))
    stall = settings.sink_stall_s
    timeout = settings.readiness_timeout_s * 0.8  # answers before the check times out
    return HealthThread(
        SINK_HEALTH_NAME,
        settings.model_copy(
            update={"port": settings.sink_port, "metrics_port": settings.sink_metrics_port}
        ),
        {
            "progress": lambda: sink.check_progress(stall),
            "kafka": lambda: sink.check_broker(timeout),
        },
        metrics,
        liveness_checks={"progress": lambda: sink.check_progress(stall)},
    )


def run_sink(settings: BilogSettings) -> None:
    """Sinks until SIGTERM/SIGINT, then publishes what it buffered and leaves."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sink = Sink(sink_config(settings), LocalStorage(settings.sink_dir))
    health = sink_health(sink, settings)
    health.start()
    try:
        sink.run(stop)
    finally:
        health.stop()
