"""Offer timeouts and revisit wake-ups through the scheduler service.

Used when ``scheduler_target`` is set. After an offer commits, :class:`SchedulerOfferTimeouts`
schedules the job ``assignment.expire-offer`` at the offer's deadline, calling this
service's own ``ExpireOffer`` (at ``self_target``) with the key
``expire-offer-<task>-<offer_event_id>``; after a revisit commits, the job
``assignment.wake-revisit`` at its due time, calling ``WakeRevisit`` (key
``wake-revisit-<task>``). Both handlers are idempotent (a repeated or stale call is a no-op
answering OK), so the scheduler's at-least-once delivery is safe.

Scheduling happens in the background (the offer stream does not wait for it). When it
fails (the scheduler is down or slow) a warning is logged and nothing more: the
:class:`~crm_assignment.clients.timeouts.LocalRecycleLoop` keeps running as a *safety
sweep* every ``recycle_safety_sweep_s`` (instead of every ``recycle_poll_s``), recycling
whatever expired offer the scheduler did not, and the offer streams' own
``dispatch_poll_s`` poll finds due revisits. Nothing is lost while the scheduler is down;
expiry is only later (up to the sweep interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import grpc
from crm.assignment.v1 import assignment_pb2 as pb
from crm_scheduler.client import SchedulerClient

from crm_assignment.clients.timeouts import LocalRecycleLoop

__all__ = [
    "EXPIRE_OFFER_JOB",
    "EXPIRE_OFFER_METHOD",
    "WAKE_REVISIT_JOB",
    "WAKE_REVISIT_METHOD",
    "SchedulerOfferTimeouts",
    "expire_offer_key",
    "wake_revisit_key",
]

log = logging.getLogger("crm.assignment.scheduler_timeouts")

_SERVICE = pb.DESCRIPTOR.services_by_name["AssignmentService"].full_name
EXPIRE_OFFER_JOB = "assignment.expire-offer"
WAKE_REVISIT_JOB = "assignment.wake-revisit"
EXPIRE_OFFER_METHOD = f"/{_SERVICE}/ExpireOffer"
WAKE_REVISIT_METHOD = f"/{_SERVICE}/WakeRevisit"
MAX_RETRIES = 10


def expire_offer_key(task_id: int, offer_event_id: int) -> str:
    """Idempotency key of the timeout job of one offer."""
    return f"expire-offer-{task_id}-{offer_event_id}"


def wake_revisit_key(task_id: int) -> str:
    """Idempotency key of the wake-up job of one revisit task."""
    return f"wake-revisit-{task_id}"


class SchedulerOfferTimeouts:
    """:class:`~crm_assignment.clients.timeouts.OfferTimeouts` backed by scheduler jobs,
    with ``sweep`` (a slow :class:`LocalRecycleLoop`) as the safety net (see module)."""

    def __init__(
        self,
        client: SchedulerClient,
        self_target: Callable[[], str],
        sweep: LocalRecycleLoop,
        *,
        max_retries: int = MAX_RETRIES,
    ) -> None:
        self._client = client
        self._self_target = self_target
        self.sweep = sweep
        self._max_retries = max_retries
        self._pending: set[asyncio.Task[None]] = set()
        self.scheduled_total = 0
        self.failed_total = 0

    async def start(self) -> None:
        await self.sweep.start()

    async def stop(self) -> None:
        pending, self._pending = list(self._pending), set()
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.sweep.stop()
        await self._client.aclose()

    def offer_made(self, task_id: int, offer_event_id: int, deadline: datetime) -> None:
        if offer_event_id <= 0:  # not a fresh offer: nothing to name the job by
            return
        self._spawn(
            self._schedule(
                EXPIRE_OFFER_JOB,
                EXPIRE_OFFER_METHOD,
                pb.ExpireOfferRequest(task_id=task_id, offer_event_id=offer_event_id),
                deadline,
                expire_offer_key(task_id, offer_event_id),
            )
        )

    def revisit_created(self, task_id: int, due_at: datetime) -> None:
        self._spawn(
            self._schedule(
                WAKE_REVISIT_JOB,
                WAKE_REVISIT_METHOD,
                pb.WakeRevisitRequest(task_id=task_id),
                due_at,
                wake_revisit_key(task_id),
            )
        )

    async def drain(self) -> None:
        """Wait until the scheduling calls started so far are done (tests)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _schedule(
        self, name: str, method: str, request: Any, eta: datetime, key: str
    ) -> None:
        try:
            await self._client.schedule(
                name,
                method=method,
                address=self._self_target(),
                request=request,
                eta=eta,
                idempotency_key=key,
                max_retries=self._max_retries,
            )
        except asyncio.CancelledError:
            raise
        except (grpc.aio.AioRpcError, ValueError, RuntimeError) as exc:
            self.failed_total += 1
            detail = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            log.warning(
                "scheduling %s failed (%s): the safety sweep covers it",
                name,
                detail,
                extra={"idempotency_key": key},
            )
            return
        self.scheduled_total += 1
