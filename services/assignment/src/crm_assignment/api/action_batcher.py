"""``ActionBatcher``: concurrent AcceptTask / CompleteTask / FailTask calls written in one
transaction per batch (group commit, like ``ClueBatcher`` for CreateClue).

Each of these calls is a row lock, an UPDATE and an audit INSERT: done one transaction
each, the fixed cost of a transaction (its commit and its Python side) dominates. The
batcher queues validated actions and a single drain task writes whatever is queued, up to
``max_batch``, in one transaction (``AssignmentStore.task_actions``): the tasks are locked in
id order, every action is checked by the domain rules in arrival order, the changes go out
as one UPDATE per resulting status and one multi-row INSERT of the audit rows. No
artificial delay: at low load a batch holds one action. Each caller gets its own result or
its own error (FAILED_PRECONDITION, NOT_FOUND); a batch that fails as a whole is retried
action by action, so one bad action never fails the others.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from crm_common.aio import BlockingExecutor
from crm_common.errors import Unavailable

from crm_assignment.domain.model import Task
from crm_assignment.store.repository import TaskAction

__all__ = ["ActionBatcher", "ActionWriter"]

log = logging.getLogger("crm.assignment.api")


class ActionWriter(Protocol):
    def task_actions(self, actions: list[TaskAction], /) -> list[Task | Exception]: ...


@dataclass(slots=True)
class _Pending:
    action: TaskAction
    future: asyncio.Future[Task]


class ActionBatcher:
    """Group commit of task actions (see module doc). Use from one event loop."""

    def __init__(self, store: ActionWriter, executor: BlockingExecutor, max_batch: int = 64):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._store = store
        self._run = executor.run
        self.max_batch = max_batch
        self._queue: deque[_Pending] = deque()
        self._lane: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0
        """Batches written so far (tests, benchmarks)."""

    async def submit(self, action: TaskAction) -> Task:
        """Apply ``action`` (in the next batch); return the task after it, or raise."""
        if self._closed:
            raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
        future: asyncio.Future[Task] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(action, future))
        if self._lane is None or self._lane.done():
            # Own (empty) context: a batch is nobody's request in particular.
            self._lane = asyncio.create_task(
                self._drain(), name="action-batcher", context=contextvars.Context()
            )
        return await future

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        while self._queue and len(batch) < self.max_batch:
            p = self._queue.popleft()
            if not p.future.done():  # a caller cancelled meanwhile is dropped
                batch.append(p)
        return batch

    async def _drain(self) -> None:
        batch: list[_Pending] = []
        try:
            while self._queue:
                batch = self._take()
                if not batch:
                    continue
                try:
                    outcomes = await self._run(self._store.task_actions, [p.action for p in batch])
                except Exception as exc:  # the executor itself failed (shut down, ...)
                    log.warning("task action batch could not run", exc_info=True)
                    outcomes = [exc] * len(batch)
                self.batches += 1
                for p, outcome in zip(batch, outcomes, strict=True):
                    if p.future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        p.future.set_exception(outcome)
                    else:
                        p.future.set_result(outcome)
                batch = []
        finally:
            stranded = [*batch, *self._queue]
            self._queue.clear()
            for p in stranded:
                if not p.future.done():
                    p.future.set_exception(
                        Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
                    )

    async def aclose(self) -> None:
        """Refuse new calls; wait until the queued ones are written."""
        self._closed = True
        lane = self._lane
        if lane is not None and not lane.done():
            try:
                await lane
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise
