"""Kafka values -> KPI domain events, through the schema registry like the sink.

A value is in the Confluent wire format; its writer schema is fetched from the registry
by id (cached), exactly as :mod:`crm_bilog.sink.runner` does, and the body is read with
schema resolution into the packaged schema of the same name (the reader schema), so a
newer BACKWARD-compatible writer version still decodes.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient
from fastavro import parse_schema, schemaless_reader

from crm_bilog.domain import wire
from crm_bilog.kpi.domain import (
    AgentPresence,
    CallRecord,
    Event,
    FailedEventRecord,
    TaskTransition,
)
from crm_bilog.schemas import AVSC_DIR, FAILED_EVENT, load_schema_file, topic_name

__all__ = ["KPI_SCHEMAS", "Decoder", "UnknownSchema", "kpi_topics"]

log = logging.getLogger("crm.bilog.kpi")

TASK_TRANSITION = "crm.bi.TaskTransition"
AGENT_PRESENCE = "crm.bi.AgentPresenceChanged"
FACT_CALL_RECORD = "crm.bi.FactCallRecord"
KPI_SCHEMAS = (TASK_TRANSITION, AGENT_PRESENCE, FACT_CALL_RECORD, FAILED_EVENT)
"""The event types the KPIs are computed from."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class UnknownSchema(ValueError):
    """The writer schema is not one the KPIs read (or the registry does not know it)."""


def kpi_topics(prefix: str) -> list[str]:
    """The topics of :data:`KPI_SCHEMAS` with ``prefix``."""
    return [topic_name(name, prefix) for name in KPI_SCHEMAS]


def _ms(value: Any) -> int:
    if isinstance(value, datetime):
        return (value - _EPOCH) // _MS
    return int(value)


def _task(d: dict[str, Any]) -> TaskTransition:
    return TaskTransition(
        task_id=int(d["task_id"]),
        business_line=int(d["business_line"]),
        category=str(d["category"]),
        from_status=d["from_status"],
        to_status=str(d["to_status"]),
        agent_id=d["agent_id"],
        reason=str(d["reason"]),
        at_ms=_ms(d["at"]),
    )


def _presence(d: dict[str, Any]) -> AgentPresence:
    return AgentPresence(
        agent_id=int(d["agent_id"]),
        business_line=int(d["business_line"]),
        from_presence=d["from_presence"],
        to_presence=str(d["to_presence"]),
        at_ms=_ms(d["at"]),
    )


def _call(d: dict[str, Any]) -> CallRecord:
    header = d["operator_header"]
    return CallRecord(
        business_line=int(d["business_line"]),
        bundle_id=str(d["bundle_id"]),
        call_type=str(d["call_type"]),
        call_tag=str(d["call_tag_id"]),
        provider=str(d["provider_type"]),
        request_id=str(header["request_id"]),
        at_ms=_ms(header["timestamp"]),
    )


def _failed(d: dict[str, Any]) -> FailedEventRecord:
    return FailedEventRecord(
        failure_id=str(d["failure_id"]),
        schema=str(d["schema"]),
        replays=int(d["replays"]),
        at_ms=_ms(d["failed_at"]),
    )


_CONVERT: dict[str, Callable[[dict[str, Any]], Event]] = {
    TASK_TRANSITION: _task,
    AGENT_PRESENCE: _presence,
    FACT_CALL_RECORD: _call,
    FAILED_EVENT: _failed,
}


def _full_name(raw: Any) -> str:
    if not isinstance(raw, dict):
        return ""
    name = str(raw.get("name", ""))
    return name if "." in name else f"{raw.get('namespace', '')}.{name}".strip(".")


class Decoder:
    """``decode(value) -> Event`` (see module doc). Raises
    :class:`~crm_bilog.domain.wire.WireFormatError` for a value not in the wire format,
    :class:`UnknownSchema` for a schema the KPIs do not read; waits (retrying) while
    the registry is unreachable, until ``should_stop()``."""

    def __init__(
        self,
        registry: SchemaRegistryClient,
        *,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self._registry = registry
        self._should_stop = should_stop
        self._readers = {
            name: parse_schema(load_schema_file(AVSC_DIR / f"{name}.avsc")) for name in KPI_SCHEMAS
        }
        self._writers: dict[int, tuple[str, Any]] = {}

    def _writer(self, schema_id: int) -> tuple[str, Any]:
        known = self._writers.get(schema_id)
        if known is not None:
            return known
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        delay = 0.2
        while True:
            try:
                text = str(self._registry.get_schema(schema_id).schema_str)
                break
            except SchemaRegistryError as exc:
                if exc.http_status_code == 404:
                    raise UnknownSchema(f"schema id {schema_id} unknown to the registry") from exc
                log.warning("schema registry error %s; retrying", exc.error_code)
            except Exception as exc:  # unreachable: wait, never skip an event
                log.warning("schema registry unreachable (%s); retrying", type(exc).__name__)
            if self._should_stop():
                raise UnknownSchema(f"stopped while fetching schema id {schema_id}")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        raw = json.loads(text)
        known = (_full_name(raw), parse_schema(raw))
        self._writers[schema_id] = known
        return known

    def decode(self, value: bytes) -> Event:
        schema_id, body = wire.split(value)
        name, writer = self._writer(schema_id)
        reader = self._readers.get(name)
        if reader is None:
            raise UnknownSchema(f"schema {name or schema_id} is not read by the KPIs")
        datum = schemaless_reader(io.BytesIO(body), writer, reader)
        if not isinstance(datum, dict):
            raise UnknownSchema(f"schema {name} did not decode to a record")
        return _CONVERT[name](datum)
