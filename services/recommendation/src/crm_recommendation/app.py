"""Wiring of the recommendation service: ``build_app(settings) -> App``.

Used by ``python -m crm_recommendation serve``, the tests (in-process on port 0) and the
benchmark::

    app = build_app(RecommendationSettings(port=0, metrics_port=-1, ...))
    async with app:                 # start(); stop() on exit
        await app.wait_ready(30)    # config loaded, database answers, index loaded
        channel = grpc.aio.insecure_channel(app.target)

Building does no I/O; ``start()`` starts the config watcher (without waiting for etcd),
the gRPC server and the index (loaded in the background: health stays NOT_SERVING until
the config is loaded, the database answers and the index is built); ``stop()`` drains
the server, then stops the index refresher and closes the watcher, executor and engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from crm.recommendation.v1 import recommendation_pb2, recommendation_pb2_grpc
from crm_common.aio import BlockingExecutor
from crm_common.app import ServiceApp
from crm_common.config_watch import ConfigSnapshot, ConfigWatcher
from crm_common.metrics import RpcMetrics
from crm_common.server import GrpcServer
from prometheus_client import Gauge
from sqlalchemy import Engine

from crm_recommendation import config
from crm_recommendation.api.servicer import RecommendationServicer
from crm_recommendation.config import CONFIG_KEY, RankingConfig
from crm_recommendation.domain.model import utc_now
from crm_recommendation.index.sync import IndexSync
from crm_recommendation.settings import RecommendationSettings
from crm_recommendation.store import RecommendationStore, make_engine

__all__ = ["SERVICE_NAME", "App", "RankingSource", "build_app"]

log = logging.getLogger("crm.recommendation")

SERVICE_NAME: str = recommendation_pb2.DESCRIPTOR.services_by_name[
    "RecommendationService"
].full_name

_DEFAULT_CONFIG = RankingConfig()


class RankingSource:
    """The current RankingConfig (the defaults while the key is absent)."""

    def __init__(self, watcher: ConfigWatcher[RankingConfig]) -> None:
        self._watcher = watcher

    def __call__(self) -> RankingConfig:
        found = self._watcher.snapshot.get(CONFIG_KEY)
        return found if found is not None else _DEFAULT_CONFIG


@dataclass
class App(ServiceApp):
    """The assembled service (see module doc); attributes are for tests and tools."""

    settings: RecommendationSettings
    engine: Engine
    store: RecommendationStore
    executor: BlockingExecutor
    watcher: ConfigWatcher[RankingConfig]
    ranking: RankingSource
    sync: IndexSync
    servicer: RecommendationServicer
    server: GrpcServer
    metrics: RpcMetrics

    async def start(self) -> None:
        await self.watcher.start(wait=False)
        await self.server.start()
        await self.sync.start()


def build_app(
    settings: RecommendationSettings,
    *,
    clock: Callable[[], datetime] | None = None,
    engine: Engine | None = None,
) -> App:
    """Assemble the service from its settings (no I/O). ``clock`` replaces the real clock
    (tests); ``engine`` replaces the one built from ``settings.database_url``."""
    clock = clock or utc_now
    engine = engine or make_engine(settings.database_url, settings.db_pool_size)
    store = RecommendationStore(engine)
    executor = BlockingExecutor(settings.db_pool_size, name="crm-recommendation-db")
    metrics = RpcMetrics("recommendation")
    sync = IndexSync(
        store,
        executor,
        half_life_days=settings.popularity_half_life_days,
        max_customer_cars=settings.max_customer_cars,
        poll_interval_s=settings.refresh_interval_s,
    )

    def gauge(name: str, doc: str, fn: Callable[[], float]) -> None:
        Gauge(name, doc, registry=metrics.registry).set_function(fn)

    gauge(
        "crm_recommendation_index_bytes",
        "Approximate memory of the in-memory index.",
        lambda: float(sync.index.nbytes) if sync.index else 0.0,
    )
    gauge(
        "crm_recommendation_index_sequence",
        "Change sequence up to which the index has applied every change.",
        lambda: float(sync.index.watermark) if sync.index else 0.0,
    )
    gauge(
        "crm_recommendation_index_cars",
        "Car ids known to the index.",
        lambda: float(sync.index.n) if sync.index else 0.0,
    )

    def on_apply(snapshot: ConfigSnapshot[RankingConfig]) -> None:
        log.info("ranking config applied", extra={"config_revision": snapshot.revision})

    watcher: ConfigWatcher[RankingConfig] = ConfigWatcher(
        settings.etcd_endpoints,
        settings.recommendation_config_prefix,
        config.parse,
        on_apply=on_apply,
        name="recommendation-ranking",
        ack=settings.instance_name,  # rollouts and "which instances applied it"
    )
    ranking = RankingSource(watcher)
    servicer = RecommendationServicer(
        store=store, executor=executor, sync=sync, config=ranking, clock=clock
    )

    async def db_ready() -> None:
        await executor.run(store.ping)

    async def config_ready() -> None:
        if not watcher.ready:
            raise RuntimeError("ranking config not loaded from etcd yet")

    async def index_ready() -> None:
        if not sync.ready:
            raise RuntimeError("index not loaded yet")

    server = GrpcServer(
        [SERVICE_NAME],
        settings,
        [(recommendation_pb2_grpc.add_RecommendationServiceServicer_to_server, servicer)],
        readiness_checks={"mysql": db_ready, "config": config_ready, "index": index_ready},
        metrics=metrics,
    )

    async def close_resources() -> None:
        await sync.stop()
        await watcher.stop()
        await executor.aclose()
        await asyncio.to_thread(engine.dispose)

    server.on_stop.append(close_resources)
    return App(
        settings=settings,
        engine=engine,
        store=store,
        executor=executor,
        watcher=watcher,
        ranking=ranking,
        sync=sync,
        servicer=servicer,
        server=server,
        metrics=metrics,
    )
