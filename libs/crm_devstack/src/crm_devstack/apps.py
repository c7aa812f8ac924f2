"""A service app served from a thread of its own, for synchronous tests and tools.

Every service's tests drive the real app (real gRPC socket, real databases) with plain
blocking stubs, threads and ``wait_until``; the app itself runs on an asyncio loop in a
background thread. This is that harness, once for every service::

    svc = AppThread(lambda: build_app(settings))
    stub = AssignmentServiceStub(svc.channel)
    ...
    svc.close()

The app is built inside the loop (an app's grpc.aio channels bind to the loop that
creates them). Anything with ``start()``, ``wait_ready(timeout)``, ``stop(grace)`` and a
``target`` fits (``crm_common.app.ServiceApp`` does).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

import grpc

T = TypeVar("T")


class ServedApp(Protocol):
    """What AppThread needs of an app."""

    @property
    def target(self) -> str: ...

    async def start(self) -> None: ...

    async def wait_ready(self, timeout: float = 30.0) -> None: ...

    async def stop(self, grace: float | None = None) -> None: ...


A = TypeVar("A", bound=ServedApp)


class LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and its thread (what runs on it should be stopped first)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class AppThread(LoopThread, Generic[A]):
    """``build()`` called on the loop, started, ready; ``channel`` dials it."""

    def __init__(self, build: Callable[[], A], *, stop_grace: float = 2.0) -> None:
        super().__init__()
        self.stop_grace = stop_grace
        try:
            self.app: A = self.call(self._build(build))
            self.call(self.app.start())
            self.call(self.app.wait_ready(30))
        except BaseException:
            super().close()
            raise
        self.channel = grpc.insecure_channel(self.app.target)

    @staticmethod
    async def _build(build: Callable[[], A]) -> A:
        return build()

    @property
    def target(self) -> str:
        """``host:port`` of the served app."""
        return self.app.target

    def new_channel(self) -> grpc.Channel:
        """Another channel to the app (the caller closes it)."""
        return grpc.insecure_channel(self.app.target)

    def close(self) -> None:
        """Close the channel, stop the app gracefully, then the loop."""
        self.channel.close()
        try:
            self.call(self.app.stop(self.stop_grace))
        finally:
            super().close()


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    """Call ``fn`` and return the RpcError it raises (fail when it does not)."""
    try:
        fn()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("expected an RpcError")
