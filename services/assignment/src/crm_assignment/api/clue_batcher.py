"""``ClueBatcher``: concurrent CreateClue calls written in one transaction per batch.

A CreateClue costs a handful of statements whose Python side (SQLAlchemy, PyMySQL) is
most of the work; done one transaction per call, the server saturates its CPU early. The
batcher queues validated clues and a single drain task writes whatever is queued, up to
``max_batch``, in one transaction (``AssignmentStore.create_clues``: group commit, see
``group_commit``). (``concurrency`` > 1 writes that many batches at once, like replicas
would; on a CPU-bound 2-core host it measured no better than 1.)

Each caller gets its own result or error (the store answers per request and falls back to
one transaction per request when a batch fails). A caller cancelled while queued is dropped
if its batch has not started yet; once started, its clue may still be written (a retry with
the same key replays it). Every future is resolved: on shutdown, queued calls get
UNAVAILABLE.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from crm_common.aio import BlockingExecutor

from crm_assignment.api.group_commit import GroupCommit
from crm_assignment.config import LineConfig
from crm_assignment.domain.model import ClueResult, NewClue
from crm_assignment.store.repository import ClueRequest

__all__ = ["ClueBatcher", "ClueWriter"]


class ClueWriter(Protocol):
    def create_clues(self, requests: list[ClueRequest], /) -> list[ClueResult | Exception]: ...


class ClueBatcher(GroupCommit[ClueRequest, ClueResult]):
    """Group commit of CreateClue (see module doc). Use from one event loop."""

    def __init__(
        self,
        store: ClueWriter,
        executor: BlockingExecutor,
        max_batch: int = 64,
        concurrency: int = 1,
    ) -> None:
        super().__init__(executor, max_batch, concurrency, name="clue-batcher")
        self._store = store

    def _job(self, requests: list[ClueRequest]) -> Callable[[], Sequence[ClueResult | Exception]]:
        return functools.partial(self._store.create_clues, requests)

    async def submit(self, clue: NewClue, now: datetime, cfg: LineConfig) -> ClueResult:
        """Record ``clue`` (in the next batch) and return its result, or raise its error."""
        return await self._submit((clue, now, cfg))
