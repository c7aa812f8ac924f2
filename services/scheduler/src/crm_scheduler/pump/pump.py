"""``Pump``: due jobs -> Celery, and the lease reaper.

One tick (a blocking function, run in a thread):

1. reap: in-flight jobs whose lease expired are sent again (an ENQUEUED job's message
   was lost: Redis flushed or restarted, or a pump died between its commit and its
   send; a RUNNING job's worker died: the attempt counts as failed, ``LEASE_EXPIRED``);
2. move: while fewer than ``max_in_flight`` jobs are ENQUEUED or RUNNING, take a batch
   of due jobs (``due_at <= now`` in index order, ``FOR UPDATE SKIP LOCKED``, so several
   pumps share the work), mark them ENQUEUED with a lease and commit, *then* send them.
   Capping the in-flight jobs keeps the Redis queue short, so a message waits there far
   less than its lease and a healthy backlog is never re-sent.

The loop runs ticks back to back while there is work, else every ``poll_s``. A failing
database or broker is logged and retried on the next tick; nothing is lost meanwhile
(MySQL holds every job, leases cover what was in flight).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from crm_common.aio import BlockingExecutor
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from crm_scheduler.domain.model import Clock, Dispatch
from crm_scheduler.store import SchedulerStore
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
    batch: int = 500
    max_in_flight: int = 2000
    enqueue_lease_s: float = 10.0
    gauges_every_s: float = 1.0


@dataclass(frozen=True, slots=True)
class TickResult:
    moved: int
    resent: int
    dead: int
    more: bool
    """True when the reaper had a full batch: tick again at once."""


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

    def tick(self) -> TickResult:
        cfg = self._config
        started = time.monotonic()
        timings: dict[str, float] = defaultdict(float)
        reaped = self._store.reap_expired(self._clock(), cfg.batch, cfg.enqueue_lease_s)
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
        in_flight = self._store.in_flight_count()
        timings["count"] = time.monotonic() - started - timings["reap"]
        room = cfg.max_in_flight - in_flight
        moved = 0
        while room > 0:
            now = self._clock()
            t0 = time.monotonic()
            batch = self._store.enqueue_due(now, min(cfg.batch, room), cfg.enqueue_lease_s)
            timings["enqueue"] += time.monotonic() - t0
            if not batch:
                break
            if self._metrics is not None:
                for d in batch:
                    self._metrics.due_lag.observe(max(0.0, (now - d.due_at).total_seconds()))
            t0 = time.monotonic()
            sent = self._sender.send(batch)
            timings["send"] += time.monotonic() - t0
            moved += sent
            if self._metrics is not None:
                self._metrics.sent.labels("due").inc(sent)
            if sent < len(batch) or len(batch) < cfg.batch:
                break  # no more due now, or broker trouble (the lease covers the rest)
            room -= len(batch)
        self._update_gauges(in_flight + moved)
        elapsed = time.monotonic() - started
        if elapsed > 1.0:
            log.info(
                "slow pump tick: %.2f s for %d job(s)",
                elapsed,
                moved,
                extra={k: round(v, 3) for k, v in timings.items()},
            )
        more = len(reaped.resend) >= cfg.batch
        return TickResult(moved=moved, resent=resent, dead=reaped.dead, more=more)

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
                await asyncio.sleep(self._config.poll_s)
