"""The one Kafka consumer set-up of bilog's readers (the file sink, the KPI consumer and
the bad-row replay): offsets are committed by hand, only after what was read is safe
(files published, KPIs applied, rows re-submitted), never automatically."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

__all__ = ["broker_answers", "committed_offsets", "manual_commit_consumer"]


def manual_commit_consumer(
    bootstrap: str,
    group_id: str,
    *,
    session_timeout_ms: int | None = None,
    **extra: Any,
) -> Consumer:
    """A consumer of ``group_id`` that never commits or stores offsets by itself and
    starts from the earliest record when the group has no committed offset; ``extra``
    adds librdkafka properties (dots as underscores: ``topic_metadata_refresh_interval_ms``)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "logger": logging.getLogger("crm.bilog.librdkafka"),
    }
    if session_timeout_ms is not None:
        conf["session.timeout.ms"] = session_timeout_ms
        conf["heartbeat.interval.ms"] = max(100, session_timeout_ms // 10)
    conf.update({key.replace("_", "."): value for key, value in extra.items()})
    return Consumer(conf)


def committed_offsets(
    consumer: Consumer, partitions: Sequence[TopicPartition], timeout: float = 10
) -> dict[tuple[str, int], int]:
    """The group's committed offset of each partition that has one, by (topic, partition);
    empty when the broker does not answer (the caller then falls back to its own record)."""
    found: dict[tuple[str, int], int] = {}
    with contextlib.suppress(KafkaException):
        for tp in consumer.committed(list(partitions), timeout=timeout):
            if tp.offset >= 0:
                found[(tp.topic, tp.partition)] = tp.offset
    return found


def broker_answers(bootstrap: str, timeout: float, client_id: str = "crm-health") -> None:
    """Returns when one of the ``bootstrap`` brokers answers a Kafka ApiVersions request
    on a fresh connection within ``timeout``, raises otherwise.

    A health check of its own, not the consumer's handle: a metadata request on a live
    librdkafka handle can stay pending past its timeout while the broker hangs (a
    paused broker still accepts TCP connections, then answers nothing)."""
    correlation = 0x43524D  # "CRM"
    name = client_id.encode()
    body = struct.pack(">hhih", 18, 0, correlation, len(name)) + name
    request = struct.pack(">i", len(body)) + body
    errors: list[str] = []
    for address in (a.strip() for a in bootstrap.split(",") if a.strip()):
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
                s.settimeout(timeout)
                s.sendall(request)
                head = _read_exactly(s, 8)
                if struct.unpack(">ii", head)[1] == correlation:
                    return
                errors.append(f"{address}: unexpected answer")
        except (OSError, ValueError) as exc:
            errors.append(f"{address}: {type(exc).__name__}: {exc}")
    raise ConnectionError("no broker answered: " + "; ".join(errors))


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data
