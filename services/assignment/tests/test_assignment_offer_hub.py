"""OfferHub's wake-ups on their own (no database, no server): a line wake-up reaches a
stream that can use it, or is kept until one can."""

from __future__ import annotations

import asyncio

from crm_assignment.api.offers import OfferHub, OfferStream
from crm_assignment.domain.model import BusinessLine

SALE = BusinessLine.SALE
LONG = 30.0  # no test waits for it: a stream returning False here was not woken


async def _waiter(hub: OfferHub, stream: OfferStream) -> asyncio.Task[bool]:
    task = asyncio.create_task(hub.wait(stream, LONG))
    for _ in range(10):  # let it register as waiting
        await asyncio.sleep(0)
    return task


async def _line_woke_the_first_of_two() -> tuple[
    OfferHub, OfferStream, OfferStream, asyncio.Task[bool]
]:
    """Streams ``a`` then ``b`` wait on one line and a task enters it: ``a``, waiting
    longest, is woken (checked); returns the hub, ``a``, ``b`` and ``b``'s wait."""
    hub = OfferHub()
    a, b = await hub.open(1, SALE), await hub.open(2, SALE)
    wait_a = await _waiter(hub, a)
    wait_b = await _waiter(hub, b)
    hub.task_waiting(SALE)
    async with asyncio.timeout(5):
        assert await wait_a is True
    return hub, a, b, wait_b


async def test_a_wake_up_while_the_stream_asks_is_kept() -> None:
    hub = OfferHub()
    stream = await hub.open(1, SALE)
    stream.arm()  # it asks the store (a dispatch batch) ...
    hub.wake_all()  # ... and the config changes meanwhile
    async with asyncio.timeout(5):
        assert await hub.wait(stream, LONG) is True  # it asks again, without waiting


async def test_a_line_wake_up_with_nobody_waiting_goes_to_the_next_stream_to_wait() -> None:
    hub = OfferHub()
    stream = await hub.open(1, SALE)
    stream.arm()
    hub.task_waiting(SALE)  # while the only stream was asking the store
    async with asyncio.timeout(5):
        assert await hub.wait(stream, LONG) is True
    assert stream.baton == 1


async def test_the_longest_waiting_stream_is_woken_and_passes_on_what_it_cannot_take() -> None:
    hub, a, b, wait_b = await _line_woke_the_first_of_two()
    assert not wait_b.done()
    a.arm()
    hub.found_nothing(a)  # skills, presence: not a task for agent 1
    async with asyncio.timeout(5):
        assert await wait_b is True
    b.arm()
    hub.found_nothing(b)  # the baton went round once: nobody else to try
    assert b.baton == 0


async def test_an_empty_line_ends_the_round() -> None:
    hub, a, _, wait_b = await _line_woke_the_first_of_two()
    a.arm()
    hub.found_nothing(a, line_empty=True)  # taken by another stream meanwhile
    await asyncio.sleep(0)
    assert not wait_b.done()
    wait_b.cancel()


async def test_a_stream_ending_before_it_used_a_line_wake_up_passes_it_on() -> None:
    hub, a, b, wait_b = await _line_woke_the_first_of_two()
    hub.close(a)  # replaced, its client gone, an error: it never asked the store
    async with asyncio.timeout(5):
        assert await wait_b is True
    assert b.baton > 0


async def test_a_line_wake_up_kept_for_a_stream_that_ends_is_kept_for_the_next() -> None:
    hub = OfferHub()
    a, b = await hub.open(1, SALE), await hub.open(2, SALE)
    a.arm()
    b.arm()
    hub.task_waiting(SALE)  # both are asking the store
    async with asyncio.timeout(5):
        assert await hub.wait(a, LONG) is True  # a takes the kept wake-up ...
    hub.close(a)  # ... and ends before asking
    async with asyncio.timeout(5):
        assert await hub.wait(b, LONG) is True


async def test_a_line_is_its_code_not_one_object() -> None:
    """Lines are data (an int subclass, made anew from each row or request): a stream
    opened with one ``BusinessLine(1)`` and a wake-up for another are the same line."""
    hub = OfferHub()
    stream = await hub.open(1, BusinessLine(1))
    stream.arm()
    hub.task_waiting(BusinessLine(1))  # nobody waits: the wake-up must be kept
    async with asyncio.timeout(5):
        assert await hub.wait(stream, LONG) is True
    assert stream.baton == 1
    hub.wake_agent(1, BusinessLine(1))  # the same line: the stream keeps its place
    assert stream.line == SALE
