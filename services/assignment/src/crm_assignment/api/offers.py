"""Wake-ups of the offer streams and the one-stream-per-agent registry (event loop only).

Every connected agent's StreamOffers handler is its own dispatcher: it calls
``store.offer_next`` until nothing is offered, then waits in :meth:`OfferHub.wait` until
it is woken or ``dispatch_poll_s`` passes (the poll covers changes made through other
replicas and revisits becoming due).

Who is woken:

- a task entering a line's queue (new or merged clue, reject, timeout) wakes *one*
  waiting stream of that line, the one waiting longest (so the longest-idle agent looks
  first), handing it a baton: if it finds nothing it can take (skills, capacity) it wakes
  the next waiting stream, at most once around the line, unless the store saw no task
  waiting in the line at all (taken meanwhile by another stream, e.g. the one of an agent
  who just completed a task: passing on would only cost a dispatch transaction per
  stream). Waking every stream of the line
  instead would cost one dispatch transaction per connected agent per new task. When no
  stream of the line is waiting (all are busy asking the store), the wake-up is kept and
  the next stream that would wait goes round once more instead;
- one agent's stream: capacity freed (complete, fail, cancel), presence set to IDLE,
  profile changed;
- every stream: a routing config change, shutdown, a replacing stream (the old one).

A stream clears its own wake-up flag *before* it asks the store (:meth:`OfferStream.arm`),
so a wake-up that arrives while the store call runs (or while its request waits for the
next dispatch batch, whose routing config and time are read when it starts) is not lost:
the stream asks again at once instead of waiting. Everything here runs on the event loop,
so arming, waking and the check before waiting never interleave. A line wake-up goes to a
waiting stream or is kept for the next stream that would wait (``_pending``); a stream
that cannot use it passes it on (at most once around the line, and not when the line was
empty), and so does a stream that ended before using it (:meth:`OfferHub.close`). A stream
whose candidates were all held by another transaction (``NoOffer.CONTENDED``: nobody may
wake it when that transaction ends) looks again after ``CONTENDED_RETRY_S``. The
``dispatch_poll_s`` poll stays as the backstop (changes through other replicas, revisits
when no scheduler calls WakeRevisit, and the end of a revisit's reservation for its agent
after a restart: WakeRevisit wakes the line again when the reservation ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from crm_assignment.domain.model import BusinessLine

__all__ = ["CONTENDED_RETRY_S", "OfferHub", "OfferStream"]

log = logging.getLogger("crm.assignment.offers")

HANDOVER_TIMEOUT_S = 5.0
"""How long a new stream waits for the stream it replaces to end."""

CONTENDED_RETRY_S = 0.1
"""How soon a stream whose candidates were all held by other transactions looks again
(capped by ``dispatch_poll_s``)."""


class OfferStream:
    """One open StreamOffers call."""

    def __init__(self, agent_id: int, line: BusinessLine) -> None:
        self.agent_id = agent_id
        self.line = line
        self.replaced = False
        self.closing = False
        self.baton = 0
        """Hops left to pass a line wake-up on when this stream finds nothing."""
        self._wake = asyncio.Event()
        self._done = asyncio.Event()

    def arm(self) -> None:
        """Forget earlier wake-ups: call right before asking the store for an offer."""
        self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    @property
    def woken(self) -> bool:
        return self._wake.is_set()

    async def _wait(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()
                return True
        return False

    def mark_done(self) -> None:
        self._done.set()

    async def wait_done(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._done.wait()


class OfferHub:
    """Registry of the open offer streams (one per agent) and their wake-ups."""

    def __init__(self) -> None:
        self._streams: dict[int, OfferStream] = {}
        self._waiting: dict[BusinessLine, dict[int, OfferStream]] = {}  # FIFO by insertion
        self._pending: dict[BusinessLine, int] = {}
        self._closing = False

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def closing(self) -> bool:
        return self._closing

    def waiting(self, line: BusinessLine) -> int:
        """How many streams of the line wait for a line wake-up (tests, diagnostics)."""
        return len(self._waiting.get(line, {}))

    def _line_size(self, line: BusinessLine) -> int:
        return sum(1 for s in self._streams.values() if s.line == line)

    # ------------------------------------------------------------------ streams

    async def open(self, agent_id: int, line: BusinessLine) -> OfferStream:
        """Register a stream for the agent; an older one is told to end (ABORTED) and
        awaited briefly, so the new stream starts after it (no offer falls between)."""
        stream = OfferStream(agent_id, line)
        stream.closing = self._closing
        old = self._streams.get(agent_id)
        self._streams[agent_id] = stream
        if old is not None:
            log.info("offer stream replaced by a newer one", extra={"agent_id": agent_id})
            old.replaced = True
            old.wake()
            await old.wait_done(HANDOVER_TIMEOUT_S)
        return stream

    def close(self, stream: OfferStream) -> None:
        """Unregister (when still registered) and mark the stream ended. A line wake-up
        it was handed and did not use (it ended instead: replaced, an error, the client
        gone) goes to another stream of the line, as if the task had just come in."""
        if self._streams.get(stream.agent_id) is stream:
            del self._streams[stream.agent_id]
        waiting = self._waiting.get(stream.line, {})
        if waiting.get(stream.agent_id) is stream:
            del waiting[stream.agent_id]
        stream.mark_done()
        if stream.baton > 0 and not self._closing:
            stream.baton = 0
            self.task_waiting(stream.line)

    async def wait(self, stream: OfferStream, timeout: float, line_wakes: bool = True) -> bool:
        """Wait until the stream is woken (True) or ``timeout`` passes (False). Without
        ``line_wakes`` (the agent is full) only wake-ups of this agent count."""
        if stream.woken:
            return True
        if not line_wakes:
            return await stream._wait(timeout)
        line = stream.line
        if self._pending.get(line, 0) > 0:  # a line wake-up nobody was waiting for
            self._pending[line] -= 1
            stream.baton = self._line_size(line)
            return True
        waiting = self._waiting.setdefault(line, {})
        waiting[stream.agent_id] = stream
        try:
            return await stream._wait(timeout)
        finally:
            if waiting.get(stream.agent_id) is stream:
                del waiting[stream.agent_id]

    def found_nothing(self, stream: OfferStream, line_empty: bool = False) -> None:
        """The stream asked the store and got no offer: pass its baton on, if any, unless
        nothing waits in the line at all (``line_empty``: the task that woke it was taken
        by another stream, so every other stream would find nothing too)."""
        hops, stream.baton = stream.baton, 0
        if hops > 1 and not line_empty:
            self._wake_waiting(stream.line, hops - 1)

    # ------------------------------------------------------------------ wake-ups

    def _wake_waiting(self, line: BusinessLine, baton: int) -> bool:
        waiting = self._waiting.get(line)
        if not waiting:
            return False
        agent_id = next(iter(waiting))
        stream = waiting.pop(agent_id)
        stream.baton = baton
        stream.wake()
        return True

    def task_waiting(self, line: BusinessLine, count: int = 1) -> None:
        """``count`` tasks entered the line's queue: wake that many waiting streams."""
        size = self._line_size(line)
        for _ in range(count):
            if not self._wake_waiting(line, size):
                self._pending[line] = min(self._pending.get(line, 0) + 1, size)

    def wake_agent(self, agent_id: int, line: BusinessLine | None = None) -> None:
        """Wake the agent's stream; ``line`` records a changed business line."""
        stream = self._streams.get(agent_id)
        if stream is None:
            return
        if line is not None and line != stream.line:
            waiting = self._waiting.get(stream.line, {})
            if waiting.get(agent_id) is stream:
                del waiting[agent_id]
            stream.line = line
        stream.wake()

    def wake_all(self) -> None:
        for stream in self._streams.values():
            stream.wake()

    def shutdown(self) -> None:
        """Tell every stream to end (the server is stopping); new ones end at once."""
        self._closing = True
        for stream in self._streams.values():
            stream.closing = True
            stream.wake()
