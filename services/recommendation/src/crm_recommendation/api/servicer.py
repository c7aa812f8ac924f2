"""``RecommendationServicer``: the thin grpc.aio servicer of ``crm.recommendation.v1``.

Writes validate, run in the blocking executor, then go into this replica's index at once;
reads rank on the event loop from the in-memory index (vectorized numpy, no I/O) with the
live ranking config. Errors are raised as ``crm_common.errors`` exceptions; the server
interceptor turns them into statuses with field details.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from crm.recommendation.v1 import recommendation_pb2 as pb
from crm.recommendation.v1 import recommendation_pb2_grpc
from crm_common.aio import BlockingExecutor

from crm_recommendation.api import convert, validation
from crm_recommendation.config import RankingConfig
from crm_recommendation.domain import ranking
from crm_recommendation.index.sync import IndexSync
from crm_recommendation.store import RecommendationStore

if TYPE_CHECKING:
    from grpc import aio

    Context = aio.ServicerContext[Any, Any]
else:
    Context = Any

__all__ = ["RecommendationServicer"]


class RecommendationServicer(recommendation_pb2_grpc.RecommendationServiceServicer):
    """Every RPC of ``crm.recommendation.v1.RecommendationService``."""

    def __init__(
        self,
        *,
        store: RecommendationStore,
        executor: BlockingExecutor,
        sync: IndexSync,
        config: Callable[[], RankingConfig],
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._run = executor.run
        self._sync = sync
        self._config = config
        self._clock = clock
        self._encoder = convert.ResponseEncoder()

    async def UpsertCars(
        self, request: pb.UpsertCarsRequest, context: Context
    ) -> pb.UpsertCarsResponse:
        now = self._clock()
        cars = validation.cars(request, now)
        result = await self._run(self._store.upsert_cars, cars, now)
        self._sync.apply_cars(result.rows)
        return pb.UpsertCarsResponse(created_count=result.created, updated_count=result.updated)

    async def RecordInteraction(
        self, request: pb.RecordInteractionRequest, context: Context
    ) -> pb.RecordInteractionResponse:
        now = self._clock()
        it = validation.interaction(request, now)
        stored = await self._run(self._store.record_interaction, it, now)
        self._sync.apply_interaction(stored)
        return pb.RecordInteractionResponse(sequence=stored.sequence)

    async def Recommend(
        self, request: pb.RecommendRequest, context: Context
    ) -> pb.RecommendResponse:
        query = validation.recommend_query(request)
        result = ranking.recommend(self._sync.require(), self._config(), query)
        return self._encoder.recommend_response(result)

    async def SimilarCars(
        self, request: pb.SimilarCarsRequest, context: Context
    ) -> pb.SimilarCarsResponse:
        car_id, count = validation.similar_query(request)
        result = ranking.similar_cars(self._sync.require(), self._config(), car_id, count)
        return self._encoder.similar_cars_response(result)
