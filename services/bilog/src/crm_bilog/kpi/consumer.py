"""The KPI consumer: a consumer group member folding the BI topics into KPI state.

On every partition assignment it reads the partition from its beginning: records before
the group's committed offset are *history* (they rebuild the state: gauges, dedupe keys,
pending waits; nothing is counted), records from the committed offset on are *live*
(their observations are exported). After each batch it commits the offsets of the live
records it applied (never a position inside the history, so a crash mid-rebuild does not
move the boundary back). See :mod:`crm_bilog.kpi` for the consequences.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from crm_bilog.consumer import committed_offsets, manual_commit_consumer
from crm_bilog.domain import wire
from crm_bilog.kpi.decode import Decoder, UnknownSchema
from crm_bilog.kpi.domain import Event, Gauges, PartitionKpis
from crm_bilog.kpi.metrics import KpiMetrics

__all__ = ["KpiConsumer", "KpiConsumerConfig"]

log = logging.getLogger("crm.bilog.kpi")


@dataclass(frozen=True)
class KpiConsumerConfig:
    """What the consumer needs (built from :class:`crm_bilog.settings.BilogSettings`)."""

    bootstrap: str
    group_id: str
    topics: Sequence[str]
    retention_ms: int = 24 * 3600 * 1000
    window_ms: int = 15 * 60 * 1000
    max_call_tags: int = 50
    session_timeout_ms: int = 10_000


@dataclass
class _Partition:
    kpis: PartitionKpis
    live_from: int
    """First offset counted (the committed offset at assignment)."""
    rebuilt: bool = False
    to_commit: int | None = None
    applied: int = field(default=0)


class KpiConsumer:
    """``run(stop)`` blocks until ``stop`` is set; ``gauges()`` and ``rebuilt`` may be
    read from other threads (the scrape thread, the readiness check)."""

    def __init__(self, config: KpiConsumerConfig, decoder: Decoder, metrics: KpiMetrics) -> None:
        self.config = config
        self._decoder = decoder
        self._metrics = metrics
        self._lock = threading.Lock()
        self._parts: dict[tuple[str, int], _Partition] = {}
        self._consumer: Consumer | None = None
        self.assigned = threading.Event()
        """Set once the first partition assignment was handled."""

    # -- read side (other threads) -------------------------------------------------------

    def gauges(self) -> list[tuple[str, Gauges]]:
        with self._lock:
            return [(topic, p.kpis.gauges()) for (topic, _), p in self._parts.items()]

    @property
    def rebuilt(self) -> bool:
        """Assigned, and every owned partition replayed its history."""
        with self._lock:
            return self.assigned.is_set() and all(p.rebuilt for p in self._parts.values())

    # -- consumer plumbing ---------------------------------------------------------------

    def _new_consumer(self) -> Consumer:
        c = self.config
        return manual_commit_consumer(
            c.bootstrap,
            c.group_id,
            session_timeout_ms=c.session_timeout_ms,
            # topics created after the start (by the intake) are picked up soon
            topic_metadata_refresh_interval_ms=10_000,
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        committed = committed_offsets(consumer, partitions)
        with self._lock:
            for tp in partitions:
                key = (tp.topic, tp.partition)
                live_from = committed.get(key, 0)
                part = _Partition(
                    PartitionKpis(
                        retention_ms=self.config.retention_ms,
                        window_ms=self.config.window_ms,
                        max_call_tags=self.config.max_call_tags,
                    ),
                    live_from,
                )
                part.rebuilt = live_from == 0 or self._nothing_before(consumer, tp, live_from)
                self._parts[key] = part
                tp.offset = OFFSET_BEGINNING
        consumer.assign(partitions)
        log.info(
            "partitions assigned; replaying their history",
            extra={
                "partitions": [
                    f"{p.topic}[{p.partition}] live from {committed.get((p.topic, p.partition), 0)}"
                    for p in partitions
                ]
            },
        )
        self.assigned.set()

    @staticmethod
    def _nothing_before(consumer: Consumer, tp: TopicPartition, live_from: int) -> bool:
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=5
            )
        except KafkaException:
            return False
        return bool(live_from <= low or high <= low)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._commit(consumer)
        with self._lock:
            for tp in partitions:
                self._parts.pop((tp.topic, tp.partition), None)
        with contextlib.suppress(KafkaException):
            consumer.unassign()

    def _commit(self, consumer: Consumer) -> None:
        with self._lock:
            offsets = []
            for (topic, partition), p in self._parts.items():
                if p.to_commit is not None:
                    offsets.append(TopicPartition(topic, partition, p.to_commit))
                    p.to_commit = None
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # next batch commits further; a crash recounts these
            log.warning("offset commit failed: %s", exc)

    # -- records -------------------------------------------------------------------------

    def _decode(self, msg: Any) -> Event | None:
        """The record's event, or None (counted) when there is none to apply."""
        topic, value = msg.topic(), msg.value()
        if value is None:
            return None
        try:
            return self._decoder.decode(value)
        except wire.WireFormatError:
            outcome = "unreadable"
        except UnknownSchema as exc:
            log.warning("record skipped: %s", exc, extra={"topic": topic, "offset": msg.offset()})
            outcome = "unknown_schema"
        except Exception as exc:  # a body that does not decode with its schema
            log.warning("undecodable record skipped: %s", type(exc).__name__)
            outcome = "unreadable"
        self._metrics.count_event(topic, outcome)
        return None

    def _apply(self, msg: Any, event: Event | None) -> None:
        """Folds one record in (under the lock)."""
        topic, offset = msg.topic(), msg.offset()
        part = self._parts.get((topic, msg.partition()))
        if part is None:  # revoked meanwhile
            return
        live = offset >= part.live_from
        if live:
            part.to_commit = offset + 1
        if offset >= part.live_from - 1 and not part.rebuilt:
            part.rebuilt = True
            log.info("partition %s[%d] rebuilt", topic, msg.partition())
        if event is None:
            return
        kpis = part.kpis
        duplicates, late = kpis.duplicates, kpis.late
        observations = kpis.apply(event)
        if kpis.duplicates > duplicates:
            outcome = "duplicate"
        elif kpis.late > late:
            outcome = "late"
        else:
            outcome = "applied"
        self._metrics.count_event(topic, outcome)
        part.applied += 1
        if live:
            self._metrics.observe(observations)

    def run(self, stop: threading.Event) -> None:
        consumer = self._new_consumer()
        self._consumer = consumer
        consumer.subscribe(
            list(self.config.topics), on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        log.info("kpi consumer started", extra={"topics": list(self.config.topics)})
        try:
            while not stop.is_set():
                batch = []
                for msg in consumer.consume(num_messages=1000, timeout=0.2):
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer error: %s", err)
                        continue
                    batch.append((msg, self._decode(msg)))  # registry calls: outside the lock
                with self._lock:
                    for msg, event in batch:
                        self._apply(msg, event)
                self._commit(consumer)
        finally:
            with contextlib.suppress(Exception):
                self._commit(consumer)
            with contextlib.suppress(Exception):
                consumer.close()
            self._consumer = None
            log.info("kpi consumer stopped")
