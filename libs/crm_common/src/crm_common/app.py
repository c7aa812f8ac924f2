"""``ServiceApp``: the lifecycle every service's ``App`` shares.

A service's ``App`` is a dataclass holding its resources plus ``settings`` and ``server``
(a :class:`~crm_common.server.GrpcServer`); it overrides ``start()`` to start its own
resources around ``await self.server.start()`` and, if it must, ``before_stop()`` (e.g.
end long-lived streams before the drain). Everything else — the bound port and local
target, waiting for readiness, an idempotent graceful stop, serving until SIGTERM/SIGINT,
``async with`` — lives here once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import TracebackType
from typing import Self

from crm_common.server import GrpcServer
from crm_common.settings import ServiceSettings

__all__ = ["ServiceApp", "local_target"]

log = logging.getLogger("crm_common.app")


def local_target(host: str, port: int) -> str:
    """``host:port`` to dial a server bound to ``host`` from this machine."""
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class ServiceApp:
    """Base of every service's ``App`` (see the module docstring)."""

    settings: ServiceSettings
    server: GrpcServer
    _stopped: bool = False

    @property
    def port(self) -> int:
        """The bound gRPC port (after start)."""
        if self.server.port is None:
            raise RuntimeError("the app is not started")
        return self.server.port

    @property
    def target(self) -> str:
        """``host:port`` to dial the started app locally."""
        return local_target(self.settings.host, self.port)

    async def start(self) -> None:
        """Start serving; services start their own resources around this."""
        await self.server.start()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every readiness check passes (what the health service waits for)."""
        async with asyncio.timeout(timeout):
            while True:
                if not await self.server.check_readiness():
                    return
                await asyncio.sleep(0.05)

    async def before_stop(self) -> None:
        """Hook run once before the server drains (nothing by default)."""

    async def stop(self, grace: float | None = None) -> None:
        """``before_stop()``, then drain the server and run its stop hooks (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        await self.before_stop()
        await self.server.stop(grace)

    async def run_until_signal(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop gracefully."""
        loop = asyncio.get_running_loop()
        requested = asyncio.Event()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, requested.set)
        try:
            await self.start()
            await requested.wait()
            log.info("stop signal received")
        finally:
            try:
                await self.stop()
            finally:
                for sig in signals:
                    loop.remove_signal_handler(sig)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
