"""Offer timeouts: who recycles an offer that was not accepted before its deadline, and
who wakes the offer streams when a revisit becomes due.

:class:`OfferTimeouts` is the small interface the service depends on, told of every offer
(``offer_made``) and every revisit (``revisit_created``) once committed. Two
implementations:

- :class:`LocalRecycleLoop` (``scheduler_target`` empty, the development default): a
  poller inside each replica (``store.recycle_expired`` every ``recycle_poll_s``; replicas
  do not collide thanks to ``FOR UPDATE SKIP LOCKED``); revisits are found by the offer
  streams' own ``dispatch_poll_s`` poll;
- ``SchedulerOfferTimeouts`` (``clients/scheduler_timeouts.py``): a scheduler job per offer
  calling ``ExpireOffer`` at the deadline and one per revisit calling ``WakeRevisit``
  when due, with this loop kept as a slow safety sweep (``recycle_safety_sweep_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from crm_common.aio import BlockingExecutor

from crm_assignment.domain.model import Clock, Task
from crm_assignment.store import AssignmentStore

__all__ = ["LocalRecycleLoop", "OfferTimeouts"]

log = logging.getLogger("crm.assignment.timeouts")


class OfferTimeouts(Protocol):
    """Recycles offers past their accept deadline."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def offer_made(self, task_id: int, offer_event_id: int, deadline: datetime) -> None:
        """An offer was committed (a scheduler-backed implementation schedules its
        timeout); ``offer_event_id`` is the id of its OFFERED task event."""

    def revisit_created(self, task_id: int, due_at: datetime) -> None:
        """A revisit task was committed, due at ``due_at`` (a scheduler-backed
        implementation schedules the wake-up of the offer streams then)."""


class LocalRecycleLoop:
    """Polls the store for expired offers every ``poll_s`` seconds (see module)."""

    def __init__(
        self,
        store: AssignmentStore,
        executor: BlockingExecutor,
        clock: Clock,
        poll_s: float,
        on_recycled: Callable[[list[Task]], None],
        batch: int = 200,
    ) -> None:
        self._store = store
        self._executor = executor
        self._clock = clock
        self._poll_s = poll_s
        self._on_recycled = on_recycled
        self._batch = batch
        self._task: asyncio.Task[None] | None = None
        self.recycled_total = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="crm-assignment-recycle")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def offer_made(self, task_id: int, offer_event_id: int, deadline: datetime) -> None:
        """Nothing to do: the poll finds every expired offer."""

    def revisit_created(self, task_id: int, due_at: datetime) -> None:
        """Nothing to do: the offer streams' poll finds due revisits."""

    async def run_once(self) -> list[Task]:
        """Recycle what is expired now (until a batch comes back short)."""
        done: list[Task] = []
        while True:
            recycled = await self._executor.run(
                self._store.recycle_expired, self._clock(), self._batch
            )
            done.extend(recycled)
            if recycled:
                self.recycled_total += len(recycled)
                self._on_recycled(recycled)
            if len(recycled) < self._batch:
                return done

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be down: keep polling
                log.warning("recycling expired offers failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self._poll_s)
