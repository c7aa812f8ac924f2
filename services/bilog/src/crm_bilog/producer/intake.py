"""The intake pipeline: validate an event against its schema, protect its PII, frame it
in the Confluent wire format and produce it; invalid events become bad rows.

An event is accepted only once Kafka acknowledged it. Every record (and bad row) carries
the request id of the request the event was made for as its ``x-request-id`` header: the
event's own ``request_id`` when the client gave one (an outbox relaying many requests'
events), else the call's. Invalid events are answered with
their field paths and written to the failed-events topic as a
``crm.bi.FailedEvent`` (payload with PII protected, see
:func:`crm_bilog.domain.avro_json.compile_protector`), from where
``python -m crm_bilog replay`` re-submits them after a fix. Payloads and their values are
never logged.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from crm_common.errors import FieldViolation, Unavailable
from crm_common.interceptors import REQUEST_ID_KEY, REQUEST_ID_RULE, is_valid_request_id

from crm_bilog.domain import wire
from crm_bilog.domain.avro_json import ConversionError
from crm_bilog.producer.kafka import KafkaProducer, OutgoingMessage
from crm_bilog.registry.ids import SchemaIds, subject_for
from crm_bilog.schemas import FAILED_EVENT, EventSchema, SchemaCatalog, topic_name

__all__ = ["Accepted", "IncomingEvent", "Intake", "Outcome", "Rejected"]

log = logging.getLogger("crm.bilog.intake")

_MAX_TS = 2**63 - 1
_MAX_SCHEMA_NAME = 200


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    """An event as a client sends it: schema name, JSON payload and the request id it was
    made for (empty: the call's)."""

    schema: str
    payload_json: str
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Accepted:
    """Acknowledged by Kafka: where it is stored."""

    topic: str
    partition: int
    offset: int
    schema_id: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """Invalid; ``errors`` have paths relative to the event (``schema``,
    ``payload_json``, ``payload_json.operator_header.operator_id``)."""

    errors: tuple[FieldViolation, ...]


Outcome = Accepted | Rejected


def _headers(request_id: str | None) -> tuple[tuple[str, bytes], ...] | None:
    """The Kafka headers of a record made for ``request_id`` (None: none)."""
    return ((REQUEST_ID_KEY, request_id.encode("ascii")),) if request_id else None


def _payload_path(avro_path: str) -> str:
    if not avro_path:
        return "payload_json"
    sep = "" if avro_path.startswith("[") else "."
    return f"payload_json{sep}{avro_path}"


@dataclass(frozen=True, slots=True)
class _Route:
    schema: EventSchema
    topic: str
    subject: str


class Intake:
    """See module doc. ``on_outcomes(schema name, accepted, rejected)`` feeds metrics."""

    def __init__(
        self,
        catalog: SchemaCatalog,
        producer: KafkaProducer,
        ids: SchemaIds,
        *,
        topic_prefix: str,
        max_payload_bytes: int = 64 * 1024,
        clock: Callable[[], float] = time.time,
        on_outcomes: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.catalog = catalog
        self.producer = producer
        self.ids = ids
        self.max_payload_bytes = max_payload_bytes
        self._clock = clock
        self._on_outcomes = on_outcomes
        self.routes: dict[str, _Route] = {}
        for schema in catalog:
            topic = topic_name(schema.name, topic_prefix)
            self.routes[schema.name] = _Route(schema, topic, subject_for(topic))
        self.failed = self.routes[FAILED_EVENT]
        self._known = ", ".join(s.name for s in catalog if not s.internal)

    @property
    def topics(self) -> list[str]:
        return [r.topic for r in self.routes.values()]

    @property
    def subjects(self) -> list[tuple[str, str]]:
        """``(subject, schema text)`` of every schema (what gets registered)."""
        return [(r.subject, r.schema.text) for r in self.routes.values()]

    def check_ready(self) -> None:
        """Raises UNAVAILABLE until the schema ids are known (registry reached)."""
        if not self.ids.resolved:
            raise Unavailable(
                "the schema registry has not been reached yet; retry",
                reason="SCHEMA_REGISTRY_UNAVAILABLE",
            )

    # -- preparing ---------------------------------------------------------------------

    def prepare(
        self, event: IncomingEvent, *, protect: bool = True, request_id: str | None = None
    ) -> OutgoingMessage | tuple[Rejected, Any]:
        """The message to produce, or ``(Rejected, parsed payload or None)``; the message
        carries ``event.request_id``, else ``request_id`` (the call's), as its header."""
        if event.request_id and not is_valid_request_id(event.request_id):
            return Rejected((FieldViolation("request_id", f"must be {REQUEST_ID_RULE}"),)), None
        route = self.routes.get(event.schema)
        if route is None or route.schema.internal:
            why = "internal schema" if route is not None else "unknown schema"
            return Rejected((FieldViolation("schema", f"{why}; known: {self._known}"),)), None
        if len(event.payload_json) > self.max_payload_bytes:
            reason = f"longer than {self.max_payload_bytes} characters"
            return Rejected((FieldViolation("payload_json", reason),)), None
        try:
            payload = json.loads(event.payload_json)
        except json.JSONDecodeError as exc:
            reason = f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            return Rejected((FieldViolation("payload_json", reason),)), None
        except (ValueError, RecursionError):
            return Rejected((FieldViolation("payload_json", "not valid JSON"),)), None
        schema = route.schema
        try:
            datum = schema.convert(payload) if protect else schema.convert_unprotected(payload)
        except ConversionError as exc:
            errors = tuple(FieldViolation(_payload_path(p), r) for p, r in exc.errors)
            return Rejected(errors), payload
        try:
            value = wire.encode(self.ids.get(route.subject), schema.parsed, datum)
        except Exception as exc:  # defensive: conversion guarantees an encodable datum
            log.error("event of %s could not be encoded: %s", schema.name, type(exc).__name__)
            return Rejected((FieldViolation("payload_json", "cannot be encoded in Avro"),)), None
        ts = schema.event_time_ms(datum)
        if ts is not None and not 0 <= ts <= _MAX_TS:
            ts = None
        return OutgoingMessage(
            route.topic,
            schema.key_of(datum).encode(),
            value,
            ts,
            _headers(event.request_id or request_id),
        )

    def bad_row(
        self,
        event: IncomingEvent,
        rejected: Rejected,
        payload: Any,
        *,
        request_id: str | None,
        replays: int = 0,
        protected: bool = False,
    ) -> OutgoingMessage:
        """The ``crm.bi.FailedEvent`` of a rejected event (PII protected); ``request_id``:
        the call's, unless the event has a valid one of its own."""
        if event.request_id and is_valid_request_id(event.request_id):
            request_id = event.request_id
        route = self.routes.get(event.schema)
        kept: str | None = None
        if route is not None and not route.schema.internal and payload is not None:
            safe = payload if protected else route.schema.protect_raw(payload)
            kept = json.dumps(safe, ensure_ascii=True, separators=(",", ":"))
        now_ms = int(self._clock() * 1000)
        datum = {
            "failure_id": uuid.uuid4().hex,
            "schema": event.schema[:_MAX_SCHEMA_NAME],
            "payload_json": kept,
            "errors": [{"path": v.field, "reason": v.description} for v in rejected.errors],
            "failed_at": now_ms,
            "request_id": request_id or "",
            "replays": replays,
        }
        failed = self.failed
        value = wire.encode(self.ids.get(failed.subject), failed.schema.parsed, datum)
        key = event.schema[:_MAX_SCHEMA_NAME].encode("utf-8", "replace")
        return OutgoingMessage(failed.topic, key, value, now_ms, _headers(request_id))

    # -- submitting --------------------------------------------------------------------

    async def submit(
        self,
        events: Sequence[IncomingEvent],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> list[Outcome]:
        """Validates and produces ``events``; returns one outcome per event, in order,
        once Kafka acknowledged every accepted event and bad row. Raises
        ``Unavailable`` / ``ResourceExhausted`` when Kafka cannot take them."""
        self.check_ready()
        outcomes: list[Outcome | None] = [None] * len(events)
        messages: list[OutgoingMessage] = []
        owners: list[int] = []
        for i, event in enumerate(events):
            prepared = self.prepare(event, request_id=request_id)
            if isinstance(prepared, OutgoingMessage):
                messages.append(prepared)
                owners.append(i)
            else:
                rejected, payload = prepared
                outcomes[i] = rejected
                messages.append(self.bad_row(event, rejected, payload, request_id=request_id))
                owners.append(-1)
        deliveries = await self.producer.send(messages, timeout)
        for message, owner, delivery in zip(messages, owners, deliveries, strict=True):
            if owner >= 0:
                route_id = self.ids.get(subject_for(message.topic))
                outcomes[owner] = Accepted(
                    message.topic, delivery.partition, delivery.offset, route_id
                )
        done = [o for o in outcomes if o is not None]
        if self._on_outcomes is not None:
            self._count(events, done)
        return done

    def _count(self, events: Sequence[IncomingEvent], outcomes: Sequence[Outcome]) -> None:
        assert self._on_outcomes is not None
        counts: Counter[tuple[str, bool]] = Counter()
        for event, outcome in zip(events, outcomes, strict=True):
            name = event.schema if event.schema in self.routes else "unknown"
            counts[(name, isinstance(outcome, Accepted))] += 1
        names = {name for name, _ in counts}
        for name in names:
            self._on_outcomes(name, counts[(name, True)], counts[(name, False)])
