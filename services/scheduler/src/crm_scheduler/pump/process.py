"""``python -m crm_scheduler pump``: the pump process (health + metrics on its own port)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from crm_common.aio import BlockingExecutor
from crm_common.health import health_server
from crm_common.metrics import RpcMetrics

from crm_scheduler.domain.model import Clock, utc_now
from crm_scheduler.health import PUMP_HEALTH_SERVICE
from crm_scheduler.pump.pump import Pump, PumpConfig, PumpMetrics
from crm_scheduler.settings import SchedulerSettings
from crm_scheduler.store import SchedulerStore, make_engine
from crm_scheduler.worker.celery_app import CelerySender, make_celery

__all__ = ["pump_config", "run_pump"]

log = logging.getLogger("crm.scheduler.pump")


def pump_config(settings: SchedulerSettings) -> PumpConfig:
    return PumpConfig(
        poll_s=settings.pump_poll_s,
        coalesce_s=settings.pump_coalesce_s,
        lead_s=settings.pump_lead_s,
        batch=settings.pump_batch,
        max_in_flight=settings.pump_max_in_flight,
        enqueue_lease_s=settings.enqueue_lease_s,
    )


async def run_pump(settings: SchedulerSettings, clock: Clock = utc_now) -> None:
    """Pumps until SIGTERM/SIGINT."""
    engine = make_engine(settings.database_url, 3, lean=True)
    store = SchedulerStore(engine)
    executor = BlockingExecutor(3, name="crm-scheduler-pump")
    sender = CelerySender(
        make_celery(settings), settings.queue_name, settings.redis_url, settings.pump_message_jobs
    )
    metrics = RpcMetrics("scheduler-pump")
    pump = Pump(store, sender, clock, pump_config(settings), PumpMetrics(metrics.registry))
    server = health_server(
        PUMP_HEALTH_SERVICE,
        settings.for_pump(),
        {"mysql": store.ping, "redis": sender.ping},
        metrics,
    )
    loop_task: asyncio.Task[None] | None = None

    async def close() -> None:
        if loop_task is not None:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
        await executor.aclose()
        await asyncio.to_thread(sender.close)
        await asyncio.to_thread(engine.dispose)

    server.on_stop.append(close)
    await server.start()
    loop_task = asyncio.create_task(pump.run(executor), name="crm-scheduler-pump")
    log.info("pump started", extra={"queue": settings.queue_name})
    await server.run_until_signal()
