"""``GroupCommit``: concurrent requests written in one transaction per batch.

The fixed cost of a transaction (its statements' Python side in SQLAlchemy and PyMySQL,
its commit, the hop to a database thread) dominates the small writes of this service.
A group commit queues the requests and one drain task (a *lane*) writes whatever is
queued, up to ``max_batch``, with one blocking call in the executor. There is no
artificial delay: a request arriving when nothing is being written starts a batch at
once, so latency at low load is unchanged; under load the next batch takes everything
that arrived while the previous one was written. (``concurrency`` > 1 writes that many
batches at once, like replicas would.)

Each caller gets its own result or error (the writer answers per request). A caller
cancelled while queued is dropped if its batch has not started yet; once started, its
request may still be written (its result goes to :meth:`GroupCommit._unclaimed`). Every
future is resolved: when the lane is cancelled (loop shutting down), queued calls get
UNAVAILABLE.

Subclasses say how a batch is written (:meth:`GroupCommit._job`, called on the event
loop, returns the blocking call) and give ``submit`` its typed signature.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from crm_common.aio import BlockingExecutor
from crm_common.errors import Unavailable

__all__ = ["GroupCommit"]

log = logging.getLogger("crm.assignment.api")

Req = TypeVar("Req")
Res = TypeVar("Res")


@dataclass(slots=True)
class _Pending(Generic[Req, Res]):
    request: Req
    future: asyncio.Future[Res]


class GroupCommit(Generic[Req, Res]):
    """Group commit of one kind of request (see module doc). Use from one event loop."""

    def __init__(
        self,
        executor: BlockingExecutor,
        max_batch: int = 64,
        concurrency: int = 1,
        name: str = "group-commit",
    ) -> None:
        if max_batch < 1 or concurrency < 1:
            raise ValueError("max_batch and concurrency must be >= 1")
        self._run = executor.run
        self.max_batch = max_batch
        self.concurrency = concurrency
        self.name = name
        self._queue: deque[_Pending[Req, Res]] = deque()
        self._lanes: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0
        """Batches written so far (tests, benchmarks)."""

    def __len__(self) -> int:
        return len(self._queue)

    def _job(self, requests: list[Req]) -> Callable[[], Sequence[Res | Exception]]:
        """The blocking call writing ``requests`` (one outcome each, in order); called on
        the event loop when the batch starts."""
        raise NotImplementedError

    def _unclaimed(self, request: Req, result: Res) -> None:
        """``request`` was written but its caller is gone (cancelled once its batch had
        started): nobody will see ``result``. Dropped unless a subclass says otherwise
        (it must not raise)."""

    async def _submit(self, request: Req) -> Res:
        """Queue ``request`` for the next batch; return its result or raise its error."""
        if self._closed:
            raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(request, future))
        if len(self._lanes) < self.concurrency:
            # Own (empty) context: a batch is nobody's request in particular.
            lane = asyncio.create_task(self._drain(), name=self.name, context=contextvars.Context())
            self._lanes.add(lane)
            lane.add_done_callback(self._lanes.discard)
        return await future

    def _take(self) -> list[_Pending[Req, Res]]:
        batch: list[_Pending[Req, Res]] = []
        while self._queue and len(batch) < self.max_batch:
            p = self._queue.popleft()
            if not p.future.done():  # a caller cancelled meanwhile is dropped
                batch.append(p)
        return batch

    async def _drain(self) -> None:
        """One lane: writes batches while requests are queued."""
        batch: list[_Pending[Req, Res]] = []
        try:
            while self._queue:
                batch = self._take()
                if not batch:
                    continue
                outcomes: Sequence[Res | BaseException]
                try:
                    outcomes = await self._run(self._job([p.request for p in batch]))
                    if len(outcomes) != len(batch):  # a writer's bug: fail the batch, not the lane
                        raise RuntimeError(
                            f"{self.name}: {len(outcomes)} outcomes for {len(batch)} requests"
                        )
                except Exception as exc:  # the executor itself failed (shut down, ...)
                    log.warning("%s batch could not run", self.name, exc_info=True)
                    outcomes = [exc] * len(batch)
                self.batches += 1
                for p, outcome in zip(batch, outcomes, strict=True):
                    if p.future.done():  # its caller was cancelled while the batch ran
                        if not isinstance(outcome, BaseException):
                            self._unclaimed(p.request, outcome)
                        continue
                    if isinstance(outcome, BaseException):
                        p.future.set_exception(outcome)
                    else:
                        p.future.set_result(outcome)
                batch = []
        finally:
            # No longer a lane from here on, in the same step as the empty-queue check: a
            # request queued after it starts a new lane. (Left to the done callback, a
            # request queued before that callback ran would see this lane, start none, and
            # wait forever.)
            if (task := asyncio.current_task()) is not None:
                self._lanes.discard(task)
            # Cancelled (loop shutting down): no caller is left waiting forever. (The batch
            # being written may still commit in its thread.)
            stranded = [*batch, *self._queue]
            self._queue.clear()
            for p in stranded:
                if not p.future.done():
                    p.future.set_exception(
                        Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
                    )

    async def aclose(self) -> None:
        """Refuse new requests; wait until the queued ones are written."""
        self._closed = True
        while self._lanes:
            try:
                await asyncio.gather(*self._lanes)
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise
