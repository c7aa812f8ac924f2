"""``RecommendationClient``: the typed async client other services (assignment's console
detail) use to ask for recommendations.

Every call has a deadline (``timeout``, default 0.5 s: the console must not wait for
recommendations) and returns domain objects. UNAVAILABLE and DEADLINE_EXCEEDED (the
service is down, loading or slow) raise :class:`RecommendationUnavailable`, so a caller
can degrade (show the task without recommendations); any other failed status is
re-raised as the ``grpc.aio.AioRpcError`` (bad request, unknown car)::

    client = RecommendationClient.connect("crm-recommendation:50052")
    try:
        recs = await client.recommend(RecommendQuery(count=10, city="beijing"))
    except RecommendationUnavailable:
        recs = None
    ...
    await client.aclose()
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import grpc
from crm.recommendation.v1 import recommendation_pb2 as pb
from crm.recommendation.v1 import recommendation_pb2_grpc
from crm_common.interceptors import insecure_channel
from grpc import aio

from crm_recommendation.api.convert import recommendation_from_pb, timestamp
from crm_recommendation.domain.model import (
    InteractionKind,
    Recommendations,
    RecommendQuery,
)

__all__ = ["DEFAULT_TIMEOUT_S", "RecommendationClient", "RecommendationUnavailable"]

DEFAULT_TIMEOUT_S = 0.5

_UNAVAILABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
R = TypeVar("R")


class RecommendationUnavailable(Exception):
    """The recommendation service did not answer in time (or is down / still loading)."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class RecommendationClient:
    """Calls ``crm.recommendation.v1.RecommendationService`` (see module doc)."""

    def __init__(
        self,
        channel: aio.Channel,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        owns_channel: bool = False,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self._channel = channel
        self._owns_channel = owns_channel
        self._stub = recommendation_pb2_grpc.RecommendationServiceStub(channel)
        self.timeout = timeout

    @classmethod
    def connect(cls, target: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> RecommendationClient:
        """A client over a new channel to ``target`` (closed by :meth:`aclose`); request ids
        of the caller's context are propagated."""
        return cls(insecure_channel(target), timeout=timeout, owns_channel=True)

    async def aclose(self) -> None:
        if self._owns_channel:
            await self._channel.close(None)

    async def _call(self, what: str, fn: Callable[[], Awaitable[R]]) -> R:
        try:
            return await fn()
        except aio.AioRpcError as exc:
            if exc.code() in _UNAVAILABLE:
                raise RecommendationUnavailable(
                    f"recommendation service: {what} failed with {exc.code().name}: "
                    f"{exc.details()}",
                    exc.code(),
                ) from exc
            raise

    async def recommend(self, query: RecommendQuery) -> Recommendations:
        """Ranked cars for ``query``."""
        request = pb.RecommendRequest(
            customer_id=query.customer_id or 0,
            intent_car_ids=list(query.intent_car_ids),
            budget_min_yuan=query.budget_min_yuan,
            budget_max_yuan=query.budget_max_yuan,
            city=query.city or "",
            count=query.count,
            exclude_car_ids=sorted(query.exclude_car_ids),
            business_line=int(query.business_line) if query.business_line else 0,  # type: ignore[arg-type]
        )
        response = await self._call(
            "Recommend", lambda: self._stub.Recommend(request, timeout=self.timeout)
        )
        return Recommendations(
            tuple(recommendation_from_pb(r) for r in response.recommendations),
            response.data_sequence,
            tuple(response.ignored_intent_car_ids),
        )

    async def similar_cars(self, car_id: int, count: int) -> Recommendations:
        """Cars similar to ``car_id``; NOT_FOUND (re-raised) when it is unknown."""
        request = pb.SimilarCarsRequest(car_id=car_id, count=count)
        response = await self._call(
            "SimilarCars", lambda: self._stub.SimilarCars(request, timeout=self.timeout)
        )
        return Recommendations(
            tuple(recommendation_from_pb(r) for r in response.recommendations),
            response.data_sequence,
        )

    async def record_interaction(
        self,
        customer_id: int,
        car_id: int,
        kind: InteractionKind,
        occurred_at: datetime | None = None,
    ) -> int:
        """Records an interaction; returns its change sequence number."""
        request = pb.RecordInteractionRequest(
            customer_id=customer_id,
            car_id=car_id,
            kind=pb.InteractionKind.ValueType(int(kind)),
        )
        if occurred_at is not None:
            request.occurred_at.CopyFrom(timestamp(occurred_at))
        response = await self._call(
            "RecordInteraction",
            lambda: self._stub.RecordInteraction(request, timeout=self.timeout),
        )
        return response.sequence
