"""Wiring of the scheduler API server: ``build_app(settings) -> App``.

Used by ``python -m crm_scheduler serve`` and the tests (in-process on port 0)::

    app = build_app(SchedulerSettings(port=0, metrics_port=-1, database_url=...))
    async with app:                 # start(); stop() on exit
        await app.wait_ready(10)    # the database answers
        channel = grpc.aio.insecure_channel(app.target)

The API only writes the job table; the pump (``python -m crm_scheduler pump``) and the
workers (``python -m crm_scheduler worker``) run the jobs. Building does no I/O.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from crm.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from crm_common.aio import BlockingExecutor
from crm_common.app import ServiceApp
from crm_common.metrics import RpcMetrics
from crm_common.server import GrpcServer
from sqlalchemy import Engine

from crm_scheduler.api.servicer import SchedulerServicer
from crm_scheduler.api.validation import Limits
from crm_scheduler.domain.model import Clock, utc_now
from crm_scheduler.settings import SchedulerSettings
from crm_scheduler.store import SchedulerStore, make_engine

__all__ = ["SERVICE_NAME", "App", "build_app", "limits_from"]

SERVICE_NAME: str = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name


def limits_from(settings: SchedulerSettings) -> Limits:
    """Schedule's validation limits from the settings."""
    return Limits(
        max_payload_bytes=settings.max_payload_bytes,
        max_past=timedelta(seconds=settings.max_past_s),
        allowed_services=settings.allowed_services,
    )


@dataclass
class App(ServiceApp):
    """The assembled API server (see module doc)."""

    settings: SchedulerSettings
    clock: Clock
    engine: Engine
    store: SchedulerStore
    executor: BlockingExecutor
    servicer: SchedulerServicer
    server: GrpcServer
    metrics: RpcMetrics


def build_app(
    settings: SchedulerSettings, *, clock: Clock | None = None, engine: Engine | None = None
) -> App:
    """Assemble the API server from its settings (no I/O)."""
    clock = clock or utc_now
    engine = engine or make_engine(settings.database_url, settings.db_pool_size)
    store = SchedulerStore(engine)
    executor = BlockingExecutor(settings.db_pool_size, name="crm-scheduler-db")
    servicer = SchedulerServicer(store, executor, clock, limits_from(settings))
    metrics = RpcMetrics("scheduler")

    async def db_ready() -> None:
        await executor.run(store.ping)

    server = GrpcServer(
        [SERVICE_NAME],
        settings,
        [(scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server, servicer)],
        readiness_checks={"mysql": db_ready},
        metrics=metrics,
    )

    async def close_resources() -> None:
        await executor.aclose()
        await asyncio.to_thread(engine.dispose)

    server.on_stop.append(close_resources)
    return App(
        settings=settings,
        clock=clock,
        engine=engine,
        store=store,
        executor=executor,
        servicer=servicer,
        server=server,
        metrics=metrics,
    )
