"""``IndexSync``: loads the replica's :class:`CarIndex` and keeps it following MySQL.

- ``start()`` loads everything in the background (database reads in the blocking
  executor, the vectorized build in a worker thread), retrying with backoff until the
  database answers; until then :meth:`IndexSync.require` raises UNAVAILABLE and the
  readiness check fails (health NOT_SERVING).
- Then every ``poll_interval_s`` it reads the changes after the index's watermark (rows
  with a greater change sequence, in pages) and applies them on the event loop in small
  chunks; so replicas converge on the same data, and then answer identically.
- Writes handled by this replica are applied at once (``apply_cars`` /
  ``apply_interaction``); the poll skips them when it reads them back (cars by sequence,
  interactions once per sequence).
- When the co-occurrence overlay grows past ``compact_entries``, it is folded into a new
  CSR base in a worker thread while changes keep flowing into a fresh overlay.

All index mutations and reads happen on the event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
from collections.abc import Iterable

from crm_common.aio import BlockingExecutor
from crm_common.errors import Unavailable

from crm_recommendation.domain.model import Car, Interaction
from crm_recommendation.index.car_index import CarIndex
from crm_recommendation.store.repository import RecommendationStore, Snapshot

__all__ = ["IndexSync"]

log = logging.getLogger("crm.recommendation.index")

_APPLY_CHUNK = 500


class IndexSync:
    """Owner of the replica's index (see module doc)."""

    def __init__(
        self,
        store: RecommendationStore,
        executor: BlockingExecutor,
        *,
        half_life_days: float,
        max_customer_cars: int,
        poll_interval_s: float,
        page_size: int = 5000,
        compact_entries: int = 500_000,
    ) -> None:
        self._store = store
        self._executor = executor
        self._half_life_days = half_life_days
        self._max_customer_cars = max_customer_cars
        self._poll_interval_s = poll_interval_s
        self._page_size = page_size
        self._compact_entries = compact_entries
        self._index: CarIndex | None = None
        self._task: asyncio.Task[None] | None = None
        self._poll_lock = asyncio.Lock()
        self._compaction: asyncio.Task[None] | None = None
        self.load_seconds: float | None = None

    @property
    def index(self) -> CarIndex | None:
        """The index, None while it loads."""
        return self._index

    @property
    def ready(self) -> bool:
        return self._index is not None

    def require(self) -> CarIndex:
        """The index, or UNAVAILABLE while it is still loading."""
        if self._index is None:
            raise Unavailable("the recommendation index is still loading", reason="INDEX_LOADING")
        return self._index

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="crm-recommendation-index")

    async def stop(self) -> None:
        for task in (self._task, self._compaction):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None

    async def _run(self) -> None:
        delay = 0.2
        while self._index is None:
            try:
                await self.load()
            except Exception as exc:
                log.warning("index load failed (%s: %s); retrying in %.1fs",
                            type(exc).__name__, exc, delay)  # fmt: skip
                await asyncio.sleep(delay * random.uniform(0.8, 1.0))
                delay = min(delay * 2, 5.0)
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                await self.poll_once()
            except Exception as exc:
                log.warning("index refresh failed (%s: %s)", type(exc).__name__, exc)

    async def load(self) -> None:
        """Loads the whole index from the database and installs it."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        snapshot = await self._executor.run(self._store.load_all)
        index = await asyncio.to_thread(self._build, snapshot)
        counts = (len(snapshot.cars), len(snapshot.interactions[0]), snapshot.sequence)
        del snapshot
        # The index is ~10^5 long-lived objects (cars, their strings) and holds no cycles:
        # moved out of the collector's generations, a full collection no longer walks them
        # (measured ~100 ms per gen-2 collection with them, a pause every RPC in flight
        # waited for). They are still freed by reference counting when replaced.
        gc.collect()
        gc.freeze()
        self._index = index
        self.load_seconds = loop.time() - started
        log.info(
            "index loaded: %d cars, %d interactions up to sequence %d in %.1fs",
            *counts, self.load_seconds,
            extra={"index_bytes": index.nbytes},
        )  # fmt: skip
        await self.poll_once()  # changes committed while loading

    def _build(self, snapshot: Snapshot) -> CarIndex:
        index = CarIndex(
            half_life_days=self._half_life_days, max_customer_cars=self._max_customer_cars
        )
        index.bulk_load(snapshot.cars, snapshot.interactions, snapshot.sequence)
        return index

    # ------------------------------------------------------------------ following

    async def poll_once(self) -> int:
        """Reads and applies every change committed so far; returns the watermark."""
        index = self.require()
        async with self._poll_lock:
            while True:
                changes = await self._executor.run(
                    self._store.changes, index.watermark, self._page_size
                )
                cars = list(changes.cars)
                for i in range(0, len(cars), _APPLY_CHUNK):
                    index.apply_cars(cars[i : i + _APPLY_CHUNK])
                    await asyncio.sleep(0)
                interactions = list(changes.interactions)
                for i in range(0, len(interactions), _APPLY_CHUNK):
                    index.apply_interactions(interactions[i : i + _APPLY_CHUNK])
                    await asyncio.sleep(0)
                index.advance_watermark(changes.upto)
                self._maybe_compact(index)
                if changes.upto >= changes.latest:
                    return index.watermark

    def _maybe_compact(self, index: CarIndex) -> None:
        if index.pairs.delta_entries < self._compact_entries:
            return
        if self._compaction is not None and not self._compaction.done():
            return
        frozen = index.pairs.begin_compaction()
        if frozen is None:
            return

        async def compact() -> None:
            base, overlay = frozen
            merged = await asyncio.to_thread(index.pairs.merged, base, overlay, index.n)
            index.pairs.finish_compaction(merged)
            log.info("co-occurrence overlay compacted", extra={"index_bytes": index.nbytes})

        self._compaction = asyncio.create_task(compact(), name="crm-recommendation-compact")

    # ------------------------------------------------------------------ local writes

    def apply_cars(self, rows: Iterable[tuple[Car, int]]) -> None:
        """Applies cars this replica just wrote (no-op while loading: the load or the
        next poll reads them)."""
        if self._index is not None:
            self._index.apply_cars(rows)

    def apply_interaction(self, it: Interaction) -> None:
        """Applies an interaction this replica just stored."""
        if self._index is not None:
            self._index.add_interaction(it)
