"""``SchedulerStore``: every read and write of the ``job`` table (blocking; callers run
it in a :class:`~crm_common.aio.BlockingExecutor` or a worker thread).

Concurrency contract (what makes a job run once per claim and never get lost):

- the pump moves due rows (``due_at <= now``) to ENQUEUED with a lease in one
  transaction (``FOR UPDATE SKIP LOCKED``: pumps never collide), *then* sends them;
- a worker claims a message's jobs in one transaction: the rows are locked, and only
  those still ENQUEUED for the attempt counters the message carries become RUNNING; a
  duplicate or stale delivery, or a job cancelled in between, is not claimed and is
  dropped;
- results are recorded the same way, several in one transaction (a late result of an
  attempt whose lease was reaped is ignored, except a success, which is never thrown
  away);
- the reaper re-sends in-flight rows whose lease expired.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from crm_common.db import ER_DUP_ENTRY, TransactionRunner, mysql_errno
from crm_common.errors import AlreadyExists, FailedPrecondition, NotFound, PreconditionViolation
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Update,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from crm_scheduler.domain.model import (
    CANCELLABLE,
    Dispatch,
    Job,
    JobFilter,
    JobRef,
    JobSpec,
    JobState,
    Target,
    TraceOrigin,
)
from crm_scheduler.domain.retry import LEASE_EXPIRED, AttemptOutcome
from crm_scheduler.store.schema import JobRow

__all__ = ["Failure", "MoveResult", "ReapResult", "SchedulerStore"]

log = logging.getLogger("crm.scheduler.store")

_ENQUEUED = JobState.ENQUEUED.name
_RUNNING = JobState.RUNNING.name
_MAX_ERROR_CHARS = 1000
_MAX_RESEND_DOUBLINGS = 3
_NO_CAP = 2**62

# The hot paths (the pump's move, the workers' claims and results) as driver-level SQL:
# per transaction whatever its number of jobs (lock the rows, one UPDATE, commit), with
# no statement building, compiling or per-id parameter escaping in Python (ids are
# ints, inlined by :func:`_ids`).
_IN_FLIGHT = "SELECT COUNT(*) FROM job WHERE lease_until IS NOT NULL"
_NEXT_DUE = "SELECT MIN(due_at) FROM job"
_LOCK_DUE = (
    "SELECT id, uid, name, idempotency_key, target_method, target_address, payload,"
    " total_attempts, attempts, max_retries, backoff_initial_ms, backoff_max_ms,"
    " attempt_deadline_ms, due_at, request_id, traceparent"
    " FROM job WHERE due_at <= %s ORDER BY due_at LIMIT %s"
    " FOR UPDATE SKIP LOCKED"
)
_ENQUEUE = (
    "UPDATE job SET state = 'ENQUEUED', due_at = NULL, lease_until = %s,"
    " dispatches = dispatches + 1, updated_at = %s WHERE id IN ({ids})"
)
_LOCK_CLAIM = (
    "SELECT id, state, total_attempts, attempts FROM job WHERE id IN ({ids}) ORDER BY id FOR UPDATE"
)
_CLAIM = (
    "UPDATE job SET state = 'RUNNING', attempts = attempts + 1,"
    " total_attempts = total_attempts + 1,"
    " lease_until = %s + INTERVAL (attempt_deadline_ms * 1000 + %s) MICROSECOND,"
    " worker = %s, resends = 0, updated_at = %s"
    " WHERE id IN ({ids}) AND state = 'ENQUEUED'"
)
_LOCK_RESULT = (
    "SELECT id, state, total_attempts FROM job WHERE id IN ({ids}) ORDER BY id FOR UPDATE"
)
_SUCCEED = (
    "UPDATE job SET state = 'SUCCEEDED', due_at = NULL, lease_until = NULL,"
    " finished_at = %s, updated_at = %s WHERE id IN ({ids})"
)


def _ids(ids: Sequence[int]) -> str:
    """``1,2,3`` for an ``IN (...)``: each id is checked to be an int (never text)."""
    return ",".join(str(int(i)) for i in ids)


_SUCCEEDABLE = frozenset({_RUNNING, _ENQUEUED, JobState.RETRY_WAIT.name})


def _aware(at: datetime) -> datetime:
    """Naive UTC from the database -> aware UTC (where no ORM type converts)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _naive(at: datetime) -> datetime:
    """Aware -> naive UTC, for plain SQL parameters (the ORM type does it elsewhere)."""
    return at.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt to record: when it failed, what follows (retry or DEAD), why."""

    dispatch: Dispatch
    at: datetime
    outcome: AttemptOutcome
    code: str
    message: str


def _fail_statement(f: Failure) -> Update:
    dead = f.outcome.state is JobState.DEAD
    return (
        update(JobRow)
        .where(JobRow.id == f.dispatch.job_id)
        .values(
            state=f.outcome.state.name,
            due_at=f.outcome.due_at,
            lease_until=None,
            last_error_code=f.code[:32],
            last_error_message=_clip(f.message),
            finished_at=f.at if dead else None,
            updated_at=f.at,
        )
    )


@dataclass(frozen=True, slots=True)
class MoveResult:
    """One pump transaction: the messages to send, the jobs in flight before it, and
    when the next waiting job is due (None: none waits)."""

    dispatches: list[Dispatch]
    in_flight: int
    next_due: datetime | None


def _move(
    conn: Connection, now: datetime, until: datetime, limit: int, lease_until: datetime
) -> list[Dispatch]:
    rows = conn.exec_driver_sql(_LOCK_DUE, (_naive(until), limit)).all()
    if not rows:
        return []  # (plain tuples: no ORM objects on the pump's hot path)
    conn.exec_driver_sql(
        _ENQUEUE.format(ids=_ids([r[0] for r in rows])), (_naive(lease_until), _naive(now))
    )
    return [
        Dispatch(
            job_id=r[0],
            uid=r[1],
            name=r[2],
            idempotency_key=r[3],
            method=r[4],
            address=r[5],
            request=bytes(r[6]),
            attempt=r[7] + 1,
            run_attempt=r[8] + 1,
            max_retries=r[9],
            backoff_initial_ms=r[10],
            backoff_max_ms=r[11],
            attempt_deadline_ms=r[12],
            due_at=_aware(r[13]) if r[13] is not None else now,
            request_id=r[14] or "",
            traceparent=r[15] or "",
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class ReapResult:
    """What one reaper pass did: messages to send again, jobs made DEAD."""

    resend: list[Dispatch]
    dead: int
    lost_enqueued: int
    lost_running: int


def _to_job(row: JobRow) -> Job:
    return Job(
        id=row.id,
        uid=row.uid,
        name=row.name,
        idempotency_key=row.idempotency_key,
        target=Target(row.target_method, row.target_address, bytes(row.payload)),
        eta=row.eta,
        state=JobState[row.state],
        attempts=row.attempts,
        total_attempts=row.total_attempts,
        max_retries=row.max_retries,
        backoff_initial_ms=row.backoff_initial_ms,
        backoff_max_ms=row.backoff_max_ms,
        attempt_deadline_ms=row.attempt_deadline_ms,
        due_at=row.due_at,
        lease_until=row.lease_until,
        last_error_code=row.last_error_code,
        last_error_message=row.last_error_message,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        reruns=row.reruns,
    )


def _dispatch(row: JobRow | Row[Any], due_at: datetime) -> Dispatch:
    return Dispatch(
        job_id=row.id,
        uid=row.uid,
        name=row.name,
        idempotency_key=row.idempotency_key,
        method=row.target_method,
        address=row.target_address,
        request=bytes(row.payload),
        attempt=row.total_attempts + 1,
        run_attempt=row.attempts + 1,
        max_retries=row.max_retries,
        backoff_initial_ms=row.backoff_initial_ms,
        backoff_max_ms=row.backoff_max_ms,
        attempt_deadline_ms=row.attempt_deadline_ms,
        due_at=due_at,
        request_id=row.request_id or "",
        traceparent=row.traceparent or "",
    )


_DISPATCH_COLUMNS = (
    JobRow.id,
    JobRow.uid,
    JobRow.name,
    JobRow.idempotency_key,
    JobRow.target_method,
    JobRow.target_address,
    JobRow.payload,
    JobRow.total_attempts,
    JobRow.attempts,
    JobRow.max_retries,
    JobRow.backoff_initial_ms,
    JobRow.backoff_max_ms,
    JobRow.attempt_deadline_ms,
    JobRow.due_at,
    JobRow.request_id,
    JobRow.traceparent,
)


def _spec_values(spec: JobSpec, now: datetime, origin: TraceOrigin | None) -> dict[str, object]:
    return {
        "uid": spec.uid,
        "idempotency_key": spec.idempotency_key,
        "spec_hash": spec.spec_hash(),
        "name": spec.name,
        "target_method": spec.target.method,
        "target_address": spec.target.address,
        "payload": spec.target.request,
        "eta": spec.eta,
        "state": JobState.SCHEDULED.name,
        "due_at": spec.eta,
        "lease_until": None,
        "attempts": 0,
        "total_attempts": 0,
        "max_retries": spec.max_retries,
        "backoff_initial_ms": spec.backoff_initial_ms,
        "backoff_max_ms": spec.backoff_max_ms,
        "attempt_deadline_ms": spec.attempt_deadline_ms,
        "dispatches": 0,
        "resends": 0,
        "reruns": 0,
        "created_at": now,
        "updated_at": now,
        "request_id": (origin.request_id or None) if origin is not None else None,
        "traceparent": (origin.traceparent or None) if origin is not None else None,
    }


def _ref_clause(ref: JobRef) -> ColumnElement[bool]:
    if ref.uid:
        return JobRow.uid == ref.uid
    return JobRow.idempotency_key == ref.idempotency_key


def _clip(message: str) -> str:
    return message if len(message) <= _MAX_ERROR_CHARS else message[: _MAX_ERROR_CHARS - 3] + "..."


class SchedulerStore:
    """The job table (see the module doc for the concurrency contract)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._tx = TransactionRunner(engine)

    def close(self) -> None:
        """Closes the engine's connections."""
        self.engine.dispose()

    def ping(self) -> None:
        """``SELECT 1`` (readiness)."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # -- API ----------------------------------------------------------------------------

    def schedule(
        self, spec: JobSpec, now: datetime, origin: TraceOrigin | None = None
    ) -> tuple[Job, bool]:
        """Creates the job, or returns the existing one with the same key and spec
        (``created`` False); AlreadyExists when the key exists with another spec.
        ``origin`` (request id, traceparent of the call) is kept for the target call; an
        existing job keeps its own."""

        def create(session: Session) -> Job:
            session.execute(insert(JobRow).values(_spec_values(spec, now, origin)))
            row = session.scalars(select(JobRow).where(JobRow.uid == spec.uid)).one()
            return _to_job(row)

        try:
            return self._tx.run(create), True
        except IntegrityError as exc:
            if mysql_errno(exc) != ER_DUP_ENTRY:
                raise
        spec_hash = spec.spec_hash()

        def existing(session: Session) -> tuple[Job, str] | None:
            row = session.scalars(
                select(JobRow).where(JobRow.idempotency_key == spec.idempotency_key)
            ).one_or_none()
            return None if row is None else (_to_job(row), row.spec_hash)

        found = self._tx.run(existing)
        if found is None:  # the same uid under another key: a UUID v5 collision
            raise AlreadyExists("a job with this id exists", reason="JOB_ID_CONFLICT")
        job, stored_hash = found
        if stored_hash != spec_hash:
            raise AlreadyExists(
                "a job with this idempotency key exists with a different spec",
                reason="IDEMPOTENCY_KEY_REUSED",
                metadata={"job_id": job.uid},
            )
        return job, False

    def schedule_many(self, specs: Sequence[JobSpec], now: datetime) -> int:
        """Bulk insert (tools and tests); keys must be new. Returns the rows inserted."""
        if not specs:
            return 0

        def bulk(session: Session) -> int:
            session.execute(insert(JobRow), [_spec_values(s, now, None) for s in specs])
            return len(specs)

        return self._tx.run(bulk)

    def get(self, ref: JobRef) -> Job:
        def read(session: Session) -> Job:
            row = session.scalars(select(JobRow).where(_ref_clause(ref))).one_or_none()
            if row is None:
                raise NotFound(f"{ref.describe()} not found", reason="JOB_NOT_FOUND")
            return _to_job(row)

        return self._tx.run(read)

    def cancel(self, ref: JobRef, now: datetime) -> Job:
        """SCHEDULED / RETRY_WAIT / ENQUEUED -> CANCELLED (a cancelled job is returned
        as is); FailedPrecondition when RUNNING or finished."""

        def change(session: Session) -> Job:
            row = self._locked(session, ref)
            state = JobState[row.state]
            if state is JobState.CANCELLED:
                return _to_job(row)
            if state not in CANCELLABLE:
                raise FailedPrecondition(
                    f"job is {state.name}: only a job that has not started can be cancelled",
                    violations=[
                        PreconditionViolation("JOB_STATE", f"job/{row.uid}", f"job is {state.name}")
                    ],
                    reason="JOB_NOT_CANCELLABLE",
                )
            row.state = JobState.CANCELLED.name
            row.due_at = None
            row.lease_until = None
            row.finished_at = now
            row.updated_at = now
            return _to_job(row)

        return self._tx.run(change)

    def rerun(self, ref: JobRef, now: datetime) -> Job:
        """DEAD -> SCHEDULED (due now, fresh retry budget)."""

        def change(session: Session) -> Job:
            row = self._locked(session, ref)
            state = JobState[row.state]
            if state is not JobState.DEAD:
                raise FailedPrecondition(
                    f"job is {state.name}: only a DEAD job can be re-run",
                    violations=[
                        PreconditionViolation("JOB_STATE", f"job/{row.uid}", f"job is {state.name}")
                    ],
                    reason="JOB_NOT_DEAD",
                )
            row.state = JobState.SCHEDULED.name
            row.due_at = now
            row.lease_until = None
            row.attempts = 0
            row.reruns += 1
            row.finished_at = None
            row.updated_at = now
            return _to_job(row)

        return self._tx.run(change)

    def list_jobs(self, f: JobFilter, after_id: int, limit: int) -> list[Job]:
        """Jobs matching ``f`` with ``id > after_id``, by id, at most ``limit``."""

        def read(session: Session) -> list[Job]:
            q = select(JobRow).where(JobRow.id > after_id)
            if f.states:
                q = q.where(JobRow.state.in_(sorted(s.name for s in f.states)))
            if f.name:
                q = q.where(JobRow.name == f.name)
            if f.target_method:
                q = q.where(JobRow.target_method == f.target_method)
            if f.target_address:
                q = q.where(JobRow.target_address == f.target_address)
            rows = session.scalars(q.order_by(JobRow.id).limit(limit)).all()
            return [_to_job(r) for r in rows]

        return self._tx.run(read)

    @staticmethod
    def _locked(session: Session, ref: JobRef) -> JobRow:
        row = session.scalars(
            select(JobRow).where(_ref_clause(ref)).with_for_update()
        ).one_or_none()
        if row is None:
            raise NotFound(f"{ref.describe()} not found", reason="JOB_NOT_FOUND")
        return row

    # -- pump ---------------------------------------------------------------------------

    def enqueue_due(self, now: datetime, limit: int, lease_s: float) -> list[Dispatch]:
        """Marks up to ``limit`` due jobs ENQUEUED with a lease (committed), returning
        the messages to send. The caller sends them after this returns."""
        return self.move_due(now, now, limit, lease_s, _NO_CAP).dispatches

    def move_due(
        self, now: datetime, until: datetime, limit: int, lease_s: float, max_in_flight: int
    ) -> MoveResult:
        """The pump's transaction: counts the jobs in flight, marks up to ``limit`` jobs
        due by ``until`` ENQUEUED with a lease (fewer when ``max_in_flight`` would be
        passed), finds when the next waiting job is due, and commits. The caller sends
        the returned messages after this returns. The lease runs ``lease_s`` from
        ``until``: a job handed over early does not lose lease time while it waits for
        its due time in a worker."""
        lease_until = max(now, until) + timedelta(seconds=lease_s)

        def move(conn: Connection) -> MoveResult:
            in_flight = int(conn.exec_driver_sql(_IN_FLIGHT).scalar_one())
            room = min(limit, max_in_flight - in_flight)
            out = _move(conn, now, until, room, lease_until) if room > 0 else []
            next_due = conn.exec_driver_sql(_NEXT_DUE).scalar_one()
            return MoveResult(out, in_flight, None if next_due is None else _aware(next_due))

        return self._tx.run_core(move)

    def reap_expired(self, now: datetime, limit: int, lease_s: float) -> ReapResult:
        """In-flight jobs whose lease expired: an ENQUEUED one is sent again (its
        message was lost, or no worker is consuming); a RUNNING one lost its worker: the
        attempt counts as failed (``LEASE_EXPIRED``) and the job is sent again, or made
        DEAD when its retries are used up.

        Re-sends of a job no worker claims get leases of 2, 4, then 8 times ``lease_s``,
        so a queue without consumers is not flooded with duplicates."""

        def reap(session: Session) -> ReapResult:
            rows = session.scalars(
                select(JobRow)
                .where(JobRow.lease_until < now)
                .order_by(JobRow.lease_until)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            resend: list[Dispatch] = []
            dead = lost_enqueued = lost_running = 0
            for row in rows:
                factor = 1
                if row.state == _RUNNING:
                    lost_running += 1
                    row.last_error_code = LEASE_EXPIRED
                    row.last_error_message = (
                        f"no result from worker {row.worker or '?'} before the lease expired"
                    )
                    if row.attempts > row.max_retries:
                        dead += 1
                        row.state = JobState.DEAD.name
                        row.lease_until = None
                        row.finished_at = now
                        row.updated_at = now
                        continue
                    row.resends = 0
                else:
                    lost_enqueued += 1
                    row.resends += 1
                    factor = 2 ** min(row.resends, _MAX_RESEND_DOUBLINGS)
                resend.append(_dispatch(row, row.lease_until or now))
                row.state = _ENQUEUED
                row.lease_until = now + timedelta(seconds=lease_s * factor)
                row.dispatches += 1
                row.updated_at = now
            return ReapResult(resend, dead, lost_enqueued, lost_running)

        return self._tx.run(reap)

    def in_flight_count(self) -> int:
        """Jobs ENQUEUED or RUNNING."""

        def count(session: Session) -> int:
            q = select(func.count()).select_from(JobRow).where(JobRow.lease_until.is_not(None))
            return int(session.execute(q).scalar_one())

        return self._tx.run(count)

    def due_count(self, now: datetime) -> int:
        """Jobs due and not yet enqueued (the backlog)."""

        def count(session: Session) -> int:
            q = select(func.count()).select_from(JobRow).where(JobRow.due_at <= now)
            return int(session.execute(q).scalar_one())

        return self._tx.run(count)

    def count_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (tests, tools; scans the state index)."""

        def count(session: Session) -> dict[JobState, int]:
            q = select(JobRow.state, func.count()).group_by(JobRow.state)
            return {JobState[s]: int(n) for s, n in session.execute(q).all()}

        return self._tx.run(count)

    # -- worker -------------------------------------------------------------------------

    def claim(self, d: Dispatch, now: datetime, lease_s: float, worker: str) -> bool:
        """ENQUEUED -> RUNNING for the attempt ``d`` carries; False when the message is
        a duplicate or stale, or the job was cancelled. (One job: see :meth:`claim_many`.)"""
        grace_s = lease_s - d.attempt_deadline_ms / 1000
        return self.claim_many([d], now, grace_s, worker)[0]

    def claim_many(
        self, ds: Sequence[Dispatch], now: datetime, lease_grace_s: float, worker: str
    ) -> list[bool]:
        """Claims a message's jobs in one transaction (three round trips whatever their
        number): each job whose row is still ENQUEUED for the attempt its dispatch
        carries becomes RUNNING with a lease of its attempt deadline plus
        ``lease_grace_s``. Returns, per dispatch, whether it was claimed (a duplicate,
        stale or cancelled one is not; a job listed twice is claimed once)."""
        if not ds:
            return []
        ids = sorted({d.job_id for d in ds})

        def run(conn: Connection) -> list[bool]:
            rows = {r[0]: r for r in conn.exec_driver_sql(_LOCK_CLAIM.format(ids=_ids(ids))).all()}
            won: list[bool] = []
            chosen: set[int] = set()
            for d in ds:
                r = rows.get(d.job_id)
                ok = (
                    r is not None
                    and d.job_id not in chosen
                    and r[1] == _ENQUEUED
                    and r[2] == d.attempt - 1
                    and r[3] == d.run_attempt - 1
                )
                if ok:
                    chosen.add(d.job_id)
                won.append(ok)
            if chosen:
                at = _naive(now)
                grace_us = int(lease_grace_s * 1_000_000)
                conn.exec_driver_sql(
                    _CLAIM.format(ids=_ids(sorted(chosen))), (at, grace_us, worker[:255], at)
                )
            return won

        return self._tx.run_core(run)

    def record_success(self, d: Dispatch, now: datetime) -> bool:
        """-> SUCCEEDED. Also accepted late (the lease was reaped and the job sent
        again but not finished): the effect happened, no need to call again."""
        return self.record_results([d], [], now)[0][0]

    def record_failure(
        self, d: Dispatch, now: datetime, outcome: AttemptOutcome, code: str, message: str
    ) -> bool:
        """RUNNING -> RETRY_WAIT or DEAD, only for the attempt still holding the job."""
        return self.record_results([], [Failure(d, now, outcome, code, message)], now)[1][0]

    def record_results(
        self, succeeded: Sequence[Dispatch], failed: Sequence[Failure], now: datetime
    ) -> tuple[list[bool], list[bool]]:
        """Records the results of several attempts in one transaction (group commit:
        one commit for a message's jobs). A success is recorded while the job is in
        flight or waiting for a retry and its attempt is not older than the row's (a
        late success is never thrown away); a failure only while the attempt still
        holds the job (RUNNING). Returns, per success and per failure, whether it was
        recorded."""
        ids = sorted({d.job_id for d in succeeded} | {f.dispatch.job_id for f in failed})
        if not ids:
            return [], []

        def run(conn: Connection) -> tuple[list[bool], list[bool]]:
            rows = {r[0]: r for r in conn.exec_driver_sql(_LOCK_RESULT.format(ids=_ids(ids))).all()}
            done: set[int] = set()
            ok_s: list[bool] = []
            for d in succeeded:
                r = rows.get(d.job_id)
                ok = (
                    r is not None
                    and d.job_id not in done
                    and r[1] in _SUCCEEDABLE
                    and r[2] >= d.attempt
                )
                if ok:
                    done.add(d.job_id)
                ok_s.append(ok)
            if done:
                at = _naive(now)
                conn.exec_driver_sql(_SUCCEED.format(ids=_ids(sorted(done))), (at, at))
            ok_f: list[bool] = []
            for f in failed:
                d = f.dispatch
                r = rows.get(d.job_id)
                ok = (
                    r is not None
                    and d.job_id not in done
                    and r[1] == _RUNNING
                    and r[2] == d.attempt
                )
                if ok:
                    done.add(d.job_id)
                    conn.execute(_fail_statement(f))
                ok_f.append(ok)
            return ok_s, ok_f

        return self._tx.run_core(run)
