"""``JobRunner``: what a worker does with one message (sync; one Celery execution slot).

1. claim the job in MySQL (conditional UPDATE ENQUEUED -> RUNNING for the attempt the
   message carries, with a lease of attempt deadline + grace); no row -> drop (a
   duplicate, stale or cancelled delivery);
2. call the target (unary, raw bytes) with the attempt deadline and the metadata
   ``x-idempotency-key``, ``x-attempt`` and ``x-scheduler-job-id``;
3. record SUCCEEDED, or RETRY_WAIT with backoff / DEAD (see ``domain.retry``).

If the worker dies at any point, the lease expires and the pump's reaper sends the job
again; a target must therefore apply a key's effect once (at-least-once calls).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from crm_scheduler.domain.model import Clock, Dispatch, JobState
from crm_scheduler.domain.retry import outcome_of_failure
from crm_scheduler.store import SchedulerStore
from crm_scheduler.worker.metrics import WorkerMetrics

__all__ = ["ATTEMPT_KEY", "IDEMPOTENCY_KEY", "JOB_ID_KEY", "JobRunner"]

log = logging.getLogger("crm.scheduler.worker")

IDEMPOTENCY_KEY = "x-idempotency-key"
ATTEMPT_KEY = "x-attempt"
JOB_ID_KEY = "x-scheduler-job-id"

_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.enable_retries", 0),
)
_RECORD_TRIES = 5


def _identity(x: bytes) -> bytes:
    return x


class JobRunner:
    """Runs messages; thread-safe (one instance serves every execution slot).

    ``store_factory`` builds the store (engine) lazily per process, so a prefork pool
    never shares database connections across a fork.
    """

    def __init__(
        self,
        store_factory: Callable[[], SchedulerStore],
        *,
        worker_name: str,
        lease_grace_s: float,
        clock: Clock,
        metrics: WorkerMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._store_factory = store_factory
        self._store: tuple[int, SchedulerStore] | None = None
        self._worker_name = worker_name
        self._grace = lease_grace_s
        self._clock = clock
        self._metrics = metrics
        self._rng = rng or random.SystemRandom()
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._calls: dict[tuple[str, str], Any] = {}

    @property
    def store(self) -> SchedulerStore:
        pid = os.getpid()
        current = self._store
        if current is None or current[0] != pid:
            with self._lock:
                current = self._store
                if current is None or current[0] != pid:
                    self._channels.clear()
                    self._calls.clear()
                    current = (pid, self._store_factory())
                    self._store = current
        return current[1]

    def handle(self, message: dict[str, object]) -> str:
        """Runs one message; returns what happened (``succeeded``, ``retry``, ``dead``,
        ``lost``, ``skipped`` or ``malformed``)."""
        try:
            d = Dispatch.from_message(message)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("dropping a malformed message: %s", exc)
            self._count_delivery("malformed")
            return "malformed"
        store = self.store
        now = self._clock()
        lease_s = d.attempt_deadline_ms / 1000 + self._grace
        if not store.claim(d, now, lease_s, self._worker_name):
            self._count_delivery("skipped")
            log.debug("delivery skipped (duplicate, stale or cancelled)", extra=_fields(d))
            return "skipped"
        self._count_delivery("claimed")
        if self._metrics is not None:
            self._metrics.start_lag.observe(max(0.0, (now - d.due_at).total_seconds()))
        started = time.perf_counter()
        code, details = self._call(d)
        if self._metrics is not None:
            self._metrics.attempt_seconds.observe(time.perf_counter() - started)
        if code == "OK":
            recorded = self._record(lambda: store.record_success(d, self._clock()))
            outcome = "succeeded" if recorded else "lost"
        else:
            fail_at = self._clock()
            result = outcome_of_failure(
                code,
                d.run_attempt,
                d.max_retries,
                d.backoff_initial_ms,
                d.backoff_max_ms,
                fail_at,
                self._rng,
            )
            recorded = self._record(lambda: store.record_failure(d, fail_at, result, code, details))
            outcome = ("dead" if result.state is JobState.DEAD else "retry") if recorded else "lost"
            log.info(
                "attempt failed: %s",
                code,
                extra={**_fields(d), "code": code, "next": result.state.name},
            )
        if self._metrics is not None:
            self._metrics.attempts.labels(outcome, code).inc()
        return outcome

    def _call(self, d: Dispatch) -> tuple[str, str]:
        call = self._callable(d.address, d.method)
        metadata = (
            (IDEMPOTENCY_KEY, d.idempotency_key),
            (ATTEMPT_KEY, str(d.attempt)),
            (JOB_ID_KEY, d.uid),
        )
        try:
            call(d.request, timeout=d.attempt_deadline_ms / 1000, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            return name, str(details or "")
        except Exception as exc:  # a bad address and the like: retried like UNKNOWN
            return "UNKNOWN", f"{type(exc).__name__}: {exc}"
        return "OK", ""

    def _callable(self, address: str, method: str) -> Any:
        key = (address, method)
        call = self._calls.get(key)
        if call is None:
            with self._lock:
                channel = self._channels.get(address)
                if channel is None:
                    channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
                    self._channels[address] = channel
                call = channel.unary_unary(
                    method, request_serializer=_identity, response_deserializer=_identity
                )
                self._calls[key] = call
        return call

    def _record(self, write: Callable[[], bool]) -> bool:
        """Runs a result write, retrying while the database is unreachable (if it never
        comes back, the lease expires and the job runs again)."""
        for attempt in range(1, _RECORD_TRIES + 1):
            try:
                return write()
            except Exception as exc:
                if attempt == _RECORD_TRIES:
                    log.error("recording a result failed for good: %s", exc)
                    return False
                log.warning("recording a result failed (retrying): %s", exc)
                time.sleep(0.2 * attempt)
        return False

    def _count_delivery(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.deliveries.labels(result).inc()

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._calls.clear()
            current, self._store = self._store, None
        if current is not None:
            current[1].close()


def _fields(d: Dispatch) -> dict[str, object]:
    return {"job_id": d.uid, "job_name": d.name, "attempt": d.attempt}
