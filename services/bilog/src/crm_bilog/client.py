"""A small typed async client of the bilog service, for other services::

    async with BilogClient("bilog:50054") as bilog:
        receipt = await bilog.log("crm.bi.TaskTransition", {"task_id": 7, ...})
        results = await bilog.log_batch([BiEvent("crm.bi.TaskTransition", {...}), ...])

Payloads are plain dicts (JSON-encoded here; see the proto's ``Event.payload_json``).
Errors are ``grpc.aio.AioRpcError``: INVALID_ARGUMENT from :meth:`BilogClient.log`
carries the field paths (``crm_common.errors.field_violations(err)``), UNAVAILABLE and
RESOURCE_EXHAUSTED may be retried (delivery is at-least-once).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from crm.bilog.v1 import bilog_pb2 as pb
from crm.bilog.v1 import bilog_pb2_grpc
from crm_common.interceptors import insecure_channel
from grpc import aio

__all__ = ["BiEvent", "BilogClient", "Receipt", "Rejection", "Result"]


@dataclass(frozen=True, slots=True)
class BiEvent:
    """An event to log: the schema's full name and the payload; ``request_id``: the
    request the event was made for, when that is not the call's own (an outbox relaying
    the events of many requests), see the proto's ``Event.request_id``."""

    schema: str
    payload: Mapping[str, Any]
    request_id: str | None = None

    def to_proto(self) -> pb.Event:
        return pb.Event(
            schema=self.schema,
            payload_json=json.dumps(self.payload, separators=(",", ":"), ensure_ascii=False),
            request_id=self.request_id or "",
        )


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where Kafka stored an event."""

    topic: str
    partition: int
    offset: int
    schema_id: int

    @classmethod
    def from_proto(cls, r: pb.EventReceipt) -> Receipt:
        return cls(r.topic, r.partition, r.offset, r.schema_id)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an event was rejected: ``(path, reason)`` pairs."""

    errors: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one event of a batch."""

    index: int
    receipt: Receipt | None
    rejection: Rejection | None

    @property
    def accepted(self) -> bool:
        return self.receipt is not None

    @classmethod
    def from_proto(cls, r: pb.EventResult) -> Result:
        if r.HasField("accepted"):
            return cls(r.index, Receipt.from_proto(r.accepted), None)
        errors = tuple((e.path, e.reason) for e in r.rejected.errors)
        return cls(r.index, None, Rejection(errors))


class BilogClient:
    """See module doc. Give a ``target`` (``host:port``) or an open ``channel``."""

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: aio.Channel | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        if (target is None) == (channel is None):
            raise ValueError("give exactly one of target and channel")
        self._own = channel is None
        self._channel = channel if channel is not None else insecure_channel(str(target))
        self._stub = bilog_pb2_grpc.BilogServiceStub(self._channel)
        self.timeout_s = timeout_s

    async def log(
        self, schema: str, payload: Mapping[str, Any], *, timeout: float | None = None
    ) -> Receipt:
        """Logs one event; returns once Kafka acknowledged it."""
        resp = await self._stub.Log(
            pb.LogRequest(event=BiEvent(schema, payload).to_proto()),
            timeout=timeout or self.timeout_s,
        )
        return Receipt.from_proto(resp.receipt)

    async def log_batch(
        self, events: Sequence[BiEvent], *, timeout: float | None = None
    ) -> list[Result]:
        """Logs up to the server's batch limit; one result per event, in order."""
        resp = await self._stub.LogBatch(
            pb.LogBatchRequest(events=[e.to_proto() for e in events]),
            timeout=timeout or self.timeout_s,
        )
        return [Result.from_proto(r) for r in resp.results]

    async def log_stream(
        self, chunks: Iterable[Sequence[BiEvent]], *, timeout: float | None = None
    ) -> tuple[int, list[Result]]:
        """Streams chunks of events; returns (accepted count, rejected results)."""

        async def requests() -> AsyncIterator[pb.LogStreamRequest]:
            for chunk in chunks:
                yield pb.LogStreamRequest(events=[e.to_proto() for e in chunk])

        resp = await self._stub.LogStream(requests(), timeout=timeout or self.timeout_s)
        return int(resp.accepted_count), [Result.from_proto(r) for r in resp.rejected]

    async def schemas(self) -> list[pb.SchemaInfo]:
        resp = await self._stub.ListSchemas(pb.ListSchemasRequest(), timeout=self.timeout_s)
        return list(resp.schemas)

    async def close(self) -> None:
        if self._own:
            await self._channel.close(None)

    async def __aenter__(self) -> BilogClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
