"""Domain -> proto."""

from __future__ import annotations

from datetime import datetime

from crm.scheduler.v1 import scheduler_pb2 as pb
from google.protobuf import duration_pb2, timestamp_pb2

from crm_scheduler.domain.model import WAITING, Job

__all__ = ["job_to_pb"]


def _ts(at: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


def _dur(ms: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(ms)
    return d


def job_to_pb(job: Job) -> pb.Job:
    msg = pb.Job(
        id=job.uid,
        name=job.name,
        idempotency_key=job.idempotency_key,
        target=pb.Target(
            method=job.target.method, address=job.target.address, request=job.target.request
        ),
        eta=_ts(job.eta),
        state=int(job.state),  # type: ignore[arg-type]  # JobState values are the proto's
        attempts=job.attempts,
        max_retries=job.max_retries,
        backoff=pb.Backoff(initial=_dur(job.backoff_initial_ms), max=_dur(job.backoff_max_ms)),
        attempt_deadline=_dur(job.attempt_deadline_ms),
        last_error_code=job.last_error_code or "",
        last_error_message=job.last_error_message or "",
        create_time=_ts(job.created_at),
        update_time=_ts(job.updated_at),
        total_attempts=job.total_attempts,
        reruns=job.reruns,
    )
    if job.state in WAITING and job.due_at is not None:
        msg.next_run_time.CopyFrom(_ts(job.due_at))
    if job.finished_at is not None:
        msg.finish_time.CopyFrom(_ts(job.finished_at))
    return msg
