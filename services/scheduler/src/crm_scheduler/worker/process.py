"""``python -m crm_scheduler worker``: one Celery worker process.

The Celery worker runs in the main thread (it handles SIGTERM: warm shutdown; then the
jobs the runner holds still run at their due time and every result is recorded);
health and ``/metrics`` run in a thread (``crm_common.health.HealthThread``). With
``tracing_exporter`` set, each target call is a CLIENT span (service
``crm-scheduler-worker``) continuing the trace of the Schedule call.
"""

from __future__ import annotations

import logging
import threading

from crm_common.health import HealthThread
from crm_common.metrics import RpcMetrics
from crm_common.tracing import configure_tracing, shutdown_tracing

from crm_scheduler.domain.model import utc_now
from crm_scheduler.health import WORKER_HEALTH_SERVICE
from crm_scheduler.settings import SchedulerSettings
from crm_scheduler.store import SchedulerStore, make_engine
from crm_scheduler.worker.celery_app import CelerySender, make_celery, register_task, start_worker
from crm_scheduler.worker.metrics import WorkerMetrics
from crm_scheduler.worker.runner import JobRunner

__all__ = ["run_worker"]

log = logging.getLogger("crm.scheduler.worker")


def run_worker(settings: SchedulerSettings) -> int:
    """Serves until SIGTERM/SIGINT; returns the exit code."""
    metrics = RpcMetrics("scheduler-worker")
    worker_metrics = WorkerMetrics(metrics.registry)

    def new_store() -> SchedulerStore:
        engine = make_engine(settings.database_url, settings.db_pool_size, lean=True)
        return SchedulerStore(engine)

    runner = JobRunner(
        new_store,
        worker_name=settings.instance_name,
        lease_grace_s=settings.run_lease_grace_s,
        clock=utc_now,
        metrics=worker_metrics,
        claim_ahead_s=settings.worker_claim_ahead_s,
        claim_coalesce_s=settings.worker_claim_coalesce_s,
        result_flush_s=settings.worker_result_flush_s,
        max_held=settings.worker_max_held,
    )
    app = make_celery(settings)
    register_task(app, runner.submit)
    probe = CelerySender(app, settings.queue_name, settings.redis_url)
    consuming = threading.Event()

    def consumer_ready() -> None:
        if not consuming.is_set():
            raise RuntimeError("the Celery consumer is not started yet")

    health = HealthThread(
        WORKER_HEALTH_SERVICE,
        settings.for_worker(),
        {"mysql": lambda: runner.store.ping(), "redis": probe.ping, "consumer": consumer_ready},
        metrics,
    )
    # Celery logs every message's arguments at INFO: they carry target payloads.
    for noisy in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    traced = configure_tracing("scheduler-worker", settings)
    health.start()
    try:
        runner.start()  # threads and the database pool before the first message
        log.info(
            "worker starting",
            extra={"pool": settings.worker_pool, "concurrency": settings.worker_concurrency},
        )
        return start_worker(app, settings, on_ready=consuming.set)
    finally:
        # the held jobs still run at their due time, every result is recorded
        runner.close(drain_timeout_s=settings.pump_lead_s + 30)
        health.stop()
        probe.close()
        if traced:  # flush the last spans
            shutdown_tracing()
        log.info("worker stopped")
