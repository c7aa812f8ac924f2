"""Running blocking work (database drivers) off the event loop."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["BlockingExecutor"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


class BlockingExecutor:
    """A bounded thread pool for blocking calls, awaited from async code.

    Size ``max_workers`` like the connection pool the calls use, so a thread never
    waits for a connection. The caller's contextvars (request id, method) are copied
    into the thread, so its log lines carry them. A call whose awaiting task is
    cancelled still runs to its end in its thread.
    """

    def __init__(self, max_workers: int, name: str = "crm-blocking") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = max_workers
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name)

    async def run(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``fn(*args, **kwargs)`` in a pool thread, in a copy of the current context."""
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await loop.run_in_executor(self._pool, call)

    def shutdown(self, wait: bool = True) -> None:
        """Refuses new work; with ``wait``, blocks until running calls end (queued ones
        are cancelled)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)

    async def aclose(self) -> None:
        """:meth:`shutdown` without blocking the event loop (for ``on_stop`` hooks)."""
        await asyncio.to_thread(self.shutdown, True)
