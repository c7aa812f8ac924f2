"""``JobRunner``: what a worker does with one message (sync; one Celery execution slot).

A message carries the dispatches of one or more jobs (the pump packs the jobs due
together into few messages, so Celery's per-message cost is paid once for many jobs).

1. claim the message's jobs in MySQL in one transaction (ENQUEUED -> RUNNING for the
   attempt each dispatch carries, with a lease of attempt deadline + grace + the wait
   for its due time); a job not claimed is dropped (a duplicate, stale or cancelled
   delivery);
2. call each claimed job's target at its due time, never before (the pump hands jobs
   over up to ``pump_lead_s`` early so that the hand-over does not make them late),
   many at once (unary, raw bytes, gRPC futures), with its attempt deadline and the
   metadata ``x-idempotency-key``, ``x-attempt`` and ``x-scheduler-job-id``;
3. as calls finish, record their results in batches, one transaction each (group
   commit): SUCCEEDED, or RETRY_WAIT with backoff / DEAD (see ``domain.retry``). A slow
   target does not hold back the results of the fast ones.

If the worker dies at any point, the leases expire and the pump's reaper sends the jobs
again; a target must therefore apply a key's effect once (at-least-once calls).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import grpc

from crm_scheduler.domain.model import Clock, Dispatch, JobState
from crm_scheduler.domain.retry import outcome_of_failure
from crm_scheduler.store import Failure, SchedulerStore
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


_R = TypeVar("_R")
_Done = tuple[int, str, str, float]
"""A finished call: (index in the claimed list, gRPC code name, details, seconds)."""


def _identity(x: bytes) -> bytes:
    return x


def _result_of(future: Any) -> tuple[str, str]:
    """(code name, details) of a finished gRPC future."""
    try:
        exc = future.exception()
    except Exception as err:  # cancelled
        return "CANCELLED", f"{type(err).__name__}: {err}"
    if exc is None:
        return "OK", ""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return name, str(details or "")


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

    def handle(self, message: object) -> str:
        """Runs a message of one job (see :meth:`handle_batch`)."""
        return self.handle_batch([message])[0]

    def handle_batch(self, messages: Sequence[object]) -> list[str]:
        """Runs a message's jobs; returns what happened to each (``succeeded``,
        ``retry``, ``dead``, ``lost``, ``skipped`` or ``malformed``)."""
        outcomes = ["malformed"] * len(messages)
        parsed: list[tuple[int, Dispatch]] = []
        for i, message in enumerate(messages):
            try:
                if not isinstance(message, dict):
                    raise TypeError(f"a job message is an object, not {type(message).__name__}")
                parsed.append((i, Dispatch.from_message(message)))
            except (KeyError, TypeError, ValueError) as exc:
                log.error("dropping a malformed message: %s", exc)
                self._count_delivery("malformed")
        if not parsed:
            return outcomes
        store = self.store
        now = self._clock()
        wait_s = max(0.0, max((d.due_at - now).total_seconds() for _, d in parsed))
        won = store.claim_many([d for _, d in parsed], now, self._grace + wait_s, self._worker_name)
        claimed: list[tuple[int, Dispatch]] = []
        for (i, d), ok in zip(parsed, won, strict=True):
            if not ok:
                outcomes[i] = "skipped"
                self._count_delivery("skipped")
                log.debug("delivery skipped (duplicate, stale or cancelled)", extra=_fields(d))
                continue
            claimed.append((i, d))
            self._count_delivery("claimed")
        # calls start in due order, each at its due time; results are recorded as the
        # calls finish (several per transaction)
        order = sorted(range(len(claimed)), key=lambda k: claimed[k][1].due_at)
        done: queue.SimpleQueue[_Done] = queue.SimpleQueue()
        started = 0
        pending = len(claimed)
        while pending:
            now = self._clock()
            while started < len(order) and claimed[order[started]][1].due_at <= now:
                self._start_call(order[started], claimed[order[started]][1], now, done)
                started += 1
            timeout = None
            if started < len(order):
                timeout = max(0.0, (claimed[order[started]][1].due_at - now).total_seconds())
            try:
                finished = [done.get(timeout=timeout)]
            except queue.Empty:
                continue  # the next call is due
            while True:
                try:
                    finished.append(done.get_nowait())
                except queue.Empty:
                    break
            pending -= len(finished)
            self._record_finished(claimed, finished, outcomes)
        return outcomes

    def _start_call(
        self, k: int, d: Dispatch, now: datetime, done: queue.SimpleQueue[_Done]
    ) -> None:
        """Starts the call of ``d``; ``(k, code, details, seconds)`` goes to ``done``
        when it finishes (on a gRPC thread)."""
        if self._metrics is not None:
            self._metrics.start_lag.observe(max(0.0, (now - d.due_at).total_seconds()))
        metadata = (
            (IDEMPOTENCY_KEY, d.idempotency_key),
            (ATTEMPT_KEY, str(d.attempt)),
            (JOB_ID_KEY, d.uid),
        )
        started = time.perf_counter()
        try:
            call = self._callable(d.address, d.method)
            future = call.future(d.request, timeout=d.attempt_deadline_ms / 1000, metadata=metadata)
        except Exception as exc:  # a bad address and the like: retried like UNKNOWN
            done.put((k, "UNKNOWN", f"{type(exc).__name__}: {exc}", 0.0))
            return

        def finished(f: Any) -> None:
            code, details = _result_of(f)
            done.put((k, code, details, time.perf_counter() - started))

        future.add_done_callback(finished)

    def _record_finished(
        self, claimed: list[tuple[int, Dispatch]], finished: list[_Done], outcomes: list[str]
    ) -> None:
        """Records finished attempts in one transaction; sets their outcomes."""
        store = self.store
        succeeded: list[tuple[int, Dispatch]] = []
        failed: list[tuple[int, Failure]] = []
        for k, code, details, seconds in finished:
            i, d = claimed[k]
            if self._metrics is not None:
                self._metrics.attempt_seconds.observe(seconds)
            if code == "OK":
                succeeded.append((i, d))
                continue
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
            failed.append((i, Failure(d, fail_at, result, code, details)))
            log.info(
                "attempt failed: %s",
                code,
                extra={**_fields(d), "code": code, "next": result.state.name},
            )
        recorded = self._record(
            lambda: store.record_results(
                [d for _, d in succeeded], [f for _, f in failed], self._clock()
            )
        )
        ok_s, ok_f = recorded or ([False] * len(succeeded), [False] * len(failed))
        for (i, _), ok in zip(succeeded, ok_s, strict=True):
            outcomes[i] = "succeeded" if ok else "lost"
            self._count_attempt(outcomes[i], "OK")
        for (i, f), ok in zip(failed, ok_f, strict=True):
            dead = f.outcome.state is JobState.DEAD
            outcomes[i] = ("dead" if dead else "retry") if ok else "lost"
            self._count_attempt(outcomes[i], f.code)

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

    def _record(self, write: Callable[[], _R]) -> _R | None:
        """Runs a result write, retrying while the database is unreachable (if it never
        comes back, the leases expire and the jobs run again); None when it failed."""
        for attempt in range(1, _RECORD_TRIES + 1):
            try:
                return write()
            except Exception as exc:
                if attempt == _RECORD_TRIES:
                    log.error("recording results failed for good: %s", exc)
                    return None
                log.warning("recording results failed (retrying): %s", exc)
                time.sleep(0.2 * attempt)
        return None

    def _count_attempt(self, outcome: str, code: str) -> None:
        if self._metrics is not None:
            self._metrics.attempts.labels(outcome, code).inc()

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
