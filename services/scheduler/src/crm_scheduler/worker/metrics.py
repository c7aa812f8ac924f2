"""Prometheus metrics of the workers (on the health server's registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["LAG_BUCKETS", "MARGIN_BUCKETS", "WorkerMetrics"]

LAG_BUCKETS: tuple[float, ...] = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
"""Due-lag buckets in seconds: 10 ms .. 5 min."""

MARGIN_BUCKETS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0)
"""Receive-margin buckets in seconds (the pump's lead is 1 s by default)."""


class WorkerMetrics:
    """Start lag, attempt outcomes and durations, deliveries, late arrivals."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.start_lag = Histogram(
            "crm_scheduler_start_lag_seconds",
            "From a job's due time to a worker starting its call.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.attempts = Counter(
            "crm_scheduler_attempts_total",
            "Finished attempts by outcome (succeeded, retry, dead, lost) and gRPC code.",
            ["outcome", "code"],
            registry=registry,
        )
        self.attempt_seconds = Histogram(
            "crm_scheduler_attempt_seconds",
            "Duration of the call to the target.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.deliveries = Counter(
            "crm_scheduler_deliveries_total",
            "Jobs received: claimed, skipped (duplicate, stale or cancelled), lost (the claim "
            "failed: the database was unreachable), malformed.",
            ["result"],
            registry=registry,
        )
        self.held = Gauge(
            "crm_scheduler_held_jobs",
            "Jobs a worker process holds: received, not called yet (claimed or not).",
            registry=registry,
        )
        self.receive_margin = Histogram(
            "crm_scheduler_receive_margin_seconds",
            "How long before its due time a job reached a worker (0: late, see "
            "crm_scheduler_received_late_total): what is left of the pump's lead after the "
            "hand-over (pump, Redis, Celery).",
            buckets=MARGIN_BUCKETS,
            registry=registry,
        )
        self.received_late = Counter(
            "crm_scheduler_received_late_total",
            "Jobs that reached a worker after their due time (the pump's lead did not hide "
            "the hand-over: pump or broker behind).",
            registry=registry,
        )
