"""The gRPC face of the intake: proto <-> domain, request checks, deadlines."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from crm.bilog.v1 import bilog_pb2 as pb
from crm.bilog.v1 import bilog_pb2_grpc
from crm_common.errors import FieldViolation, InvalidArgument
from crm_common.logs import request_id_var

from crm_bilog.producer.intake import Accepted, IncomingEvent, Intake, Outcome, Rejected

if TYPE_CHECKING:
    from grpc import aio

    _Context = aio.ServicerContext[Any, Any]
else:
    _Context = Any

__all__ = ["MAX_STREAM_REJECTIONS", "BilogServicer"]

MAX_STREAM_REJECTIONS = 1000
"""Rejected events listed in a LogStreamResponse at most (counts stay complete)."""

_DEADLINE_MARGIN_S = 0.2


def _timeout(context: _Context) -> float | None:
    """How long Kafka acks may take: the client's deadline minus a margin to answer."""
    remaining: float | None = context.time_remaining()
    if remaining is None:
        return None
    return max(remaining - _DEADLINE_MARGIN_S, 0.01)


def _events(events: Sequence[pb.Event]) -> list[IncomingEvent]:
    return [IncomingEvent(e.schema, e.payload_json, e.request_id) for e in events]


def _receipt(a: Accepted) -> pb.EventReceipt:
    return pb.EventReceipt(
        topic=a.topic, partition=a.partition, offset=a.offset, schema_id=a.schema_id
    )


def _result(index: int, outcome: Outcome) -> pb.EventResult:
    if isinstance(outcome, Accepted):
        return pb.EventResult(index=index, accepted=_receipt(outcome))
    return pb.EventResult(
        index=index,
        rejected=pb.EventRejection(
            errors=[pb.FieldError(path=v.field, reason=v.description) for v in outcome.errors]
        ),
    )


class BilogServicer(bilog_pb2_grpc.BilogServiceServicer):
    """Log, LogBatch, LogStream and ListSchemas over an :class:`Intake`."""

    def __init__(self, intake: Intake, *, max_batch_events: int = 1000) -> None:
        self.intake = intake
        self.max_batch_events = max_batch_events

    def _check_batch(self, events: Sequence[pb.Event], field: str) -> None:
        if not 1 <= len(events) <= self.max_batch_events:
            raise InvalidArgument.single(field, f"must hold 1..{self.max_batch_events} events")

    async def Log(self, request: pb.LogRequest, context: _Context) -> pb.LogResponse:
        if not request.HasField("event"):
            raise InvalidArgument.single("event", "is required")
        (outcome,) = await self.intake.submit(
            _events([request.event]), timeout=_timeout(context), request_id=request_id_var.get()
        )
        if isinstance(outcome, Rejected):
            raise InvalidArgument(
                [FieldViolation(f"event.{v.field}", v.description) for v in outcome.errors]
            )
        return pb.LogResponse(receipt=_receipt(outcome))

    async def LogBatch(self, request: pb.LogBatchRequest, context: _Context) -> pb.LogBatchResponse:
        self._check_batch(request.events, "events")
        outcomes = await self.intake.submit(
            _events(request.events), timeout=_timeout(context), request_id=request_id_var.get()
        )
        accepted = sum(1 for o in outcomes if isinstance(o, Accepted))
        return pb.LogBatchResponse(
            results=[_result(i, o) for i, o in enumerate(outcomes)],
            accepted_count=accepted,
            rejected_count=len(outcomes) - accepted,
        )

    async def LogStream(
        self, request_iterator: AsyncIterator[pb.LogStreamRequest], context: _Context
    ) -> pb.LogStreamResponse:
        accepted = rejected = 0
        listed: list[pb.EventResult] = []
        base = 0
        chunk_no = 0
        async for chunk in request_iterator:
            self._check_batch(chunk.events, f"chunk[{chunk_no}].events")
            outcomes = await self.intake.submit(
                _events(chunk.events), timeout=_timeout(context), request_id=request_id_var.get()
            )
            for i, outcome in enumerate(outcomes):
                if isinstance(outcome, Accepted):
                    accepted += 1
                else:
                    rejected += 1
                    if len(listed) < MAX_STREAM_REJECTIONS:
                        listed.append(_result(base + i, outcome))
            base += len(outcomes)
            chunk_no += 1
        return pb.LogStreamResponse(
            accepted_count=accepted, rejected_count=rejected, rejected=listed
        )

    async def ListSchemas(
        self, request: pb.ListSchemasRequest, context: _Context
    ) -> pb.ListSchemasResponse:
        self.intake.check_ready()
        infos = []
        for route in sorted(self.intake.routes.values(), key=lambda r: r.schema.name):
            if route.schema.internal:
                continue
            infos.append(
                pb.SchemaInfo(
                    name=route.schema.name,
                    topic=route.topic,
                    schema_id=self.intake.ids.get(route.subject),
                    avro_schema=route.schema.text,
                    pii_fields=route.schema.pii_fields,
                )
            )
        return pb.ListSchemasResponse(schemas=infos)
