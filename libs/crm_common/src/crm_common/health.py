"""Health-only servers for processes that serve no RPCs of their own (the scheduler's
pump and workers, bilog's file sink): a :class:`~crm_common.server.GrpcServer` with the
standard gRPC health service (plus reflection and ``/metrics``), so a Kubernetes
``grpc`` probe works on them like on every CRM server.

Their checks are blocking callables (a database ping, a Kafka metadata request), each
run in a thread. A process whose main thread is taken (a Celery worker, a Kafka
consumer loop) runs the server on an event loop of its own with :class:`HealthThread`::

    health = HealthThread("crm.bilog.sink", settings, {"kafka": sink.check_broker}, metrics)
    health.start()
    try:
        sink.run(stop)
    finally:
        health.stop()
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping

from crm_common.metrics import RpcMetrics
from crm_common.server import GrpcServer
from crm_common.settings import ServiceSettings

__all__ = ["BlockingCheck", "HealthThread", "health_server"]

BlockingCheck = Callable[[], None]
"""Returns when the dependency answers, raises when it does not (may block)."""


def _in_thread(check: BlockingCheck) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await asyncio.to_thread(check)

    return run


def health_server(
    name: str,
    settings: ServiceSettings,
    checks: Mapping[str, BlockingCheck],
    metrics: RpcMetrics,
    *,
    liveness_checks: Mapping[str, BlockingCheck] | None = None,
) -> GrpcServer:
    """A health-only server for health name ``name`` on ``settings.port`` (and
    ``/metrics`` on ``settings.metrics_port``): ``name`` and ``""`` are SERVING while
    every one of ``checks`` passes, ``liveness`` while every one of ``liveness_checks``
    does (see :class:`~crm_common.server.GrpcServer`)."""
    return GrpcServer(
        [name],
        settings,
        readiness_checks={k: _in_thread(c) for k, c in checks.items()},
        liveness_checks={k: _in_thread(c) for k, c in (liveness_checks or {}).items()},
        metrics=metrics,
    )


class HealthThread:
    """Runs :func:`health_server` on an event loop in a daemon thread."""

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        checks: Mapping[str, BlockingCheck],
        metrics: RpcMetrics,
        *,
        liveness_checks: Mapping[str, BlockingCheck] | None = None,
    ) -> None:
        self.server = health_server(
            name, settings, checks, metrics, liveness_checks=liveness_checks
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="crm-health", daemon=True
        )

    @property
    def port(self) -> int | None:
        """The bound gRPC health port (after :meth:`start`)."""
        return self.server.port

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
