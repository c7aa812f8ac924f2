"""``GrpcServer``: one grpc.aio server with health, reflection, metrics, readiness and a
graceful stop; a service's ``__main__`` only wires its dependencies into it::

    async def main() -> None:
        settings = Settings()
        configure_logging("assignment", settings.log_level)
        deps = await build_deps(settings)  # pools, clients
        server = GrpcServer(
            [assignment_pb2.DESCRIPTOR.services_by_name["AssignmentService"].full_name],
            settings,
            [(add_AssignmentServiceServicer_to_server, AssignmentApi(deps))],
            readiness_checks={"mysql": deps.db.ping, "etcd": deps.config.ping},
            metrics=RpcMetrics("assignment"),
        )
        server.on_stop.append(deps.aclose)
        await server.run_until_signal()

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from grpc import aio
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # == health.aio.HealthServicer (no stubs)
from grpc_reflection.v1alpha import reflection

from crm_common.interceptors import ServerInterceptor
from crm_common.metrics import RpcMetrics
from crm_common.settings import ServiceSettings
from crm_common.tracing import configure_tracing, shutdown_tracing

__all__ = [
    "DEFAULT_SERVER_OPTIONS",
    "LIVENESS_SERVICE",
    "AddServicer",
    "GrpcServer",
    "ReadinessCheck",
    "Registrar",
    "StopHook",
]

ReadinessCheck = Callable[[], Awaitable[None]]
"""Returns when the dependency answers, raises when it does not."""
StopHook = Callable[[], Awaitable[None]]
"""Closes a resource once in-flight calls are drained."""
AddServicer = Callable[[Any, aio.Server], None]
"""A generated ``add_<Name>Servicer_to_server`` function."""
Registrar = Callable[[aio.Server], None]
"""Registers servicers on the server itself."""

MAX_MESSAGE_BYTES = 8 * 1024 * 1024

DEFAULT_SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Ping idle clients every minute, drop them after 20 s without an answer.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # Let clients keep idle streams (offer streams) alive with pings every >= 10 s.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Fail loudly when the port is taken instead of sharing it.
    ("grpc.so_reuseport", 0),
)

LIVENESS_SERVICE = "liveness"
"""Health name that is SERVING while the process serves at all, whatever its
dependencies: the one a liveness probe checks (a MySQL outage must not restart pods)."""

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

_log = logging.getLogger("crm_common.server")


def _bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


async def _until_terminated(server: aio.Server) -> None:
    # With a timeout grpc shields its shutdown future: cancelling this task is then safe
    # (without one, cancelling ``wait_for_termination()`` cancels the future and breaks stop).
    while await server.wait_for_termination(timeout=3600):
        pass


class GrpcServer:
    """A grpc.aio server for ``service_names`` (full names, e.g.
    ``crm.assignment.v1.AssignmentService``).

    ``start()`` binds ``settings.host:port`` (``.port`` is the bound one), serves health
    (every name and ``""`` NOT_SERVING until all ``readiness_checks`` pass, rechecked
    every ``settings.readiness_interval_s``; :data:`LIVENESS_SERVICE` is SERVING unless
    one of ``liveness_checks``, run in the same rounds, fails: give those only to a
    process whose own loop can hang, never for a dependency), reflection and ``/metrics``
    (``.metrics_port``), and installs tracing when ``settings.tracing_exporter`` asks.
    ``stop()`` drains gracefully, then runs ``on_stop`` hooks.
    The :class:`~crm_common.interceptors.ServerInterceptor` is always installed first,
    ahead of ``interceptors``.
    """

    def __init__(
        self,
        service_names: Sequence[str],
        settings: ServiceSettings,
        servicers: Iterable[tuple[AddServicer, object]] | Registrar = (),
        *,
        readiness_checks: Mapping[str, ReadinessCheck] | None = None,
        liveness_checks: Mapping[str, ReadinessCheck] | None = None,
        interceptors: Sequence[aio.ServerInterceptor[Any, Any]] = (),
        metrics: RpcMetrics | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not service_names:
            raise ValueError("at least one service name is needed")
        self.service_names = tuple(service_names)
        self.settings = settings
        self.metrics = metrics if metrics is not None else RpcMetrics(self.service_names[0])
        self.on_stop: list[StopHook] = []
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._servicers = servicers if callable(servicers) else tuple(servicers)
        self._checks = dict(readiness_checks or {})
        self._liveness_checks = dict(liveness_checks or {})
        self._alive = True
        self._interceptors = tuple(interceptors)
        self._options = tuple({**dict(DEFAULT_SERVER_OPTIONS), **dict(options)}.items())
        self._server: aio.Server | None = None
        self._health: HealthServicer | None = None
        self._readiness_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._ready = False
        self._last_state: tuple[bool, tuple[str, ...]] | None = None
        self._owns_tracing = False

    @property
    def ready(self) -> bool:
        """Whether the last readiness round passed (health reports SERVING)."""
        return self._ready

    async def start(self) -> None:
        """Binds, registers health/reflection/servicers, starts serving and the
        readiness loop and the metrics HTTP server."""
        if self._server is not None:
            raise RuntimeError("server already started")
        self._owns_tracing = configure_tracing(self.metrics.service, self.settings)
        server = aio.server(
            interceptors=[ServerInterceptor(self.metrics), *self._interceptors],
            options=self._options,
        )
        self._health = HealthServicer()
        for name in ("", *self.service_names):
            await self._health.set(name, _NOT_SERVING)
        await self._health.set(LIVENESS_SERVICE, _SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if callable(self._servicers):
            self._servicers(server)
        else:
            for add, servicer in self._servicers:
                add(servicer, server)
        reflection.enable_server_reflection(
            [*self.service_names, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        address = _bind_address(self.settings.host, self.settings.port)
        port = server.add_insecure_port(address)
        if not port:
            raise RuntimeError(f"could not bind {address}")
        await server.start()
        self._server, self.port = server, port
        if self.settings.metrics_enabled:
            host = self.settings.host.strip("[]")
            self.metrics_port = self.metrics.start_http_server(self.settings.metrics_port, host)
        self._readiness_task = asyncio.create_task(self._readiness_loop(), name="crm-readiness")
        _log.info(
            "serving %s on %s",
            ", ".join(self.service_names),
            _bind_address(self.settings.host, port),
            extra={"port": port, "metrics_port": self.metrics_port},
        )

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop (idempotent; concurrent callers wait for the same stop).

        Health turns NOT_SERVING for good; after ``settings.shutdown_delay_s`` new calls
        are refused (UNAVAILABLE; one arriving at that very instant may be CANCELLED by
        grpc core) and in-flight calls get ``grace`` seconds (default
        ``settings.shutdown_grace_s``) before they are cancelled; then the ``on_stop``
        hooks run and the metrics server stops.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(grace), name="crm-stop")
        await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float | None) -> None:
        grace = self.settings.shutdown_grace_s if grace is None else grace
        _log.info("stopping (grace %.1f s)", grace)
        if self._readiness_task is not None:
            self._readiness_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readiness_task
        self._ready = False
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.settings.shutdown_delay_s > 0:
            await asyncio.sleep(self.settings.shutdown_delay_s)
        if self._server is not None:
            await self._server.stop(grace)
        for hook in self.on_stop:
            try:
                await hook()
            except Exception:
                _log.exception("on_stop hook %r failed", hook)
        await asyncio.to_thread(self.metrics.stop_http_server)
        if self._owns_tracing:  # flush the last spans
            await asyncio.to_thread(shutdown_tracing)
        _log.info("stopped")

    async def run_until_signal(
        self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Starts (unless started), serves until one of ``signals`` arrives (or the
        server dies), then stops gracefully and returns."""
        loop = asyncio.get_running_loop()
        requested = asyncio.Event()
        for sig in signals:
            loop.add_signal_handler(sig, requested.set)
        try:
            if self._server is None:
                await self.start()
            assert self._server is not None
            waits = {
                asyncio.create_task(requested.wait()),
                asyncio.create_task(_until_terminated(self._server)),
            }
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
            if requested.is_set():
                _log.info("stop signal received")
            else:
                _log.error("gRPC server terminated unexpectedly")
        finally:
            try:
                await self.stop()
            finally:
                for sig in signals:
                    loop.remove_signal_handler(sig)

    # -- readiness ---------------------------------------------------------------------

    async def _readiness_loop(self) -> None:
        while True:
            failures = await self.check_readiness()
            await self._set_ready(not failures, failures)
            if self._liveness_checks:
                await self._set_alive(await self._failing(self._liveness_checks))
            await asyncio.sleep(self.settings.readiness_interval_s)

    async def check_readiness(self) -> dict[str, str]:
        """Runs every readiness check once (concurrently, each with
        ``settings.readiness_timeout_s``); returns ``{name: error}`` of the failing ones."""
        return await self._failing(self._checks)

    async def _failing(self, checks: Mapping[str, ReadinessCheck]) -> dict[str, str]:
        names = list(checks)
        results = await asyncio.gather(*(self._run_check(checks[n]) for n in names))
        return {name: error for name, error in zip(names, results, strict=True) if error}

    async def _set_alive(self, failures: Mapping[str, str]) -> None:
        assert self._health is not None
        alive = not failures
        await self._health.set(LIVENESS_SERVICE, _SERVING if alive else _NOT_SERVING)
        if alive != self._alive:
            self._alive = alive
            if alive:
                _log.info("alive again: %s SERVING", LIVENESS_SERVICE)
            else:
                summary = "; ".join(f"{n}: {e}" for n, e in sorted(failures.items()))
                _log.error("not alive: %s NOT_SERVING (%s)", LIVENESS_SERVICE, summary)

    async def _run_check(self, check: ReadinessCheck) -> str | None:
        timeout = self.settings.readiness_timeout_s
        try:
            await asyncio.wait_for(check(), timeout)
        except TimeoutError:
            return f"timed out after {timeout:g} s"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    async def _set_ready(self, ready: bool, failures: Mapping[str, str]) -> None:
        assert self._health is not None
        status = _SERVING if ready else _NOT_SERVING
        for name in ("", *self.service_names):
            await self._health.set(name, status)
        self._ready = ready
        state = (ready, tuple(sorted(failures)))
        if state == self._last_state:
            return
        self._last_state = state
        if ready:
            _log.info("ready: health SERVING")
        else:
            summary = "; ".join(f"{name}: {error}" for name, error in sorted(failures.items()))
            _log.warning(
                "not ready: health NOT_SERVING (%s)", summary, extra={"failing": sorted(failures)}
            )
