"""``SchedulerStore``: every read and write of the ``job`` table (blocking; callers run
it in a :class:`~crm_common.aio.BlockingExecutor` or a worker thread).

Concurrency contract (what makes a job run once per claim and never get lost):

- the pump moves due rows (``due_at <= now``) to ENQUEUED with a lease in one
  transaction (``FOR UPDATE SKIP LOCKED``: pumps never collide), *then* sends them;
- a worker claims with one conditional UPDATE (``state = ENQUEUED`` and the attempt
  counters the message carries): a duplicate or stale delivery, or a job cancelled in
  between, updates nothing and is dropped;
- results are recorded with conditional UPDATEs too (a late result of an attempt
  whose lease was reaped is ignored, except a success, which is never thrown away);
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
    CursorResult,
    Engine,
    Executable,
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
)
from crm_scheduler.domain.retry import LEASE_EXPIRED, AttemptOutcome
from crm_scheduler.store.group_commit import GroupCommitter
from crm_scheduler.store.schema import JobRow

__all__ = ["ReapResult", "SchedulerStore"]

log = logging.getLogger("crm.scheduler.store")

_ENQUEUED = JobState.ENQUEUED.name
_RUNNING = JobState.RUNNING.name
_MAX_ERROR_CHARS = 1000
_MAX_RESEND_DOUBLINGS = 3

# The workers' hot path as plain SQL (two statements per job; no ORM overhead).
_CLAIM = text(
    "UPDATE job SET state = 'RUNNING', attempts = :run_attempt, total_attempts = :attempt,"
    " lease_until = :lease_until, worker = :worker, resends = 0, updated_at = :now"
    " WHERE id = :id AND state = 'ENQUEUED' AND total_attempts = :attempt - 1"
    " AND attempts = :run_attempt - 1"
)
_SUCCEED = text(
    "UPDATE job SET state = 'SUCCEEDED', due_at = NULL, lease_until = NULL,"
    " finished_at = :now, updated_at = :now"
    " WHERE id = :id AND state IN ('RUNNING', 'ENQUEUED', 'RETRY_WAIT')"
    " AND total_attempts >= :attempt"
)


def _naive(at: datetime) -> datetime:
    """Aware -> naive UTC, for plain SQL parameters (the ORM type does it elsewhere)."""
    return at.astimezone(UTC).replace(tzinfo=None)


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
)


def _spec_values(spec: JobSpec, now: datetime) -> dict[str, object]:
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
    }


def _ref_clause(ref: JobRef) -> ColumnElement[bool]:
    if ref.uid:
        return JobRow.uid == ref.uid
    return JobRow.idempotency_key == ref.idempotency_key


def _clip(message: str) -> str:
    return message if len(message) <= _MAX_ERROR_CHARS else message[: _MAX_ERROR_CHARS - 3] + "..."


class SchedulerStore:
    """The job table (see the module doc for the concurrency contract)."""

    def __init__(self, engine: Engine, *, group_commit: bool = False) -> None:
        self.engine = engine
        self._tx = TransactionRunner(engine)
        self._group = GroupCommitter(engine) if group_commit else None

    def close(self) -> None:
        """Stops the group committer (if any) and closes the engine's connections."""
        if self._group is not None:
            self._group.close()
        self.engine.dispose()

    def ping(self) -> None:
        """``SELECT 1`` (readiness)."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # -- API ----------------------------------------------------------------------------

    def schedule(self, spec: JobSpec, now: datetime) -> tuple[Job, bool]:
        """Creates the job, or returns the existing one with the same key and spec
        (``created`` False); AlreadyExists when the key exists with another spec."""

        def create(session: Session) -> Job:
            session.execute(insert(JobRow).values(_spec_values(spec, now)))
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
            session.execute(insert(JobRow), [_spec_values(s, now) for s in specs])
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
        lease_until = now + timedelta(seconds=lease_s)

        def move(session: Session) -> list[Dispatch]:
            rows = session.execute(
                select(*_DISPATCH_COLUMNS)
                .where(JobRow.due_at <= now)
                .order_by(JobRow.due_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return []  # (plain rows: no ORM objects on the pump's hot path)
            out = [_dispatch(r, r.due_at or now) for r in rows]
            session.execute(
                update(JobRow)
                .where(JobRow.id.in_([r.id for r in rows]))
                .values(
                    state=_ENQUEUED,
                    due_at=None,
                    lease_until=lease_until,
                    dispatches=JobRow.dispatches + 1,
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            return out

        return self._tx.run(move)

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
        a duplicate or stale, or the job was cancelled."""
        return self._update_one(
            d.job_id,
            _CLAIM,
            {
                "id": d.job_id,
                "attempt": d.attempt,
                "run_attempt": d.run_attempt,
                "lease_until": _naive(now + timedelta(seconds=lease_s)),
                "worker": worker[:255],
                "now": _naive(now),
            },
        )

    def record_success(self, d: Dispatch, now: datetime) -> bool:
        """-> SUCCEEDED. Also accepted late (the lease was reaped and the job sent
        again but not finished): the effect happened, no need to call again."""
        return self._update_one(
            d.job_id, _SUCCEED, {"id": d.job_id, "attempt": d.attempt, "now": _naive(now)}
        )

    def record_failure(
        self, d: Dispatch, now: datetime, outcome: AttemptOutcome, code: str, message: str
    ) -> bool:
        """RUNNING -> RETRY_WAIT or DEAD, only for the attempt still holding the job."""
        dead = outcome.state is JobState.DEAD
        stmt = (
            update(JobRow)
            .where(
                JobRow.id == d.job_id,
                JobRow.state == _RUNNING,
                JobRow.total_attempts == d.attempt,
            )
            .values(
                state=outcome.state.name,
                due_at=outcome.due_at,
                lease_until=None,
                last_error_code=code[:32],
                last_error_message=_clip(message),
                finished_at=now if dead else None,
                updated_at=now,
            )
        )
        return self._update_one(d.job_id, stmt)

    def _update_one(
        self, job_id: int, stmt: Executable, params: dict[str, object] | None = None
    ) -> bool:
        """One conditional UPDATE of one row, committed (in a shared batch with group
        commit); True when it updated the row."""
        if self._group is not None:
            return self._group.execute(job_id, stmt, params)

        def run(session: Session) -> bool:
            result = session.execute(stmt, params)
            return isinstance(result, CursorResult) and result.rowcount == 1

        return self._tx.run(run)
