"""Health and metrics of the pump and the workers: a small :class:`GrpcServer` with only
the standard gRPC health service (plus reflection and ``/metrics``).

The pump serves it on ``pump_health_port`` (health service name
:data:`PUMP_HEALTH_SERVICE`), a worker on ``worker_health_port``
(:data:`WORKER_HEALTH_SERVICE`); ``""`` answers too. Both report NOT_SERVING until
MySQL and Redis answer, like every CRM server, so a Kubernetes ``grpc`` probe works.
A Celery worker owns its main thread, so :class:`HealthThread` runs the server on an
event loop of its own.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping

from crm_common.metrics import RpcMetrics
from crm_common.server import GrpcServer

from crm_scheduler.settings import SchedulerSettings

__all__ = ["PUMP_HEALTH_SERVICE", "WORKER_HEALTH_SERVICE", "HealthThread", "health_server"]

PUMP_HEALTH_SERVICE = "crm.scheduler.v1.Pump"
"""Health service name of the pump (no RPCs besides health)."""
WORKER_HEALTH_SERVICE = "crm.scheduler.v1.Worker"
"""Health service name of a worker (no RPCs besides health)."""

BlockingCheck = Callable[[], None]


def health_server(
    name: str,
    settings: SchedulerSettings,
    checks: Mapping[str, BlockingCheck],
    metrics: RpcMetrics,
) -> GrpcServer:
    """A health-only server; each blocking check runs in a thread."""

    def wrap(check: BlockingCheck) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            await asyncio.to_thread(check)

        return run

    return GrpcServer(
        [name],
        settings,
        readiness_checks={k: wrap(c) for k, c in checks.items()},
        metrics=metrics,
    )


class HealthThread:
    """Runs :func:`health_server` on an event loop in a daemon thread."""

    def __init__(
        self,
        name: str,
        settings: SchedulerSettings,
        checks: Mapping[str, BlockingCheck],
        metrics: RpcMetrics,
    ) -> None:
        self.server = health_server(name, settings, checks, metrics)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="crm-health", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(30)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(1.0), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
