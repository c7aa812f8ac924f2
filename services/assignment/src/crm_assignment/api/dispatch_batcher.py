"""``DispatchBatcher``: the offer streams asking for a task at once are served in one
transaction per batch (group commit, see ``group_commit``).

Every open offer stream asks the store for an offer when it is woken. Asked one
transaction per stream, streams woken together (a batch of new clues, agents completing
at once) rank the same candidates and race for them one ``SKIP LOCKED`` statement at a
time. Batched, the requests queued while the previous batch ran are matched to distinct
tasks in one transaction with a fixed number of statements
(``AssignmentStore.dispatch_many``, ``store/dispatching``), in the order they asked (the
longest waiting stream first). Each stream gets its own outcome: an offer, why there was
none (``NoOffer``), or its own error. Time and routing config are read as the batch's
transaction starts (in its executor thread). An offer made for a stream that ended
while its batch ran still gets its timeout (``on_unclaimed``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from crm_common.aio import BlockingExecutor
from crm_common.tracing import RequestOrigin, request_origin

from crm_assignment.api.group_commit import GroupCommit
from crm_assignment.config import RoutingConfig
from crm_assignment.domain.model import Clock, Offer
from crm_assignment.store.repository import DispatchResult, NoOffer

__all__ = ["DispatchBatcher", "DispatchWriter"]

log = logging.getLogger("crm.assignment.api")


class DispatchWriter(Protocol):
    def dispatch_many(
        self,
        agent_ids: Sequence[int],
        now: datetime,
        routing: RoutingConfig,
        origins: Sequence[RequestOrigin] | None = None,
        /,
    ) -> list[DispatchResult]: ...


class DispatchBatcher(GroupCommit[tuple[int, RequestOrigin], Offer | NoOffer]):
    """Group commit of offer requests (see module doc). Use from one event loop."""

    def __init__(
        self,
        store: DispatchWriter,
        executor: BlockingExecutor,
        clock: Clock,
        routing: Callable[[], RoutingConfig],
        max_batch: int = 64,
        on_unclaimed: Callable[[Offer], None] | None = None,
    ) -> None:
        super().__init__(executor, max_batch, name="dispatch-batcher")
        self._store = store
        self._clock = clock
        self._routing = routing
        self._on_unclaimed = on_unclaimed

    def _job(
        self, requests: list[tuple[int, RequestOrigin]]
    ) -> Callable[[], Sequence[Offer | NoOffer | Exception]]:
        store, clock, routing = self._store, self._clock, self._routing
        agent_ids = [agent_id for agent_id, _ in requests]
        origins = [origin for _, origin in requests]

        def run() -> Sequence[Offer | NoOffer | Exception]:
            # read in the executor thread as the transaction starts, not when the batch was
            # queued: a config change applied while the batch waited for a thread is used
            return store.dispatch_many(agent_ids, clock(), routing(), origins)

        return run

    def _unclaimed(self, request: tuple[int, RequestOrigin], result: Offer | NoOffer) -> None:
        """An offer made for a stream that ended while its batch ran: the task is reserved
        for the agent all the same (pushed again when it reconnects), so it gets its
        timeout like any other offer (``on_unclaimed``)."""
        if isinstance(result, Offer) and self._on_unclaimed is not None:
            try:
                self._on_unclaimed(result)
            except Exception:  # never the lane's problem
                log.exception("unclaimed offer of task %d not handled", result.task.id)

    async def submit(self, agent_id: int) -> Offer | NoOffer:
        """Offer the agent a task (in the next batch), or say why not; raises the agent's
        own error (NOT_FOUND)."""
        # the stream's call goes with the request: the batch runs in a context of its own
        return await self._submit((agent_id, request_origin()))
