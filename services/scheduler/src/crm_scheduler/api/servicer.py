"""``SchedulerService`` servicer: validate, run the store in the executor, convert."""

from __future__ import annotations

import logging
from typing import Any

from crm.common.v1 import common_pb2
from crm.scheduler.v1 import scheduler_pb2 as pb
from crm.scheduler.v1 import scheduler_pb2_grpc
from crm_common.aio import BlockingExecutor
from crm_common.logs import request_id_var
from crm_common.tracing import carried_traceparent
from grpc import aio

from crm_scheduler.api.convert import job_to_pb
from crm_scheduler.api.validation import Limits, parse_filter, parse_ref, parse_schedule
from crm_scheduler.domain.model import Clock, TraceOrigin
from crm_scheduler.domain.paging import encode_token
from crm_scheduler.store import SchedulerStore

__all__ = ["SchedulerServicer"]

log = logging.getLogger("crm.scheduler.api")

_Context = aio.ServicerContext[Any, Any]


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Every RPC raises a CrmError on failure; the server interceptor maps it."""

    def __init__(
        self, store: SchedulerStore, executor: BlockingExecutor, clock: Clock, limits: Limits
    ) -> None:
        self._store = store
        self._executor = executor
        self._clock = clock
        self._limits = limits

    async def Schedule(self, request: pb.ScheduleRequest, context: _Context) -> pb.ScheduleResponse:
        now = self._clock()
        spec = parse_schedule(request, now, self._limits)
        # the target call will carry the caller's request id and continue its trace
        origin = TraceOrigin(
            request_id_var.get() or "",
            carried_traceparent(context.invocation_metadata()) or "",
        )
        job, created = await self._executor.run(self._store.schedule, spec, now, origin)
        if created:
            log.info(
                "job scheduled",
                extra={"job_id": job.uid, "job_name": job.name, "eta": job.eta.isoformat()},
            )
        return pb.ScheduleResponse(job=job_to_pb(job), created=created)

    async def Cancel(self, request: pb.CancelRequest, context: _Context) -> pb.CancelResponse:
        ref = parse_ref(request.id, request.idempotency_key)
        job = await self._executor.run(self._store.cancel, ref, self._clock())
        return pb.CancelResponse(job=job_to_pb(job))

    async def Get(self, request: pb.GetRequest, context: _Context) -> pb.GetResponse:
        ref = parse_ref(request.id, request.idempotency_key)
        job = await self._executor.run(self._store.get, ref)
        return pb.GetResponse(job=job_to_pb(job))

    async def List(self, request: pb.ListRequest, context: _Context) -> pb.ListResponse:
        f, after, size = parse_filter(request)
        jobs = await self._executor.run(self._store.list_jobs, f, after, size + 1)
        token = encode_token(jobs[size - 1].id, f) if len(jobs) > size else ""
        return pb.ListResponse(
            jobs=[job_to_pb(j) for j in jobs[:size]],
            page=common_pb2.PageResponse(next_page_token=token),
        )

    async def Rerun(self, request: pb.RerunRequest, context: _Context) -> pb.RerunResponse:
        ref = parse_ref(request.id, request.idempotency_key)
        job = await self._executor.run(self._store.rerun, ref, self._clock())
        log.info("job re-run", extra={"job_id": job.uid, "job_name": job.name})
        return pb.RerunResponse(job=job_to_pb(job))
