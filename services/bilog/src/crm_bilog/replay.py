"""Replay of bad rows (``python -m crm_bilog replay``): after a fix (a schema release
that accepts them, a corrected enum...), re-submit the events of the failed-events topic.

Reads the failed-events topic as consumer group ``<sink_group_id>-replay`` from its
committed offsets (``--from-beginning``: from the start; events replayed before are then
sent again) until it is quiet for ``idle_s``. Each bad row's payload (PII already
protected when it was written, so not protected again) is validated against the current
schemas: valid ones are produced to their topic, the others are written again as bad
rows with ``replays + 1`` and the new reasons. Offsets are committed only after Kafka
acknowledged what was produced (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from fastavro import parse_schema, schemaless_reader

from crm_bilog.consumer import manual_commit_consumer
from crm_bilog.domain import wire
from crm_bilog.domain.pii import PiiPolicy
from crm_bilog.producer.intake import IncomingEvent, Intake, Rejected
from crm_bilog.producer.kafka import KafkaProducer, OutgoingMessage, producer_config
from crm_bilog.registry.ids import SchemaIds
from crm_bilog.schemas import FAILED_EVENT, SchemaCatalog
from crm_bilog.settings import BilogSettings

__all__ = ["ReplayReport", "replay"]

log = logging.getLogger("crm.bilog.replay")


@dataclass
class ReplayReport:
    """What a replay did."""

    read: int = 0
    replayed: int = 0
    still_failing: int = 0
    unrecoverable: int = 0
    by_schema: dict[str, int] = field(default_factory=dict)


def _read_bad_rows(
    settings: BilogSettings, topic: str, from_beginning: bool, idle_s: float
) -> tuple[Consumer, list[tuple[Any, bytes]]]:
    """The records of ``topic`` from the group's position until nothing more arrives for
    ``idle_s`` (end offsets are not used: some brokers, Tansu among them, report a high
    watermark below the last offset of a compressed batch)."""
    consumer = manual_commit_consumer(settings.kafka_bootstrap, f"{settings.sink_group_id}-replay")
    meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None:
        return consumer, []
    parts = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
    if from_beginning:
        for tp in parts:
            tp.offset = OFFSET_BEGINNING
    else:
        parts = consumer.committed(parts, timeout=10)
        for tp in parts:
            if tp.offset < 0:
                tp.offset = OFFSET_BEGINNING
    consumer.assign(parts)
    out: list[tuple[Any, bytes]] = []
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < idle_s:
        msg = consumer.poll(0.1)
        if msg is None:
            continue
        quiet_since = time.monotonic()
        if msg.error() is None:
            out.append((msg, msg.value() or b""))
    return consumer, out


def _schema_text(registry: SchemaRegistryClient, schema_id: int) -> str:
    return str(registry.get_schema(schema_id).schema_str)


async def replay(
    settings: BilogSettings,
    *,
    from_beginning: bool = False,
    only_schema: str | None = None,
    dry_run: bool = False,
    catalog: SchemaCatalog | None = None,
    idle_s: float = 2.0,
) -> ReplayReport:
    """See module doc."""
    pii = PiiPolicy(settings.pii_hash_key_bytes)
    catalog = catalog or SchemaCatalog.load(pii)
    producer = KafkaProducer(
        producer_config(settings.kafka_bootstrap, compression=settings.compression),
        produce_timeout_s=settings.produce_timeout_s,
    )
    ids = SchemaIds(settings.schema_registry_url, auto_register=settings.auto_register_schemas)
    intake = Intake(catalog, producer, ids, topic_prefix=settings.topic_prefix)
    await ids.resolve(intake.subjects)
    await producer.start()
    registry = SchemaRegistryClient({"url": settings.schema_registry_url})
    report = ReplayReport()
    consumer, rows = await asyncio.to_thread(
        _read_bad_rows, settings, intake.failed.topic, from_beginning, idle_s
    )
    try:
        reader = catalog[FAILED_EVENT].parsed
        writers: dict[int, Any] = {}
        messages: list[OutgoingMessage] = []
        last: dict[int, int] = {}
        for msg, value in rows:
            report.read += 1
            last[msg.partition() or 0] = msg.offset() or 0
            schema_id, body = wire.split(value)
            if schema_id not in writers:
                text = await asyncio.to_thread(_schema_text, registry, schema_id)
                writers[schema_id] = parse_schema(json.loads(text))
            row = cast(
                dict[str, Any], schemaless_reader(io.BytesIO(body), writers[schema_id], reader)
            )
            if only_schema is not None and row["schema"] != only_schema:
                continue
            if row["payload_json"] is None:
                report.unrecoverable += 1
                continue
            event = IncomingEvent(row["schema"], row["payload_json"])
            # the replayed record keeps the request id of the event's original request
            prepared = intake.prepare(event, protect=False, request_id=row.get("request_id"))
            if isinstance(prepared, OutgoingMessage):
                report.replayed += 1
                report.by_schema[event.schema] = report.by_schema.get(event.schema, 0) + 1
                messages.append(prepared)
            else:
                rejected, payload = prepared
                assert isinstance(rejected, Rejected)
                report.still_failing += 1
                messages.append(
                    intake.bad_row(
                        event,
                        rejected,
                        payload,
                        request_id=row.get("request_id"),
                        replays=int(row.get("replays", 0)) + 1,
                        protected=True,
                    )
                )
        if not dry_run:
            for i in range(0, len(messages), 1000):
                await producer.send(messages[i : i + 1000])
            if last:
                offsets = [TopicPartition(intake.failed.topic, p, o + 1) for p, o in last.items()]
                await asyncio.to_thread(consumer.commit, offsets=offsets, asynchronous=False)
        log.info(
            "replay done",
            extra={
                "read": report.read,
                "replayed": report.replayed,
                "still_failing": report.still_failing,
                "unrecoverable": report.unrecoverable,
                "dry_run": dry_run,
            },
        )
        return report
    finally:
        with contextlib.suppress(KafkaException, RuntimeError):
            consumer.close()
        await producer.aclose()
        ids.close()
