"""``ActionBatcher``: concurrent AcceptTask / CompleteTask / FailTask calls written in one
transaction per batch (group commit, see ``group_commit``).

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

import functools
from collections.abc import Callable, Sequence
from typing import Protocol

from crm_common.aio import BlockingExecutor

from crm_assignment.api.group_commit import GroupCommit
from crm_assignment.domain.model import Task
from crm_assignment.store.repository import TaskAction

__all__ = ["ActionBatcher", "ActionWriter"]


class ActionWriter(Protocol):
    def task_actions(self, actions: list[TaskAction], /) -> list[Task | Exception]: ...


class ActionBatcher(GroupCommit[TaskAction, Task]):
    """Group commit of task actions (see module doc). Use from one event loop."""

    def __init__(self, store: ActionWriter, executor: BlockingExecutor, max_batch: int = 64):
        super().__init__(executor, max_batch, name="action-batcher")
        self._store = store

    def _job(self, requests: list[TaskAction]) -> Callable[[], Sequence[Task | Exception]]:
        return functools.partial(self._store.task_actions, requests)

    async def submit(self, action: TaskAction) -> Task:
        """Apply ``action`` (in the next batch); return the task after it, or raise."""
        return await self._submit(action)
