"""Typed async client of the scheduler, and helpers for the services it calls.

Scheduling (e.g. the assignment service's offer timeout)::

    scheduler = SchedulerClient.connect("crm-scheduler:50053")
    job = await scheduler.schedule(
        "recycle-offer",
        method="/crm.assignment.v1.AssignmentService/RecycleOffer",
        address="crm-assignment:50051",
        request=RecycleOfferRequest(task_id=42, offer_id=7),
        eta=offer.deadline,
        idempotency_key=f"recycle-offer/{offer.id}",   # default: name@ETA
    )
    ...
    await scheduler.try_cancel(idempotency_key=f"recycle-offer/{offer.id}")  # accepted

Scheduling the same key again returns the same job (safe to retry on UNAVAILABLE or
DEADLINE_EXCEEDED); the same key with a different spec is ALREADY_EXISTS.

Being a target. Jobs are delivered at least once: a worker may die after the call took
effect, and the job then runs again. Every call carries the metadata
``x-idempotency-key`` (the job's key), ``x-attempt`` (1, 2, ...) and
``x-scheduler-job-id``. A handler must apply its effect once per key, e.g. in the same
transaction as the effect::

    call = target_call(context)            # TargetCall(key, attempt, job_id)
    INSERT INTO applied_job (idempotency_key) VALUES (:key)  -- unique; duplicate => done
    ... the effect ...
    COMMIT                                 -- then answer OK

A repeated key must answer OK (not ALREADY_EXISTS, which is final and makes the job
DEAD). Answer UNAVAILABLE / ABORTED / RESOURCE_EXHAUSTED for "try later" (retried with
backoff), and INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION for "never" (DEAD at
once). Keep the handler within the job's ``attempt_deadline``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import grpc
from crm.scheduler.v1 import scheduler_pb2 as pb
from crm.scheduler.v1 import scheduler_pb2_grpc
from crm_common.interceptors import insecure_channel
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from crm_scheduler.worker.runner import ATTEMPT_KEY, IDEMPOTENCY_KEY, JOB_ID_KEY

__all__ = [
    "ATTEMPT_KEY",
    "IDEMPOTENCY_KEY",
    "JOB_ID_KEY",
    "ScheduleResult",
    "SchedulerClient",
    "TargetCall",
    "target_call",
]

DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class ScheduleResult:
    """The job and whether this call created it (False: the key existed)."""

    job: pb.Job
    created: bool


def _duration(d: timedelta) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(d)
    return out


def _timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    if at.tzinfo is None:
        raise ValueError("eta must be timezone-aware")
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(at)
    return out


class SchedulerClient:
    """Async client of ``crm.scheduler.v1.SchedulerService``; every call has a deadline
    (``timeout``, default ``default_timeout`` seconds). Errors are ``grpc.aio.AioRpcError``
    (read field violations with ``crm_common.errors.field_violations``)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        default_timeout: float = DEFAULT_TIMEOUT_S,
        owns_channel: bool = False,
    ) -> None:
        self._channel = channel
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        self._timeout = default_timeout
        self._owns_channel = owns_channel

    @classmethod
    def connect(cls, target: str, *, default_timeout: float = DEFAULT_TIMEOUT_S) -> SchedulerClient:
        """A client with a channel of its own (request ids propagate); ``aclose`` it."""
        return cls(insecure_channel(target), default_timeout=default_timeout, owns_channel=True)

    async def aclose(self) -> None:
        if self._owns_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> SchedulerClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    def _deadline(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else timeout

    async def schedule(
        self,
        name: str,
        *,
        method: str,
        address: str,
        request: Message | bytes,
        eta: datetime | None = None,
        delay: timedelta | None = None,
        idempotency_key: str = "",
        max_retries: int | None = None,
        backoff_initial: timedelta | None = None,
        backoff_max: timedelta | None = None,
        attempt_deadline: timedelta | None = None,
        timeout: float | None = None,
    ) -> ScheduleResult:
        """Schedules a job at ``eta`` or after ``delay`` (exactly one)."""
        if (eta is None) == (delay is None):
            raise ValueError("pass exactly one of eta and delay")
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        req = pb.ScheduleRequest(
            name=name,
            target=pb.Target(method=method, address=address, request=payload),
            idempotency_key=idempotency_key,
        )
        if eta is not None:
            req.eta.CopyFrom(_timestamp(eta))
        if delay is not None:
            req.delay.CopyFrom(_duration(delay))
        if max_retries is not None:
            req.max_retries = max_retries
        if backoff_initial is not None:
            req.backoff.initial.CopyFrom(_duration(backoff_initial))
        if backoff_max is not None:
            req.backoff.max.CopyFrom(_duration(backoff_max))
        if attempt_deadline is not None:
            req.attempt_deadline.CopyFrom(_duration(attempt_deadline))
        resp = await self._stub.Schedule(req, timeout=self._deadline(timeout))
        return ScheduleResult(job=resp.job, created=resp.created)

    async def cancel(
        self, *, job_id: str = "", idempotency_key: str = "", timeout: float | None = None
    ) -> pb.Job:
        """Cancels a job that has not started; FAILED_PRECONDITION when it is running
        or finished, NOT_FOUND when unknown."""
        resp = await self._stub.Cancel(
            pb.CancelRequest(id=job_id, idempotency_key=idempotency_key),
            timeout=self._deadline(timeout),
        )
        return resp.job

    async def try_cancel(
        self, *, job_id: str = "", idempotency_key: str = "", timeout: float | None = None
    ) -> bool:
        """Like :meth:`cancel`, but answers False instead of raising when the job is
        running, finished or unknown (it will run, or has run, or never existed)."""
        try:
            await self.cancel(job_id=job_id, idempotency_key=idempotency_key, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                return False
            raise
        return True

    async def get(
        self, *, job_id: str = "", idempotency_key: str = "", timeout: float | None = None
    ) -> pb.Job:
        resp = await self._stub.Get(
            pb.GetRequest(id=job_id, idempotency_key=idempotency_key),
            timeout=self._deadline(timeout),
        )
        return resp.job

    async def rerun(
        self, *, job_id: str = "", idempotency_key: str = "", timeout: float | None = None
    ) -> pb.Job:
        resp = await self._stub.Rerun(
            pb.RerunRequest(id=job_id, idempotency_key=idempotency_key),
            timeout=self._deadline(timeout),
        )
        return resp.job


@dataclass(frozen=True, slots=True)
class TargetCall:
    """What a scheduled call carries in its metadata."""

    idempotency_key: str
    attempt: int
    job_id: str


def target_call(context: Any) -> TargetCall | None:
    """The scheduler metadata of the call being handled (a sync or aio servicer
    context), or None when the call does not come from the scheduler."""
    metadata: Iterable[tuple[str, Any]] = context.invocation_metadata() or ()
    found = {k: v for k, v in metadata if k in (IDEMPOTENCY_KEY, ATTEMPT_KEY, JOB_ID_KEY)}
    key = found.get(IDEMPOTENCY_KEY)
    if not isinstance(key, str):
        return None
    attempt = found.get(ATTEMPT_KEY, "0")
    return TargetCall(
        idempotency_key=key,
        attempt=int(attempt) if isinstance(attempt, str) and attempt.isdigit() else 0,
        job_id=str(found.get(JOB_ID_KEY, "")),
    )
