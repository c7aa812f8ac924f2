"""The Celery app shared by the pump (sends) and the workers (consume).

Celery is untyped: every ``Any`` of this service stays in this module. Celery only
carries due jobs from the pump to a worker; nothing here is trusted for correctness:

- no ETA/countdown is ever used (the pump sends a job when it is due);
- ``acks_late`` and ``worker_prefetch_multiplier=1``: a message is acked once its jobs
  are held by the worker's runner (they run at their due time; the rows' leases cover
  a worker that dies), and a worker holds at most the jobs the pump has in flight (the
  next ``pump_lead_s``), so pending work stays in MySQL, not in worker memory;
- the pump packs the jobs due together into few messages and writes them to Redis in
  one pipeline (kombu's ``Producer.batch``): Celery's cost per message is paid once
  for many jobs;
- the Redis ``visibility_timeout`` is left long: a redelivery it causes is a duplicate
  the claim turns into a no-op; lost messages are re-sent by the pump's lease reaper.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from crm_scheduler.domain.model import Dispatch
from crm_scheduler.settings import SchedulerSettings

__all__ = [
    "BATCH_TASK_NAME",
    "TASK_NAME",
    "CelerySender",
    "make_celery",
    "register_task",
    "start_worker",
]

log = logging.getLogger("crm.scheduler.broker")

_T = TypeVar("_T")

BATCH_TASK_NAME = "crm_scheduler.run_jobs"
"""The Celery task the pump sends: ``run_jobs(messages)``, a list of :class:`Dispatch`
messages."""
TASK_NAME = "crm_scheduler.run_job"
"""``run_job(message)`` with one :class:`Dispatch` message: what earlier pumps sent
(still consumed, so messages in Redis during an upgrade run)."""


def make_celery(settings: SchedulerSettings, main: str = "crm-scheduler") -> Any:
    """A Celery app on ``settings.redis_url`` (not the global current app)."""
    from celery import Celery
    from celery.signals import setup_logging

    # Any receiver stops Celery from configuring logging: ours is JSON lines already.
    setup_logging.connect(_keep_our_logging, weak=False)
    app = Celery(main, broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_acks_on_failure_or_timeout=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue_name,
        task_create_missing_queues=True,
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_connection_timeout=3,
        broker_transport_options={
            "visibility_timeout": 3600,  # never relied upon (see module doc)
            "socket_timeout": 5,
            "socket_connect_timeout": 3,
            # no retry_on_timeout: kombu only pipelines a publish batch when redis-py
            # would not replay it (a lost send is covered by the lease anyway)
        },
        broker_pool_limit=4,
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0.1,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=False,
        worker_disable_rate_limits=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
    )
    return app


def _keep_our_logging(**_: Any) -> None:
    return None


def register_task(app: Any, handle_batch: Callable[[list[object]], object]) -> None:
    """Registers :data:`BATCH_TASK_NAME` and :data:`TASK_NAME`, both calling
    ``handle_batch(messages)`` (the worker's ``JobRunner.submit``: it holds the jobs and
    returns, so the message is acked once its jobs are in the runner's hands; from then
    on the rows' leases, not Redis, guarantee they run)."""

    def run_jobs(messages: list[object]) -> None:
        handle_batch(messages if isinstance(messages, list) else [messages])

    def run_job(message: object) -> None:
        handle_batch([message])

    backend = app.backend  # resolved once: Celery would resolve it again in every pool thread
    for name, fn in ((BATCH_TASK_NAME, run_jobs), (TASK_NAME, run_job)):
        task = app.task(name=name, acks_late=True, ignore_result=True)(fn)
        task.backend = backend


def start_worker(
    app: Any, settings: SchedulerSettings, on_ready: Callable[[], None] | None = None
) -> int:
    """Runs a Celery worker in this thread until it is shut down (SIGTERM: warm
    shutdown, running jobs finish); returns its exit code. ``on_ready`` is called once
    the worker consumes."""
    if on_ready is not None:
        from celery.signals import worker_ready

        def ready(**_: Any) -> None:
            on_ready()

        worker_ready.connect(ready, weak=False)
    worker = app.Worker(
        hostname=f"crm-scheduler@{settings.instance_name}",
        pool_cls=settings.worker_pool,
        concurrency=settings.worker_concurrency,
        queues=[settings.queue_name],
        loglevel=settings.log_level,
        prefetch_multiplier=1,
        optimization="fair",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        redirect_stdouts=False,
    )
    worker.start()
    return int(worker.exitcode or 0)


def split_even(items: Sequence[_T], most: int) -> list[Sequence[_T]]:
    """``items`` in order, in as few chunks of at most ``most`` as possible, of even
    sizes (51 by 50: 26 + 25, not 50 + 1, so two worker slots share the work)."""
    if not items:
        return []
    count = -(-len(items) // max(1, most))
    size = -(-len(items) // count)
    return [items[i : i + size] for i in range(0, len(items), size)]


class CelerySender:
    """Publishes dispatches as :data:`BATCH_TASK_NAME` messages of at most
    ``jobs_per_message`` jobs (no ETA, no countdown), all of one ``send`` in one Redis
    pipeline."""

    def __init__(self, app: Any, queue: str, redis_url: str, jobs_per_message: int = 50) -> None:
        import redis

        self._app = app
        self._queue = queue
        self._per_message = jobs_per_message
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)

    def send(self, dispatches: Sequence[Dispatch]) -> int:
        """Sends in order; returns how many are known to be sent (a failure stops the
        send: the rest keep their lease and are re-sent by the reaper; with a pipeline
        some may have gone out anyway: a duplicate delivery is dropped by the claim)."""
        sent = 0
        chunks = split_even(dispatches, self._per_message)
        try:
            with self._app.producer_or_acquire() as producer:
                if producer.supports_batch_publish:
                    with producer.batch(max_size=max(16, 2 * len(chunks))):
                        for chunk in chunks:
                            self._publish(producer, chunk)
                    sent = len(dispatches)
                else:
                    for chunk in chunks:
                        self._publish(producer, chunk)
                        sent += len(chunk)
        except Exception as exc:  # broker down: the lease covers the rest
            log.warning(
                "sending to the broker failed after %d of %d: %s: %s",
                sent,
                len(dispatches),
                type(exc).__name__,
                exc,
            )
        return sent

    def _publish(self, producer: Any, chunk: Sequence[Dispatch]) -> None:
        first = chunk[0]
        self._app.send_task(
            BATCH_TASK_NAME,
            kwargs={"messages": [d.to_message() for d in chunk]},
            queue=self._queue,
            task_id=f"{first.uid}.{first.attempt}+{len(chunk) - 1}.{uuid.uuid4().hex[:12]}",
            producer=producer,
            argsrepr="()",
            kwargsrepr=f"{{'messages': <{len(chunk)} job(s)>}}",  # no payloads in headers
        )

    def depth(self) -> int:
        """Messages waiting in the broker queue (Redis list length)."""
        return int(self._redis.llen(self._queue))

    def ping(self) -> None:
        self._redis.ping()

    def close(self) -> None:
        self._redis.close()
        self._app.close()
