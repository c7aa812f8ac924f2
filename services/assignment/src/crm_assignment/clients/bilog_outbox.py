"""The transactional outbox of BI events: every task transition, call record and presence
change reaches the BI log.

Two tables are the outbox, both written in the transaction of the change:

- ``task_event``: every transition already writes its audit row there; it goes out as a
  ``crm.bi.TaskTransition`` (payload built here, :func:`transition_payload`);
- ``bi_outbox``: the other events with their payload ready (``crm.bi.FactCallRecord``
  from RecordCall, ``crm.bi.AgentPresenceChanged`` from SetPresence; see
  ``domain/bi_events``), each row naming its schema.

:class:`OutboxRelay` (one background task per replica, started when ``bilog_target`` is
set) drains each table in turn: reads its unpublished rows in id order, sends them in one
``LogBatch`` to the bilog service (which answers per event, and accepts an event only once
Kafka acknowledged it), then sets ``published_at`` on the accepted rows. So:

- nothing is lost: a row stays unpublished until bilog acknowledged it; a crash between
  the acknowledgement and the update sends it again (delivery is at-least-once);
- a batch that fails as a whole (UNAVAILABLE, DEADLINE_EXCEEDED, the database down, ...)
  is retried unchanged after an exponential, capped back-off;
- an event bilog *rejects* (its answer for that event is the per-event form of
  INVALID_ARGUMENT: field paths and reasons) gets ``publish_error`` and is skipped, so a
  schema mismatch cannot block the outbox forever (nor the other table's events); bilog
  keeps a copy of it on its failed-events topic, and clearing ``publish_error`` (``UPDATE
  task_event SET publish_error = NULL WHERE published_at IS NULL``, the same for
  ``bi_outbox``) sends it again.

Each row records the request id and W3C ``traceparent`` of the request that made it
(``request_id``/``traceparent`` columns, filled where the rows are written). The relay
sends each event's request id with it (``Event.request_id``: bilog puts it on the Kafka
record as its ``x-request-id`` header), and, tracing on, sends each batch inside a
PRODUCER span of its own (``crm_common.tracing.linked_span``: the batch is nobody's
request) linked to the trace of every request of the batch; the LogBatch call and bilog's
server span are its children.

Consumers dedupe on ``(task_id, at, from_status, to_status)``: the TaskTransition schema
has no event id field (the Kafka key is ``business_line:task_id``, so one task's events
stay in order on one partition).

The relay is woken right after a transaction that wrote task events commits (an engine
event listener, see :func:`watch_transitions`: no call site to forget) and polls every
``poll_s`` for transitions made by other replicas. Replicas do not coordinate: two relays
may send the same rows (more duplicates, same at-least-once contract).

Payloads carry ids, enums and times only: no phone, and the free-text reasons agents type
(reject/fail reasons, notes) are not exported; ``reason`` is the event kind
(``accepted``, ``timed_out``, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import grpc
from crm_bilog.client import BiEvent, BilogClient, Result
from crm_common.aio import BlockingExecutor
from crm_common.interceptors import insecure_channel
from crm_common.tracing import linked_span
from sqlalchemy import Engine, event

from crm_assignment.domain.model import Clock, OutboxBacklog, OutboxEvent
from crm_assignment.store import AssignmentStore

__all__ = [
    "SCHEMA",
    "OutboxRelay",
    "rejection_text",
    "transition_payload",
    "watch_transitions",
]

log = logging.getLogger("crm.assignment.outbox")

SCHEMA = "crm.bi.TaskTransition"
"""The bilog schema of a task transition (``crm_bilog/schemas/avsc``)."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_FLAG = "crm_task_events_written"
_OUTBOX_INSERTS = ("INSERT INTO TASK_EVENT", "INSERT INTO BI_OUTBOX")


def transition_payload(ev: OutboxEvent) -> dict[str, Any]:
    """The ``crm.bi.TaskTransition`` payload of an outbox row (pure)."""
    at_ms = (ev.at - _EPOCH) // _MS
    return {
        "task_id": ev.task_id,
        "business_line": int(ev.business_line),
        "category": ev.category.name,
        "from_status": ev.from_status.name if ev.from_status is not None else None,
        "to_status": ev.to_status.name,
        "agent_id": ev.agent_id,
        "reason": ev.kind.value.lower(),
        "at": at_ms,
    }


def rejection_text(result: Result) -> str:
    """``path: reason; ...`` of a rejected event (bilog never quotes values)."""
    if result.rejection is None or not result.rejection.errors:
        return "rejected"
    return "; ".join(f"{path or '<event>'}: {reason}" for path, reason in result.rejection.errors)


def watch_transitions(engine: Engine, notify: Callable[[], None]) -> Callable[[], None]:
    """Calls ``notify()`` (from the committing thread) after every commit on ``engine``
    of a transaction that inserted task events or bi_outbox rows; returns a function
    removing the hooks."""

    def after_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip()[:22].upper() in _OUTBOX_INSERTS:
            conn.info[_FLAG] = True

    def on_commit(conn: Any) -> None:
        if conn.info.pop(_FLAG, False):
            notify()

    def on_rollback(conn: Any) -> None:
        conn.info.pop(_FLAG, None)

    hooks: list[tuple[str, Callable[..., None]]] = [
        ("after_cursor_execute", after_execute),
        ("commit", on_commit),
        ("rollback", on_rollback),
    ]
    for name, fn in hooks:
        event.listen(engine, name, fn)

    def remove() -> None:
        for name, fn in hooks:
            if event.contains(engine, name, fn):
                event.remove(engine, name, fn)

    return remove


class _Pending(NamedTuple):
    """An outbox row to send: its id, its event, the traceparent of its request."""

    row_id: int
    event: BiEvent
    traceparent: str | None


@dataclass(frozen=True, slots=True)
class _Source:
    """One outbox table: read pending rows as events, mark them (all synchronous)."""

    table: str
    fetch: Callable[[int], list[_Pending]]
    mark_published: Callable[[Sequence[int], datetime], int]
    mark_rejected: Callable[[dict[int, str]], None]


def _sources(store: AssignmentStore) -> tuple[_Source, ...]:
    def transitions(limit: int) -> list[_Pending]:
        return [
            _Pending(e.id, BiEvent(SCHEMA, transition_payload(e), e.request_id), e.traceparent)
            for e in store.unpublished_events(limit)
        ]

    def others(limit: int) -> list[_Pending]:
        return [
            _Pending(e.id, BiEvent(e.schema, e.payload, e.request_id), e.traceparent)
            for e in store.unpublished_bi_events(limit)
        ]

    return (
        _Source("task_event", transitions, store.mark_published, store.mark_rejected),
        _Source("bi_outbox", others, store.mark_bi_published, store.mark_bi_rejected),
    )


class OutboxRelay:
    """Publishes the outbox to bilog (see module doc). ``on_published(n)``,
    ``on_rejected(n)`` and ``on_backlog(backlog)`` feed the metrics."""

    def __init__(
        self,
        store: AssignmentStore,
        executor: BlockingExecutor,
        clock: Clock,
        bilog_target: str,
        *,
        batch_size: int = 200,
        poll_s: float = 1.0,
        timeout_s: float = 5.0,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 30.0,
        on_published: Callable[[int], None] | None = None,
        on_rejected: Callable[[int], None] | None = None,
        on_backlog: Callable[[OutboxBacklog], None] | None = None,
    ) -> None:
        self._store = store
        self._sources = _sources(store)
        self._executor = executor
        self._clock = clock
        self.target = bilog_target
        self._batch = batch_size
        self._poll_s = poll_s
        self._timeout_s = timeout_s
        self._backoff_initial_s = min(backoff_initial_s, backoff_max_s)
        self._backoff_max_s = backoff_max_s
        self._on_published = on_published
        self._on_rejected = on_rejected
        self._on_backlog = on_backlog
        self._channel: grpc.aio.Channel | None = None
        self._client: BilogClient | None = None
        self._backlog_read_at = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.published_total = 0
        self.rejected_total = 0
        self.failures_total = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        # Reconnect attempts no slower than our own back-off, so a bilog that comes back
        # is reached on the next retry.
        max_ms = max(int(self._backoff_max_s * 1000), 100)
        self._channel = channel = insecure_channel(
            self.target,
            options=[
                ("grpc.initial_reconnect_backoff_ms", min(1000, max_ms)),
                ("grpc.min_reconnect_backoff_ms", min(1000, max_ms)),
                ("grpc.max_reconnect_backoff_ms", max_ms),
            ],
        )
        self._client = BilogClient(channel=channel, timeout_s=self._timeout_s)
        self._task = asyncio.create_task(self._run(), name="crm-assignment-outbox")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._client = None
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(None)

    def notify(self) -> None:
        """Wake the relay (thread-safe, cheap; coalesces)."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(wake.set)

    # ------------------------------------------------------------------ work

    async def run_once(self) -> int:
        """Publish what is pending now in each outbox table, batch after batch, until a
        batch comes back short; returns the events published. Raises when bilog or the
        database fail (nothing of the failed batch is marked)."""
        done = 0
        for source in self._sources:
            while True:
                events = await self._executor.run(source.fetch, self._batch)
                if not events:
                    break
                done += await self._publish(source, events)
                if len(events) < self._batch:
                    break
        return done

    async def _publish(self, source: _Source, events: list[_Pending]) -> int:
        """Sends one batch (inside its linked span when tracing is on, see module doc)."""
        with linked_span(
            f"outbox publish {source.table}",
            (p.traceparent for p in events),
            attributes={"crm.outbox.table": source.table, "crm.outbox.events": len(events)},
        ):
            return await self._send(source, events)

    async def _send(self, source: _Source, events: list[_Pending]) -> int:
        assert self._client is not None, "start() first"
        results = await self._client.log_batch([p.event for p in events], timeout=self._timeout_s)
        if len(results) != len(events):
            raise RuntimeError(f"bilog answered {len(results)} results for {len(events)} events")
        accepted: list[int] = []
        rejected: dict[int, tuple[str, str]] = {}
        for (row_id, ev, _), result in zip(
            events, sorted(results, key=lambda r: r.index), strict=True
        ):
            if result.accepted:
                accepted.append(row_id)
            else:
                rejected[row_id] = (ev.schema, rejection_text(result))
        await self._executor.run(source.mark_published, accepted, self._clock())
        if rejected:
            why = {row_id: text for row_id, (_, text) in rejected.items()}
            await self._executor.run(source.mark_rejected, why)
            self.rejected_total += len(rejected)
            if self._on_rejected is not None:
                self._on_rejected(len(rejected))
            for row_id, (schema, text) in rejected.items():
                log.error(
                    "bilog rejected a BI event; it is skipped until %s.publish_error is cleared",
                    source.table,
                    extra={
                        "outbox_table": source.table,
                        "outbox_id": row_id,
                        "schema": schema,
                        "errors": text,
                    },
                )
        self.published_total += len(accepted)
        if self._on_published is not None and accepted:
            self._on_published(len(accepted))
        return len(accepted)

    async def _report_backlog(self, changed: bool) -> None:
        """Feed the lag gauges (a COUNT over the unpublished rows): after a cycle that
        published something, else at most once per poll interval."""
        if self._on_backlog is None:
            return
        now = time.monotonic()
        if not changed and now - self._backlog_read_at < self._poll_s:
            return
        self._backlog_read_at = now
        try:
            backlog = await self._executor.run(self._store.outbox_backlog)
        except Exception as exc:  # the database may be down: the gauges stay as they were
            log.debug("outbox backlog not read: %s", type(exc).__name__)
            return
        self._on_backlog(backlog)

    async def _run(self) -> None:
        assert self._wake is not None
        backoff = self._backoff_initial_s
        while True:
            self._wake.clear()
            try:
                published = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures_total += 1
                code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else None
                log.warning(
                    "publishing BI events failed; retrying in %.1fs: %s",
                    backoff,
                    code or type(exc).__name__,
                    extra={"retry_in_s": backoff},
                )
                await self._report_backlog(changed=False)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max_s)
                continue
            backoff = self._backoff_initial_s
            await self._report_backlog(changed=published > 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
