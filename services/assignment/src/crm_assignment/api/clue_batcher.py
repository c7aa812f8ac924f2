"""``ClueBatcher``: concurrent CreateClue calls written in one transaction per batch.

A CreateClue costs a handful of statements whose Python side (SQLAlchemy, PyMySQL) is
most of the work; done one transaction per call, the server saturates its CPU early. The
batcher queues validated clues and a single drain task writes whatever is queued, up to
``max_batch``, in one transaction (``AssignmentStore.create_clues``: group commit). There is
no artificial delay: a call arriving when nothing is being written starts a batch at once,
so latency at low load is unchanged; under load the next batch takes everything that
arrived while the previous one was written. (``concurrency`` > 1 writes that many batches at
once, like replicas would; on a CPU-bound 2-core host it measured no better than 1.)

Each caller gets its own result or error (the store answers per request and falls back to
one transaction per request when a batch fails). A caller cancelled while queued is dropped
if its batch has not started yet; once started, its clue may still be written (a retry with
the same key replays it). Every future is resolved: on shutdown, queued calls get
UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from crm_common.aio import BlockingExecutor
from crm_common.errors import Unavailable

from crm_assignment.config import LineConfig
from crm_assignment.domain.model import ClueResult, NewClue
from crm_assignment.store.repository import ClueRequest

__all__ = ["ClueBatcher", "ClueWriter"]

log = logging.getLogger("crm.assignment.api")


class ClueWriter(Protocol):
    def create_clues(self, requests: list[ClueRequest], /) -> list[ClueResult | Exception]: ...


@dataclass(slots=True)
class _Pending:
    clue: NewClue
    now: datetime
    cfg: LineConfig
    future: asyncio.Future[ClueResult]


class ClueBatcher:
    """Group commit of CreateClue (see module doc). Use from one event loop."""

    def __init__(
        self,
        store: ClueWriter,
        executor: BlockingExecutor,
        max_batch: int = 64,
        concurrency: int = 1,
    ) -> None:
        if max_batch < 1 or concurrency < 1:
            raise ValueError("max_batch and concurrency must be >= 1")
        self._store = store
        self._run = executor.run
        self.max_batch = max_batch
        self.concurrency = concurrency
        self._queue: deque[_Pending] = deque()
        self._lanes: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0
        """Batches written so far (tests, debugging)."""

    def __len__(self) -> int:
        return len(self._queue)

    async def submit(self, clue: NewClue, now: datetime, cfg: LineConfig) -> ClueResult:
        """Record ``clue`` (in the next batch) and return its result, or raise its error."""
        if self._closed:
            raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
        future: asyncio.Future[ClueResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(clue, now, cfg, future))
        if len(self._lanes) < self.concurrency:
            # Own (empty) context: a batch is nobody's request in particular.
            lane = asyncio.create_task(
                self._drain(), name="clue-batcher", context=contextvars.Context()
            )
            self._lanes.add(lane)
            lane.add_done_callback(self._lanes.discard)
        return await future

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        while self._queue and len(batch) < self.max_batch:
            p = self._queue.popleft()
            if not p.future.done():  # a caller cancelled meanwhile is dropped
                batch.append(p)
        return batch

    async def _drain(self) -> None:
        """One lane: writes batches while calls are queued (``concurrency`` lanes at most)."""
        batch: list[_Pending] = []
        try:
            while self._queue:
                batch = self._take()
                if not batch:
                    continue
                requests = [(p.clue, p.now, p.cfg) for p in batch]
                try:
                    outcomes = await self._run(self._store.create_clues, requests)
                except Exception as exc:  # the executor itself failed (shut down, ...)
                    log.warning("clue batch could not run", exc_info=True)
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
            # Cancelled (loop shutting down): no caller is left waiting forever. (The batch
            # being written may still commit in its thread: a retry replays it.)
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
        while self._lanes:
            try:
                await asyncio.gather(*self._lanes)
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise
