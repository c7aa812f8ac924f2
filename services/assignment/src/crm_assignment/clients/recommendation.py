"""Car recommendations beside a task on the agent's console (GetTask).

:class:`TaskRecommender` is what the servicer depends on; it never raises: any failure
(recommendation down, slow, refusing the request, a bug) becomes
``TaskRecommendations(available=False, unavailable_reason=...)`` and the task detail is
answered anyway. :class:`RecommendationAdapter` asks the recommendation service through
its typed client with a short deadline (``recommendation_timeout_s``);
:class:`NotConfigured` answers ``NOT_CONFIGURED`` when no target is set.

The request is built from the task and its clues by :func:`recommend_query` (pure):
intent cars = the clues' intent cars (newest clue first, at most 20), budget = the widest
range the clues give, city and business line of the task, the task's customer. Warnings
name the task and the status code only (no phone, no customer data).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

import grpc
from crm.assignment.v1 import assignment_pb2 as pb
from crm_recommendation.api.convert import recommendation_pb
from crm_recommendation.client import RecommendationClient, RecommendationUnavailable
from crm_recommendation.domain.model import BusinessLine as RecBusinessLine
from crm_recommendation.domain.model import RecommendQuery

from crm_assignment.domain.model import TaskDetail

__all__ = [
    "MAX_INTENT_CARS",
    "NOT_CONFIGURED",
    "NotConfigured",
    "RecommendationAdapter",
    "TaskRecommender",
    "recommend_query",
]

log = logging.getLogger("crm.assignment.recommendation")

MAX_INTENT_CARS = 20
"""The recommendation service takes at most this many intent cars."""
NOT_CONFIGURED = "NOT_CONFIGURED"
_WARN_EVERY_S = 10.0


class TaskRecommender(Protocol):
    """Recommendations for a task detail; never raises."""

    async def for_task(self, detail: TaskDetail) -> pb.TaskRecommendations: ...

    async def aclose(self) -> None: ...


def recommend_query(detail: TaskDetail, count: int) -> RecommendQuery:
    """The Recommend request of a task (pure; see module doc)."""
    intent: list[int] = []
    for clue in sorted(detail.clues, key=lambda c: c.id, reverse=True):
        for car_id in clue.intent_car_ids:
            if car_id not in intent:
                intent.append(car_id)
    mins = [c.budget_min_yuan for c in detail.clues if c.budget_min_yuan > 0]
    maxes = [c.budget_max_yuan for c in detail.clues if c.budget_max_yuan > 0]
    lo = min(mins) if mins else 0
    hi = max(maxes) if maxes else 0
    if hi and hi < lo:  # a clue with only a minimum above another's maximum
        hi = 0
    task = detail.task
    return RecommendQuery(
        count=count,
        intent_car_ids=tuple(intent[:MAX_INTENT_CARS]),
        customer_id=task.customer_id,
        budget_min_yuan=lo,
        budget_max_yuan=hi,
        city=task.city or None,
        business_line=RecBusinessLine(int(task.business_line)),
    )


def _unavailable(reason: str) -> pb.TaskRecommendations:
    return pb.TaskRecommendations(available=False, unavailable_reason=reason)


class NotConfigured:
    """No recommendation target: every task answers ``NOT_CONFIGURED``."""

    async def for_task(self, detail: TaskDetail) -> pb.TaskRecommendations:
        return _unavailable(NOT_CONFIGURED)

    async def aclose(self) -> None:
        return None


class RecommendationAdapter:
    """Asks the recommendation service (see module doc). ``on_outcome(reason)`` is called
    with ``"OK"`` or the reason recommendations are missing (metrics)."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float,
        count: int,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.target = target
        self.timeout_s = timeout_s
        self._count = count
        self._on_outcome = on_outcome
        # A hard stop a little after the gRPC deadline, in case anything before the call
        # itself (name resolution, a stuck channel) ignores it.
        self._guard_s = timeout_s + 0.2
        self._client: RecommendationClient | None = None
        self._warned_at: dict[str, float] = {}

    def _get_client(self) -> RecommendationClient:
        """The client, its channel made on first use (on the serving loop)."""
        if self._client is None:
            self._client = RecommendationClient.connect(self.target, timeout=self.timeout_s)
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def for_task(self, detail: TaskDetail) -> pb.TaskRecommendations:
        reason: str
        try:
            query = recommend_query(detail, self._count)
            async with asyncio.timeout(self._guard_s):
                recs = await self._get_client().recommend(query)
        except RecommendationUnavailable as exc:
            reason = exc.code.name  # UNAVAILABLE or DEADLINE_EXCEEDED
        except TimeoutError:
            reason = grpc.StatusCode.DEADLINE_EXCEEDED.name
        except grpc.aio.AioRpcError as exc:
            reason = exc.code().name  # e.g. INVALID_ARGUMENT: a request we built wrongly
        except Exception as exc:
            reason = "ERROR"
            log.exception(
                "recommendations failed unexpectedly",
                extra={"task_id": detail.task.id, "error": type(exc).__name__},
            )
        else:
            self._outcome("OK")
            return pb.TaskRecommendations(
                available=True, cars=[recommendation_pb(r) for r in recs.items]
            )
        self._outcome(reason)
        self._warn(detail.task.id, reason)
        return _unavailable(reason)

    def _outcome(self, reason: str) -> None:
        if self._on_outcome is not None:
            self._on_outcome(reason)

    def _warn(self, task_id: int, reason: str) -> None:
        """A warning per reason at most every few seconds (an outage must not flood)."""
        now = time.monotonic()
        if now - self._warned_at.get(reason, float("-inf")) < _WARN_EVERY_S:
            return
        self._warned_at[reason] = now
        log.warning(
            "task detail answered without recommendations: %s",
            reason,
            extra={"task_id": task_id, "reason": reason},
        )
