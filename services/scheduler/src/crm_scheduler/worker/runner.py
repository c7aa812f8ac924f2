"""``JobRunner``: what a worker process does with the jobs it receives.

A Celery message carries the dispatches of one or more jobs (the pump packs the jobs
due together into few messages, up to ``pump_lead_s`` before they are due). A job goes
through four stages, each batched across every message of the process:

1. **hold** (the Celery task, :meth:`JobRunner.submit`): the message's jobs are parsed
   and held in memory, ordered by due time; the task returns and the message is acked.
   The rows are still ``ENQUEUED`` with the pump's lease: if this process dies now, the
   lease expires and the pump's reaper sends them again. At most ``max_held`` jobs are
   held (the task blocks beyond, so the worker stops taking messages).
2. **claim** (one thread): the jobs due within ``claim_ahead_s`` are claimed in one
   transaction (``ENQUEUED`` -> ``RUNNING`` for the attempt each dispatch carries, with a
   lease of attempt deadline + grace + the wait until due). Claims are spaced at least
   ``claim_coalesce_s`` apart (one transaction for the jobs of that span), yet each job
   is claimed at least ``claim_ahead_s - claim_coalesce_s`` before it is due when the
   database keeps up. A job not claimed is dropped: a duplicate, stale or cancelled
   delivery. Until its claim a job can still be cancelled.
3. **call** (one thread): each claimed job's call starts at its due time, never before
   (unary, raw bytes, gRPC futures: calls run concurrently), with its attempt deadline
   and the metadata ``x-idempotency-key``, ``x-attempt`` and ``x-scheduler-job-id``, plus
   the Schedule call's ``x-request-id`` and W3C ``traceparent`` when it had them (so the
   caller's request id and trace go on). With tracing on (``tracing_exporter``) the call
   is a CLIENT span, child of that ``traceparent``, and sends its own instead; off, the
   stored one is sent as is and nothing else is done. Nothing but the call is left for
   the due time: the hand-over, the claim and the commits all happened earlier.
4. **record** (one thread, group commit): the finished attempts of the process are
   recorded together, one transaction every ``result_flush_s`` at most: ``SUCCEEDED``,
   or ``RETRY_WAIT`` with backoff / ``DEAD`` (see ``domain.retry``).

If the worker dies at any point, the leases expire and the pump's reaper sends the jobs
again; a target must therefore apply a key's effect once (at-least-once calls).
:meth:`JobRunner.close` drains: held jobs still run at their due time and every result
is recorded before it returns (bounded by its timeout; the leases cover the rest).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from crm_common import tracing

from crm_scheduler.domain.model import Clock, Dispatch, JobState
from crm_scheduler.domain.retry import outcome_of_failure
from crm_scheduler.store import Failure, SchedulerStore
from crm_scheduler.worker.metrics import WorkerMetrics

__all__ = [
    "ATTEMPT_KEY",
    "IDEMPOTENCY_KEY",
    "JOB_ID_KEY",
    "REQUEST_ID_KEY",
    "TRACEPARENT_KEY",
    "JobRunner",
    "Ticket",
]

log = logging.getLogger("crm.scheduler.worker")

IDEMPOTENCY_KEY = "x-idempotency-key"
ATTEMPT_KEY = "x-attempt"
JOB_ID_KEY = "x-scheduler-job-id"
REQUEST_ID_KEY = "x-request-id"
TRACEPARENT_KEY = "traceparent"

_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.enable_retries", 0),
)
_DB_TRIES = 5
_CLAIM_BATCH = 2000
_RECORD_BATCH = 2000

_R = TypeVar("_R")


def _identity(x: bytes) -> bytes:
    return x


def _ignore(_: object) -> None:
    return None


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


class Ticket:
    """What became of a message's jobs: one outcome per job (``succeeded``, ``retry``,
    ``dead``, ``lost``, ``skipped`` or ``malformed``), known once :meth:`wait` returns."""

    def __init__(self, n: int) -> None:
        self.outcomes = ["malformed"] * n
        self._left = n
        self._lock = threading.Lock()
        self._done = threading.Event()
        if n == 0:
            self._done.set()

    def settle(self, index: int, outcome: str) -> None:
        with self._lock:
            self.outcomes[index] = outcome
            self._left -= 1
            if self._left <= 0:
                self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


@dataclass(order=True, slots=True)
class _Held:
    due: float
    seq: int
    dispatch: Dispatch = field(compare=False)
    ticket: Ticket = field(compare=False)
    index: int = field(compare=False)
    call: Any = field(default=None, compare=False)
    """The gRPC callable, prepared (channel created, connecting) when claimed."""
    metadata: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    error: str = field(default="", compare=False)
    """Why no callable could be made (a bad address and the like)."""


@dataclass(slots=True)
class _Finished:
    job: _Held
    code: str
    details: str
    seconds: float


class _State:
    """The per-process part of a runner (threads do not survive a fork)."""

    def __init__(self, pid: int, store: SchedulerStore) -> None:
        self.pid = pid
        self.store = store
        lock = threading.Lock()
        self.claim_cv = threading.Condition(lock)
        """The claimer waits on it: jobs to claim, stop."""
        self.call_cv = threading.Condition(lock)
        """The caller waits on it: claimed jobs, stop."""
        self.room_cv = threading.Condition(lock)
        """Submitters (room to hold) and close (drained) wait on it."""
        self.to_claim: list[_Held] = []
        self.to_call: list[_Held] = []
        self.held = 0
        """Jobs received whose call has not started."""
        self.calling = 0
        """Calls started whose result is not recorded yet."""
        self.results: queue.SimpleQueue[_Finished | None] = queue.SimpleQueue()
        self.stopping = False
        self.threads: list[threading.Thread] = []


class JobRunner:
    """Runs the jobs of received messages (see the module doc); thread-safe.

    ``store_factory`` builds the store (engine) lazily per process, so a prefork pool
    never shares database connections or threads across a fork.
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
        claim_ahead_s: float = 0.25,
        claim_coalesce_s: float = 0.05,
        result_flush_s: float = 0.05,
        max_held: int = 20_000,
    ) -> None:
        self._store_factory = store_factory
        self._worker_name = worker_name
        self._grace = lease_grace_s
        self._clock = clock
        self._metrics = metrics
        self._rng = rng or random.SystemRandom()
        self._claim_ahead = max(0.0, claim_ahead_s)
        self._claim_coalesce = min(max(0.0, claim_coalesce_s), self._claim_ahead)
        self._flush_s = max(0.0, result_flush_s)
        self._max_held = max(1, max_held)
        self._lock = threading.Lock()
        self._state: _State | None = None
        self._seq = itertools.count()
        self._channels: dict[str, grpc.Channel] = {}
        self._calls: dict[tuple[str, str], Any] = {}
        if metrics is not None:
            metrics.held.set_function(self._held)

    def _held(self) -> float:
        st = self._state
        return float(st.held) if st is not None and st.pid == os.getpid() else 0.0

    # -- entry points ---------------------------------------------------------------------

    @property
    def store(self) -> SchedulerStore:
        return self._running().store

    def start(self) -> None:
        """Builds the store and starts the threads now (else on the first message)."""
        self._running()

    def submit(self, messages: Sequence[object], block_s: float = 60.0) -> Ticket:
        """Holds a message's jobs (see the module doc) and returns at once, unless
        ``max_held`` jobs are held already: then it waits (at most ``block_s``) for room,
        so the worker stops taking messages meanwhile."""
        ticket = Ticket(len(messages))
        parsed: list[tuple[int, Dispatch]] = []
        for i, message in enumerate(messages):
            try:
                if not isinstance(message, dict):
                    raise TypeError(f"a job message is an object, not {type(message).__name__}")
                parsed.append((i, Dispatch.from_message(message)))
            except (KeyError, TypeError, ValueError) as exc:
                log.error("dropping a malformed message: %s", exc)
                self._count_delivery("malformed")
                ticket.settle(i, "malformed")
        if not parsed:
            return ticket
        st = self._running()
        now = self._clock().timestamp()
        late = 0
        with st.claim_cv:
            if st.held >= self._max_held:
                st.room_cv.wait_for(lambda: st.held < self._max_held or st.stopping, block_s)
            for i, d in parsed:
                due = d.due_at.timestamp()
                late += due < now
                heapq.heappush(st.to_claim, _Held(due, next(self._seq), d, ticket, i))
            st.held += len(parsed)
            st.claim_cv.notify()
        if self._metrics is not None:
            self._metrics.received_late.inc(late)
            for _, d in parsed:
                self._metrics.receive_margin.observe(max(0.0, d.due_at.timestamp() - now))
        return ticket

    def handle(self, message: object) -> str:
        """Runs a message of one job to its end (see :meth:`handle_batch`)."""
        return self.handle_batch([message])[0]

    def handle_batch(self, messages: Sequence[object]) -> list[str]:
        """Runs a message's jobs to their end (claimed, called at their due time,
        recorded); returns what happened to each (see :class:`Ticket`)."""
        ticket = self.submit(messages)
        ticket.wait()
        return ticket.outcomes

    def close(self, drain_timeout_s: float = 30.0) -> bool:
        """Runs the held jobs (at their due time) and records every result, waiting at
        most ``drain_timeout_s``; then stops the threads and closes the connections.
        Returns whether everything was drained (what was not is covered by leases)."""
        with self._lock:
            st, self._state = self._state, None
        drained = True
        if st is not None and st.pid == os.getpid():
            with st.room_cv:
                drained = st.room_cv.wait_for(
                    lambda: st.held == 0 and st.calling == 0, max(0.0, drain_timeout_s)
                )
                st.stopping = True
                st.claim_cv.notify_all()
                st.call_cv.notify_all()
                st.room_cv.notify_all()
            st.results.put(None)
            for t in st.threads:
                t.join(timeout=5)
            if not drained:
                log.warning(
                    "stopping with %d job(s) held and %d call(s) unrecorded: their leases "
                    "will expire and the pump will send them again",
                    st.held,
                    st.calling,
                )
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._calls.clear()
        if st is not None:
            st.store.close()
        return drained

    # -- per process ------------------------------------------------------------------

    def _running(self) -> _State:
        pid = os.getpid()
        st = self._state
        if st is not None and st.pid == pid:
            return st
        with self._lock:
            st = self._state
            if st is None or st.pid != pid:
                self._channels.clear()
                self._calls.clear()
                st = _State(pid, self._store_factory())
                for name, loop in (
                    ("claim", self._claim_loop),
                    ("call", self._call_loop),
                    ("record", self._record_loop),
                ):
                    t = threading.Thread(
                        target=loop, args=(st,), name=f"crm-scheduler-{name}", daemon=True
                    )
                    st.threads.append(t)
                    t.start()
                self._state = st
        return st

    # -- claim ------------------------------------------------------------------------

    def _claim_loop(self, st: _State) -> None:
        ahead, coalesce = self._claim_ahead, self._claim_coalesce
        last = -float("inf")
        while True:
            with st.claim_cv:
                while True:
                    if st.stopping:
                        return
                    if st.to_claim:
                        front = st.to_claim[0].due
                        # claim the jobs within `ahead` of their due time, at most every
                        # `coalesce`, but never let one get closer than ahead - coalesce
                        at = max(front - ahead, min(last + coalesce, front - ahead + coalesce))
                        wait = at - self._clock().timestamp()
                        if wait <= 0:
                            break
                        st.claim_cv.wait(wait)
                    else:
                        st.claim_cv.wait()
                now = self._clock().timestamp()
                batch: list[_Held] = []
                while (
                    st.to_claim
                    and st.to_claim[0].due <= now + ahead
                    and len(batch) < (_CLAIM_BATCH)
                ):
                    batch.append(heapq.heappop(st.to_claim))
            last = now
            self._claim(st, batch)

    def _claim(self, st: _State, batch: list[_Held]) -> None:
        now = self._clock()
        wait_s = max(0.0, max(h.due for h in batch) - now.timestamp())
        won = self._retrying(
            "claiming jobs",
            lambda: st.store.claim_many(
                [h.dispatch for h in batch], now, self._grace + wait_s, self._worker_name
            ),
        )
        claimed: list[_Held] = []
        dropped: list[tuple[_Held, str]] = []
        for h, ok in zip(batch, won or [False] * len(batch), strict=True):
            if ok:
                claimed.append(h)
            else:
                dropped.append((h, "skipped" if won is not None else "lost"))
        for h in claimed:  # all but the call itself is done before the due time
            self._prepare(h)
        with st.call_cv:
            for h in claimed:
                heapq.heappush(st.to_call, h)
            st.held -= len(dropped)
            st.call_cv.notify()
            if dropped:
                st.room_cv.notify_all()
        for h, outcome in dropped:
            self._count_delivery(outcome)
            if outcome == "skipped":
                log.debug("delivery skipped (duplicate, stale or cancelled)", extra=_fields(h))
            h.ticket.settle(h.index, outcome)
        if self._metrics is not None and claimed:
            self._metrics.deliveries.labels("claimed").inc(len(claimed))

    # -- call -------------------------------------------------------------------------

    def _call_loop(self, st: _State) -> None:
        while True:
            with st.call_cv:
                while True:
                    if st.stopping:  # drained, or given up: the leases cover the rest
                        return
                    if st.to_call:
                        wait = st.to_call[0].due - self._clock().timestamp()
                        if wait <= 0:
                            break
                        st.call_cv.wait(wait)
                    else:
                        st.call_cv.wait()
                now = self._clock().timestamp()
                due: list[_Held] = []
                while st.to_call and st.to_call[0].due <= now:
                    due.append(heapq.heappop(st.to_call))
                st.held -= len(due)
                st.calling += len(due)
                st.room_cv.notify_all()
            for h in due:
                self._start_call(st, h, now)

    def _prepare(self, h: _Held) -> None:
        d = h.dispatch
        h.metadata = (
            (IDEMPOTENCY_KEY, d.idempotency_key),
            (ATTEMPT_KEY, str(d.attempt)),
            (JOB_ID_KEY, d.uid),
        )
        if d.request_id:
            h.metadata += ((REQUEST_ID_KEY, d.request_id),)
        if d.traceparent:  # tracing on: replaced by the call's own span (_start_call)
            h.metadata += ((TRACEPARENT_KEY, d.traceparent),)
        try:
            h.call = self._callable(d.address, d.method)
        except Exception as exc:  # a bad address and the like: retried like UNKNOWN
            h.error = f"{type(exc).__name__}: {exc}"

    def _start_call(self, st: _State, h: _Held, now: float) -> None:
        d = h.dispatch
        if self._metrics is not None:
            self._metrics.start_lag.observe(max(0.0, now - h.due))
        if tracing.enabled():  # off: this one check is all tracing costs
            self._start_traced_call(st, h)
            return
        started = time.perf_counter()
        try:
            if h.call is None:
                raise ValueError(h.error or "no callable")
            future = h.call.future(
                d.request, timeout=d.attempt_deadline_ms / 1000, metadata=h.metadata
            )
        except Exception as exc:  # a bad address and the like: retried like UNKNOWN
            st.results.put(_Finished(h, "UNKNOWN", h.error or f"{type(exc).__name__}: {exc}", 0.0))
            return

        def finished(f: Any) -> None:
            code, details = _result_of(f)
            st.results.put(_Finished(h, code, details, time.perf_counter() - started))

        future.add_done_callback(finished)

    def _start_traced_call(self, st: _State, h: _Held) -> None:
        """:meth:`_start_call` inside a CLIENT span, child of the job's stored
        ``traceparent`` (a new trace without one), whose own ``traceparent`` is sent."""
        d = h.dispatch
        made = tracing.start_carried_client_span(
            d.method,
            d.traceparent,
            d.request_id,
            {"crm.scheduler.job_id": d.uid, "crm.scheduler.attempt": d.attempt},
        )
        span: Any = None
        metadata = h.metadata
        if made is not None:  # (None: tracing was turned off meanwhile)
            span, traceparent = made
            metadata = (
                *(m for m in metadata if m[0] != TRACEPARENT_KEY),
                (TRACEPARENT_KEY, traceparent),
            )
        started = time.perf_counter()
        try:
            if h.call is None:
                raise ValueError(h.error or "no callable")
            future = h.call.future(
                d.request, timeout=d.attempt_deadline_ms / 1000, metadata=metadata
            )
        except Exception as exc:  # a bad address and the like: retried like UNKNOWN
            if span is not None:
                tracing.end_carried_client_span(span, "UNKNOWN")
            st.results.put(_Finished(h, "UNKNOWN", h.error or f"{type(exc).__name__}: {exc}", 0.0))
            return

        def finished(f: Any) -> None:
            code, details = _result_of(f)
            if span is not None:
                tracing.end_carried_client_span(span, code)
            st.results.put(_Finished(h, code, details, time.perf_counter() - started))

        future.add_done_callback(finished)

    def _callable(self, address: str, method: str) -> Any:
        key = (address, method)
        call = self._calls.get(key)
        if call is None:
            with self._lock:
                channel = self._channels.get(address)
                if channel is None:
                    channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
                    self._channels[address] = channel
                    # connect now (a short-lived gRPC thread), not on the first call
                    channel.subscribe(_ignore, try_to_connect=True)
                    channel.unsubscribe(_ignore)
                call = channel.unary_unary(
                    method, request_serializer=_identity, response_deserializer=_identity
                )
                self._calls[key] = call
        return call

    # -- record -----------------------------------------------------------------------

    def _record_loop(self, st: _State) -> None:
        while True:
            first = st.results.get()
            if first is None:
                return
            if self._flush_s:
                time.sleep(self._flush_s)  # group commit: let the results of a span gather
            batch = [first]
            stop = False
            while len(batch) < _RECORD_BATCH:
                try:
                    item = st.results.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                self._record_finished(st, batch)
            except Exception:  # never let the writer die: the leases cover these jobs
                log.exception("recording %d result(s) failed", len(batch))
            if stop:
                return

    def _record_finished(self, st: _State, batch: list[_Finished]) -> None:
        """Records finished attempts in one transaction; settles their tickets."""
        succeeded: list[_Finished] = []
        failed: list[tuple[_Finished, Failure]] = []
        for fin in batch:
            d = fin.job.dispatch
            if self._metrics is not None:
                self._metrics.attempt_seconds.observe(fin.seconds)
            if fin.code == "OK":
                succeeded.append(fin)
                continue
            fail_at = self._clock()
            result = outcome_of_failure(
                fin.code,
                d.run_attempt,
                d.max_retries,
                d.backoff_initial_ms,
                d.backoff_max_ms,
                fail_at,
                self._rng,
            )
            failed.append((fin, Failure(d, fail_at, result, fin.code, fin.details)))
            log.info(
                "attempt failed: %s",
                fin.code,
                extra={**_fields(fin.job), "code": fin.code, "next": result.state.name},
            )
        recorded = self._retrying(
            "recording results",
            lambda: st.store.record_results(
                [f.job.dispatch for f in succeeded], [f for _, f in failed], self._clock()
            ),
        )
        ok_s, ok_f = recorded or ([False] * len(succeeded), [False] * len(failed))
        settled: list[tuple[_Finished, str]] = []
        for fin, ok in zip(succeeded, ok_s, strict=True):
            settled.append((fin, "succeeded" if ok else "lost"))
        for (fin, f), ok in zip(failed, ok_f, strict=True):
            dead = f.outcome.state is JobState.DEAD
            settled.append((fin, ("dead" if dead else "retry") if ok else "lost"))
        for fin, outcome in settled:
            self._count_attempt(outcome, fin.code)
            fin.job.ticket.settle(fin.job.index, outcome)
        with st.room_cv:
            st.calling -= len(batch)
            st.room_cv.notify_all()

    def _retrying(self, what: str, write: Callable[[], _R]) -> _R | None:
        """Runs a database write, retrying while the database is unreachable (if it
        never comes back, the leases expire and the jobs run again); None when it
        failed for good."""
        for attempt in range(1, _DB_TRIES + 1):
            try:
                return write()
            except Exception as exc:
                if attempt == _DB_TRIES:
                    log.error("%s failed for good: %s", what, exc)
                    return None
                log.warning("%s failed (retrying): %s", what, exc)
                time.sleep(0.2 * attempt)
        return None

    def _count_attempt(self, outcome: str, code: str) -> None:
        if self._metrics is not None:
            self._metrics.attempts.labels(outcome, code).inc()

    def _count_delivery(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.deliveries.labels(result).inc()


def _fields(h: _Held) -> dict[str, object]:
    d = h.dispatch
    fields: dict[str, object] = {"job_id": d.uid, "job_name": d.name, "attempt": d.attempt}
    if d.request_id:  # the Schedule call's: the worker's lines join its request
        fields["request_id"] = d.request_id
    return fields
