"""The sink: a consumer group member that writes Avro container files, exactly once.

Layout (Kafka Connect HDFS style)::

    <root>/<topic>/dt=YYYY-MM-DD/hour=HH/<topic>+<partition>+<first offset>+<last offset>.avro

A file holds a contiguous run of one partition's records that share the UTC hour of
their event time and their writer schema (from the registry, in the file header).
Date/hour come from the record's Kafka timestamp when it is CreateTime (the bilog
producer sets it to the schema's ``crm.event_time`` field), else from that field
itself (decoded), else from the log-append time.

Exactly once, without a transaction between files and offsets:

1. records of a partition are buffered; a file is *published* (temp name, fsync,
   atomic rename, directory fsync) when it reaches ``sink_flush_records``, when it has
   been open ``sink_rotate_interval_s``, after ``sink_idle_flush_s`` without a new
   record, when the hour or schema changes, and at a graceful stop;
2. only then is ``last offset + 1`` committed to the group;
3. on every partition assignment the sink derives the next offset from the published
   file names (highest last offset + 1) and seeks there, whatever the committed offset
   says (it uses the committed one only if it is further, e.g. files moved away).

So a crash (kill -9) between 1 and 2 re-reads nothing already in a file (no
duplicates), and a crash before 1 loses only a buffer whose offsets were never
committed nor published (re-read: no gaps). Files are published strictly in offset
order per partition, so "highest last offset + 1" is always the first unwritten record.
Revoked partitions drop their buffers (their next owner resumes from the files).

Records that are not in the wire format, or whose schema id the registry does not
know, are kept as raw bytes in ``<root>/_unreadable/`` (nothing consumed is dropped);
tombstones (null values) are skipped.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import (
    OFFSET_INVALID,
    TIMESTAMP_CREATE_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.schema_registry import SchemaRegistryClient
from fastavro import parse_schema, schemaless_reader

from crm_bilog.consumer import broker_answers, committed_offsets, manual_commit_consumer
from crm_bilog.domain import wire
from crm_bilog.sink.avro_file import container_bytes
from crm_bilog.sink.storage import Storage

__all__ = ["FILE_NAME", "Sink", "SinkConfig", "data_path", "next_offset_from_files"]

log = logging.getLogger("crm.bilog.sink")

FILE_NAME = re.compile(
    r"^(?P<topic>[A-Za-z0-9._-]+)\+(?P<partition>\d+)\+(?P<start>\d+)\+(?P<end>\d+)\.avro$"
)
UNREADABLE_DIR = "_unreadable"


def _hour_dir(event_ms: int | None) -> str:
    if event_ms is None:
        return "dt=unknown/hour=unknown"
    try:
        t = datetime.fromtimestamp(event_ms / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return "dt=unknown/hour=unknown"
    return f"dt={t:%Y-%m-%d}/hour={t:%H}"


def data_path(topic: str, partition: int, start: int, end: int, hour_dir: str) -> str:
    return f"{topic}/{hour_dir}/{topic}+{partition}+{start:020d}+{end:020d}.avro"


def next_offset_from_files(storage: Storage, topic: str, partition: int) -> int | None:
    """Highest last offset + 1 over the published files of a partition, if any."""
    best: int | None = None
    for path in storage.list(topic):
        m = FILE_NAME.match(path.rpartition("/")[2])
        if m and m.group("topic") == topic and int(m.group("partition")) == partition:
            end = int(m.group("end"))
            best = end + 1 if best is None else max(best, end + 1)
    return best


@dataclass(frozen=True)
class SinkConfig:
    """What the sink needs (built from :class:`crm_bilog.settings.BilogSettings`)."""

    bootstrap: str
    group_id: str
    topics: Sequence[str]
    registry_url: str
    flush_records: int = 10_000
    rotate_interval_s: float = 600.0
    idle_flush_s: float = 30.0
    session_timeout_ms: int = 10_000
    codec: str = "deflate"
    verify_records: bool = True
    crash_after_publishes: int = 0
    """Testing only: ``os._exit(137)`` right after the Nth publish, before its commit."""


@dataclass
class _WriterSchema:
    text: str
    parsed: Any
    event_time_path: tuple[str, ...] | None


@dataclass
class _Buffer:
    topic: str
    partition: int
    hour_dir: str
    schema_id: int
    bodies: list[bytes] = field(default_factory=list)
    start: int = -1
    end: int = -1
    opened: float = 0.0
    touched: float = 0.0


@dataclass
class SinkStats:
    """Counters for tests, the benchmark and logs."""

    records: int = 0
    files: int = 0
    unreadable: int = 0
    skipped: int = 0
    commits_failed: int = 0


class Sink:
    """See module doc; ``run(stop)`` blocks until ``stop`` is set, then publishes what it
    buffered, commits and leaves the group."""

    def __init__(
        self,
        config: SinkConfig,
        storage: Storage,
        *,
        registry: SchemaRegistryClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.storage = storage
        self.stats = SinkStats()
        self._clock = clock
        self._registry = registry or SchemaRegistryClient(
            {"url": config.registry_url, "timeout": 5}
        )
        self._schemas: dict[int, _WriterSchema] = {}
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._consumer: Consumer | None = None
        self.assigned: set[tuple[str, int]] = set()
        self.ready = threading.Event()
        """Set once the first partition assignment was handled."""
        self._beat = clock()

    # -- health ------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        self._beat = self._clock()

    def seconds_since_progress(self) -> float:
        """Time since the consume loop last came round (or a registry retry waited)."""
        return max(0.0, self._clock() - self._beat)

    def check_progress(self, stall_s: float) -> None:
        """Raises unless the loop came round within ``stall_s`` (a hung sink)."""
        idle = self.seconds_since_progress()
        if idle > stall_s:
            raise RuntimeError(f"the consume loop is stuck for {idle:.0f} s")

    def check_broker(self, timeout: float) -> None:
        """Raises unless the sink joined its group and a bootstrap broker answers within
        ``timeout`` (see :func:`crm_bilog.consumer.broker_answers`)."""
        if self._consumer is None or not self.ready.is_set():
            raise RuntimeError("the consumer has not joined its group yet")
        broker_answers(self.config.bootstrap, timeout)

    # -- consumer plumbing ---------------------------------------------------------------

    def _new_consumer(self) -> Consumer:
        c = self.config
        return manual_commit_consumer(
            c.bootstrap, c.group_id, session_timeout_ms=c.session_timeout_ms
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        committed = committed_offsets(consumer, partitions)
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.storage.remove_temporary(tp.topic, f"{tp.topic}+{tp.partition}+")
            from_files = next_offset_from_files(self.storage, tp.topic, tp.partition)
            candidates = [o for o in (from_files, committed.get(key)) if o is not None]
            if candidates:
                tp.offset = max(candidates)
            else:
                tp.offset = OFFSET_INVALID  # auto.offset.reset: earliest
            self._buffers.pop(key, None)
            self.assigned.add(key)
        consumer.assign(partitions)
        log.info(
            "partitions assigned",
            extra={"partitions": [f"{p.topic}[{p.partition}]@{p.offset}" for p in partitions]},
        )
        self.ready.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._buffers.pop((tp.topic, tp.partition), None)
            self.assigned.discard((tp.topic, tp.partition))
        with contextlib.suppress(KafkaException):
            consumer.unassign()

    # -- records -------------------------------------------------------------------------

    def _writer_schema(self, schema_id: int) -> _WriterSchema:
        known = self._schemas.get(schema_id)
        if known is not None:
            return known
        text = str(self._registry.get_schema(schema_id).schema_str)
        raw = json.loads(text)
        path = raw.get("crm.event_time") if isinstance(raw, dict) else None
        known = _WriterSchema(
            text=text,
            parsed=parse_schema(raw),
            event_time_path=tuple(path.split(".")) if isinstance(path, str) and path else None,
        )
        self._schemas[schema_id] = known
        return known

    def _event_ms(self, msg: Any, schema: _WriterSchema, body: bytes) -> int | None:
        ts_type, ts = msg.timestamp()
        if ts_type == TIMESTAMP_CREATE_TIME and ts >= 0:
            return int(ts)
        if schema.event_time_path is not None:
            datum: Any = schemaless_reader(io.BytesIO(body), schema.parsed, None)
            for part in schema.event_time_path:
                datum = datum.get(part) if isinstance(datum, dict) else None
            if isinstance(datum, datetime):
                return int(datum.timestamp() * 1000)
            if isinstance(datum, int):
                return datum
        return int(ts) if ts >= 0 else None

    def _unreadable(self, msg: Any, why: str) -> None:
        name = f"{msg.topic()}+{msg.partition()}+{msg.offset():020d}.bin"
        self.storage.publish(f"{UNREADABLE_DIR}/{msg.topic()}/{name}", msg.value() or b"")
        self.stats.unreadable += 1
        log.error(
            "unreadable record kept in %s",
            UNREADABLE_DIR,
            extra={
                "topic": msg.topic(),
                "partition": msg.partition(),
                "offset": msg.offset(),
                "why": why,
            },
        )

    def _add(self, msg: Any) -> None:
        key = (msg.topic(), msg.partition())
        if key not in self.assigned:
            return
        value = msg.value()
        if value is None:
            self.stats.skipped += 1
            return
        try:
            schema_id, body = wire.split(value)
        except wire.WireFormatError as exc:
            self._unreadable(msg, str(exc))
            return
        schema = self._schema_or_none(msg, schema_id)
        if schema is None:
            return
        if self.config.verify_records:
            try:
                schemaless_reader(io.BytesIO(body), schema.parsed, None)
            except Exception as exc:
                self._unreadable(msg, f"does not decode with schema {schema_id}: {exc}")
                return
        hour_dir = _hour_dir(self._event_ms(msg, schema, body))
        buf = self._buffers.get(key)
        if buf is not None and (buf.hour_dir != hour_dir or buf.schema_id != schema_id):
            self._publish(buf)
            buf = None
        now = self._clock()
        if buf is None:
            buf = _Buffer(key[0], key[1], hour_dir, schema_id, start=msg.offset(), opened=now)
            self._buffers[key] = buf
        buf.bodies.append(body)
        buf.end = msg.offset()
        buf.touched = now
        if len(buf.bodies) >= self.config.flush_records:
            self._publish(buf)

    def _schema_or_none(self, msg: Any, schema_id: int) -> _WriterSchema | None:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        delay = 0.2
        while True:
            try:
                return self._writer_schema(schema_id)
            except SchemaRegistryError as exc:
                if exc.http_status_code == 404:
                    self._unreadable(msg, f"schema id {schema_id} unknown to the registry")
                    return None
                log.warning("schema registry error %s; retrying", exc.error_code)
            except Exception as exc:  # registry unreachable: wait, never skip a record
                log.warning("schema registry unreachable (%s); retrying", type(exc).__name__)
            self._heartbeat()  # waiting on the registry is not a hang: no restart for it
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _publish(self, buf: _Buffer) -> None:
        key = (buf.topic, buf.partition)
        if self._buffers.get(key) is buf:
            del self._buffers[key]
        if not buf.bodies:
            return
        schema = self._schemas[buf.schema_id]
        data = container_bytes(
            schema.text,
            buf.bodies,
            codec=self.config.codec,
            metadata={
                "crm.kafka.topic": buf.topic,
                "crm.kafka.partition": str(buf.partition),
                "crm.kafka.offsets": f"{buf.start}-{buf.end}",
                "crm.schema_id": str(buf.schema_id),
            },
        )
        path = data_path(buf.topic, buf.partition, buf.start, buf.end, buf.hour_dir)
        self.storage.publish(path, data)
        self.stats.files += 1
        self.stats.records += len(buf.bodies)
        if (
            self.config.crash_after_publishes
            and self.stats.files >= self.config.crash_after_publishes
        ):
            os._exit(137)  # testing only: die between publish and commit
        assert self._consumer is not None
        try:
            self._consumer.commit(
                offsets=[TopicPartition(buf.topic, buf.partition, buf.end + 1)],
                asynchronous=False,
            )
        except KafkaException as exc:  # the files are the truth: resume still works
            self.stats.commits_failed += 1
            log.warning("offset commit failed: %s", exc)
        log.debug("published %s (%d records)", path, len(buf.bodies))

    def _flush_due(self) -> None:
        now = self._clock()
        for buf in list(self._buffers.values()):
            if (
                now - buf.opened >= self.config.rotate_interval_s
                or now - buf.touched >= self.config.idle_flush_s
            ):
                self._publish(buf)

    def flush_all(self) -> None:
        for buf in list(self._buffers.values()):
            self._publish(buf)

    # -- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        consumer = self._new_consumer()
        self._consumer = consumer
        consumer.subscribe(
            list(self.config.topics), on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        log.info("sink started", extra={"topics": list(self.config.topics)})
        try:
            while not stop.is_set():
                self._heartbeat()
                for msg in consumer.consume(num_messages=1000, timeout=0.2):
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer error: %s", err)
                        continue
                    self._add(msg)
                self._flush_due()
            self.flush_all()
        finally:
            with contextlib.suppress(Exception):
                consumer.close()
            self._consumer = None
            log.info(
                "sink stopped", extra={"records": self.stats.records, "files": self.stats.files}
            )
