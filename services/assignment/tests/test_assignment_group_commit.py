"""GroupCommit, the lane the clue, action and dispatch batchers share (no database): a
request made right after a batch is written starts a new lane (the lost wake-up that hung
offer streams); queued requests share a batch and keep their own errors; a failed batch or
a cancelled lane answers every caller; the dispatch batcher reads the clock and the routing
config when its batch starts."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import pytest
from crm_assignment.api.dispatch_batcher import DispatchBatcher
from crm_assignment.api.group_commit import GroupCommit
from crm_assignment.config import RoutingConfig
from crm_assignment.domain.model import BusinessLine, Category, Customer, Offer, Status, Task
from crm_assignment.store import NoOffer
from crm_common.aio import BlockingExecutor
from crm_common.errors import NotFound, Unavailable
from crm_common.tracing import RequestOrigin

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


class _Doubler(GroupCommit[int, int]):
    def __init__(self, executor: BlockingExecutor, max_batch: int = 64) -> None:
        super().__init__(executor, max_batch, name="doubler")
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def _job(self, requests: list[int]) -> Callable[[], Sequence[int | Exception]]:
        def write() -> list[int | Exception]:
            self.gate.wait(10)
            self.sizes.append(len(requests))
            return [ValueError(r) if r < 0 else 2 * r for r in requests]

        return write

    async def submit(self, n: int) -> int:
        return await self._submit(n)


async def test_a_request_right_after_a_batch_starts_a_new_lane() -> None:
    """The caller of the last request of a batch resumes before the finished lane's done
    callbacks run; asking again at once must not wait on that lane (it used to, forever:
    an offer stream asking for its next offer right after one)."""
    executor = BlockingExecutor(2)
    batcher = _Doubler(executor)
    try:
        for n in range(5):
            async with asyncio.timeout(5):  # in this task: no new task in between
                assert await batcher.submit(n) == 2 * n
        assert batcher.batches == 5
    finally:
        await executor.aclose()


async def test_queued_requests_share_a_batch_and_keep_their_own_errors() -> None:
    executor = BlockingExecutor(2)
    batcher = _Doubler(executor, max_batch=3)
    try:
        batcher.gate.clear()
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.05)  # the first batch (of one) is being written
        calls = [asyncio.create_task(batcher.submit(n)) for n in (2, -3, 4, 5)]
        await asyncio.sleep(0.05)
        batcher.gate.set()
        assert await first == 2
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results[0] == 4
        assert isinstance(results[1], ValueError)
        assert results[2:] == [8, 10]
        assert batcher.sizes == [1, 3, 1]  # no delay for the first; then up to max_batch
        await batcher.aclose()
        with pytest.raises(Unavailable):
            await batcher.submit(6)
    finally:
        await executor.aclose()


class _Store:
    def __init__(self) -> None:
        self.calls: list[tuple[list[int], datetime, RoutingConfig]] = []

    def dispatch_many(
        self,
        agent_ids: Sequence[int],
        now: datetime,
        routing: RoutingConfig,
        origins: Sequence[RequestOrigin] | None = None,
        /,
    ) -> list[object]:
        self.calls.append((list(agent_ids), now, routing))
        return [NotFound("no agent 0") if a == 0 else NoOffer.LINE_EMPTY for a in agent_ids]


async def test_dispatch_batcher_passes_time_and_routing_of_the_batch() -> None:
    executor = BlockingExecutor(1)
    store = _Store()
    routing = RoutingConfig.from_values({}, 7)
    batcher = DispatchBatcher(store, executor, lambda: NOW, lambda: routing)  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(5):
            assert await batcher.submit(3) is NoOffer.LINE_EMPTY
            with pytest.raises(NotFound):
                await batcher.submit(0)  # the agent's own error
        assert store.calls == [([3], NOW, routing), ([0], NOW, routing)]
    finally:
        await executor.aclose()


class _Miscounting(_Doubler):
    def _job(self, requests: list[int]) -> Callable[[], Sequence[int | Exception]]:
        inner = super()._job(requests)
        return lambda: [*inner(), 0] if requests[0] == 13 else inner()


async def test_a_failed_batch_fails_its_callers_and_the_lane_goes_on() -> None:
    executor = BlockingExecutor(2)
    batcher = _Miscounting(executor)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(RuntimeError, match="outcomes for 1 requests"):
                await batcher.submit(13)
            assert await batcher.submit(4) == 8
    finally:
        await executor.aclose()


async def test_callers_of_a_cancelled_lane_get_unavailable() -> None:
    """The loop shutting down cancels the lane: a caller queued or in the batch being
    written is answered (UNAVAILABLE), never left waiting."""
    executor = BlockingExecutor(2)
    batcher = _Doubler(executor, max_batch=1)
    try:
        batcher.gate.clear()
        calls = [asyncio.create_task(batcher.submit(n)) for n in (1, 2)]
        await asyncio.sleep(0.05)  # the first batch is being written, the second queued
        for lane in list(batcher._lanes):
            lane.cancel()
        async with asyncio.timeout(5):
            results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, Unavailable) for r in results), results
    finally:
        batcher.gate.set()
        await executor.aclose()


class _Keeping(_Doubler):
    def __init__(self, executor: BlockingExecutor) -> None:
        super().__init__(executor)
        self.unclaimed: list[tuple[int, int]] = []

    def _unclaimed(self, request: int, result: int) -> None:
        self.unclaimed.append((request, result))


async def test_a_result_written_for_a_caller_gone_meanwhile_is_handed_over() -> None:
    """Cancelled while its batch is written, the caller never sees the result; the batcher
    hears of it (the dispatch batcher schedules the offer's timeout). Cancelled while
    still queued, its request is not written at all."""
    executor = BlockingExecutor(2)
    batcher = _Keeping(executor)
    try:
        batcher.gate.clear()
        written = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.05)  # its batch is being written
        queued = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0)
        written.cancel()
        queued.cancel()
        batcher.gate.set()
        async with asyncio.timeout(5):
            assert await batcher.submit(3) == 6
        assert batcher.unclaimed == [(1, 2)]
        assert batcher.sizes == [1, 1]  # 2 was dropped before its batch
    finally:
        batcher.gate.set()
        await executor.aclose()


class _GatedStore(_Store):
    """Offers agent 5 a task once the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def dispatch_many(
        self,
        agent_ids: Sequence[int],
        now: datetime,
        routing: RoutingConfig,
        origins: Sequence[RequestOrigin] | None = None,
        /,
    ) -> list[object]:
        self.gate.wait(10)
        task = Task(
            41, BusinessLine.SALE, Category.NEW_CLUE, Status.ASSIGNED, 7, "beijing", 0, False,
            5, None, None, None, (), now, now, now, 0, 1, now,
        )  # fmt: skip
        return [Offer(task, Customer(7, "138****1234", False), now, offer_event_id=99)]


async def test_an_offer_for_a_stream_gone_meanwhile_still_gets_its_timeout() -> None:
    executor = BlockingExecutor(1)
    store = _GatedStore()
    unclaimed: list[Offer] = []
    handed_over = asyncio.Event()

    def on_unclaimed(offer: Offer) -> None:
        unclaimed.append(offer)
        handed_over.set()

    batcher = DispatchBatcher(
        store,  # type: ignore[arg-type]
        executor,
        lambda: NOW,
        lambda: RoutingConfig.from_values({}, 7),
        on_unclaimed=on_unclaimed,
    )
    try:
        stream = asyncio.create_task(batcher.submit(5))
        await asyncio.sleep(0.05)  # its batch is being written
        stream.cancel()  # the agent's stream ended
        store.gate.set()
        async with asyncio.timeout(5):
            await handed_over.wait()
        assert [(o.task.id, o.offer_event_id) for o in unclaimed] == [(41, 99)]
    finally:
        store.gate.set()
        await executor.aclose()
