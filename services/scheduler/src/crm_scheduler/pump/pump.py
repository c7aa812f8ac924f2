"""``Pump``: due jobs -> Celery, and the lease reaper.

One tick (a blocking function, run in a thread):

1. reap (at most every ``reap_every_s``): in-flight jobs whose lease expired are sent
   again (an ENQUEUED job's message was lost: Redis flushed or restarted, or a pump
   died between its commit and its send; a RUNNING job's worker died: the attempt
   counts as failed, ``LEASE_EXPIRED``);
2. move: while fewer than ``max_in_flight`` jobs are ENQUEUED or RUNNING, take a batch
   of jobs due within ``lead_s`` (``due_at <= now + lead_s`` in index order, ``FOR
   UPDATE SKIP LOCKED``, so several pumps share the work), mark them ENQUEUED with a
   lease and commit (one transaction also counts the in-flight jobs and finds the next
   due time), *then* send them (packed several jobs to a Celery message, one Redis
   pipeline per batch). Capping the in-flight jobs keeps the Redis queue short, so a
   message waits there far less than its lease and a healthy backlog is never re-sent.
   The lead hides the hand-over (commits, Redis, Celery) from a job's lateness: the
   worker holds the job, claims it shortly before it is due and starts the call at its
   due time, never before.
3. plan the next tick: when the next job comes within the lead sooner than ``poll_s``,
   the loop wakes up then (but not sooner than ``coalesce_s`` after this tick, so jobs
   due close together travel in one message); otherwise it polls every ``poll_s`` (jobs
   scheduled by the API to run at once, reaping).

The loop runs ticks back to back while there is work. A failing database or broker is
logged and retried on the next tick; nothing is lost meanwhile (MySQL holds every job,
leases cover what was in flight).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from crm_common.aio import BlockingExecutor
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from crm_scheduler.domain.model import Clock, Dispatch
from crm_scheduler.store import ReapResult, SchedulerStore
from crm_scheduler.worker.metrics import LAG_BUCKETS

__all__ = ["Pump", "PumpConfig", "PumpMetrics", "Sender", "TickResult"]

log = logging.getLogger("crm.scheduler.pump")


class Sender(Protocol):
    """Where due jobs go (the Celery queue)."""

    def send(self, dispatches: Sequence[Dispatch]) -> int:
        """Sends in order, stops at the first failure; returns how many were sent."""

    def depth(self) -> int:
        """Messages waiting in the queue."""


@dataclass(frozen=True, slots=True)
class PumpConfig:
    poll_s: float = 0.05
    coalesce_s: float = 0.1
    lead_s: float = 1.0
    batch: int = 500
    max_in_flight: int = 2000
    enqueue_lease_s: float = 10.0
    reap_every_s: float = 0.5
    gauges_every_s: float = 1.0


@dataclass(frozen=True, slots=True)
class TickResult:
    moved: int
    resent: int
    dead: int
    more: bool
    """True when the reaper had a full batch: tick again at once."""
    wait_s: float = 0.0
    """How long to wait before the next tick (when not ``more``)."""


class PumpMetrics:
    """Due lag, queue depth, moves and reaps."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.due_lag = Histogram(
            "crm_scheduler_due_lag_seconds",
            "From a job's due time to the pump handing it to the worker queue.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "crm_scheduler_queue_depth",
            "Jobs waiting: due (in MySQL, not yet sent), in_flight (ENQUEUED or RUNNING), "
            "broker (messages in the Redis queue).",
            ["queue"],
            registry=registry,
        )
        self.sent = Counter(
            "crm_scheduler_sent_total",
            "Messages sent to the worker queue: due (first send) or lease_expired (again).",
            ["reason"],
            registry=registry,
        )
        self.reaped = Counter(
            "crm_scheduler_reaped_total",
            "In-flight jobs whose lease expired, by the state they were in.",
            ["state"],
            registry=registry,
        )
        self.errors = Counter(
            "crm_scheduler_pump_errors_total", "Failed pump ticks.", registry=registry
        )


class Pump:
    """See the module doc. ``tick`` is blocking; ``run`` loops it from async code."""

    def __init__(
        self,
        store: SchedulerStore,
        sender: Sender,
        clock: Clock,
        config: PumpConfig,
        metrics: PumpMetrics | None = None,
    ) -> None:
        self._store = store
        self._sender = sender
        self._clock = clock
        self._config = config
        self._metrics = metrics
        self._gauges_at = 0.0
        self._reaped_at = -float("inf")

    def tick(self) -> TickResult:
        cfg = self._config
        started = time.monotonic()
        timings: dict[str, float] = defaultdict(float)
        reaped = ReapResult([], 0, 0, 0)
        if started - self._reaped_at >= cfg.reap_every_s:
            reaped = self._store.reap_expired(self._clock(), cfg.batch, cfg.enqueue_lease_s)
            more_to_reap = len(reaped.resend) + reaped.dead >= cfg.batch
            self._reaped_at = -float("inf") if more_to_reap else started
        resent = 0
        if reaped.resend:
            resent = self._sender.send(reaped.resend)
            log.warning(
                "leases expired: re-sent %d job(s) (%d enqueued, %d running), %d dead",
                resent,
                reaped.lost_enqueued,
                reaped.lost_running,
                reaped.dead,
            )
        if self._metrics is not None:
            self._metrics.reaped.labels("ENQUEUED").inc(reaped.lost_enqueued)
            self._metrics.reaped.labels("RUNNING").inc(reaped.lost_running)
            self._metrics.sent.labels("lease_expired").inc(resent)
        timings["reap"] = time.monotonic() - started
        lead = timedelta(seconds=cfg.lead_s)
        moved = 0
        in_flight = 0
        backlog = False
        next_due: datetime | None = None
        while True:
            now = self._clock()
            t0 = time.monotonic()
            move = self._store.move_due(
                now, now + lead, cfg.batch, cfg.enqueue_lease_s, cfg.max_in_flight
            )
            timings["move"] += time.monotonic() - t0
            batch, in_flight, next_due = move.dispatches, move.in_flight, move.next_due
            if self._metrics is not None:
                for d in batch:
                    self._metrics.due_lag.observe(max(0.0, (now - d.due_at).total_seconds()))
            sent = 0
            if batch:
                t0 = time.monotonic()
                sent = self._sender.send(batch)
                timings["send"] += time.monotonic() - t0
                moved += sent
                if self._metrics is not None:
                    self._metrics.sent.labels("due").inc(sent)
            if in_flight + len(batch) >= cfg.max_in_flight:
                backlog = True  # in-flight cap reached: poll until workers catch up
                break
            if sent < len(batch) or len(batch) < cfg.batch:
                break  # no more due now, or broker trouble (the lease covers the rest)
        wait_s = cfg.poll_s
        if not backlog and next_due is not None:
            until = (next_due - lead - self._clock()).total_seconds()
            if until < cfg.poll_s:  # sooner than the next poll, but not sooner than coalesce_s
                wait_s = max(until, cfg.coalesce_s)
        in_flight += moved
        self._update_gauges(in_flight)
        elapsed = time.monotonic() - started
        if elapsed > 1.0:
            log.info(
                "slow pump tick: %.2f s for %d job(s)",
                elapsed,
                moved,
                extra={k: round(v, 3) for k, v in timings.items()},
            )
        more = len(reaped.resend) + reaped.dead >= cfg.batch
        wait_s = max(0.0, wait_s - (time.monotonic() - started))
        return TickResult(moved=moved, resent=resent, dead=reaped.dead, more=more, wait_s=wait_s)

    def _update_gauges(self, in_flight: int) -> None:
        if self._metrics is None:
            return
        now = time.monotonic()
        if now - self._gauges_at < self._config.gauges_every_s:
            return
        self._gauges_at = now
        depth = self._metrics.queue_depth
        depth.labels("in_flight").set(in_flight)
        depth.labels("due").set(self._store.due_count(self._clock()))
        try:
            depth.labels("broker").set(self._sender.depth())
        except Exception as exc:
            log.debug("broker depth unavailable: %s", exc)

    async def run(self, executor: BlockingExecutor) -> None:
        """Ticks until cancelled (errors are logged, then retried after a pause)."""
        failures = 0
        while True:
            try:
                result = await executor.run(self.tick)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if self._metrics is not None:
                    self._metrics.errors.inc()
                log.warning(
                    "pump tick failed (%d in a row): %s: %s", failures, type(exc).__name__, exc
                )
                await asyncio.sleep(min(5.0, self._config.poll_s * 2**failures))
                continue
            if not result.more:
                await asyncio.sleep(result.wait_s)
