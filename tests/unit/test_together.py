"""Group commit: concurrent requests served in batches, each answered or refused on its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from herder.client.tasks import Supervisor
from herder.protocol.errors import Conflict, Unavailable
from herder.services.common.together import Entry, Together


@pytest.fixture
async def supervisor() -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(restart_delay=lambda attempt: 0.001)
    try:
        yield supervisor
    finally:
        await supervisor.stop()


class Doubler:
    """A `run` that answers each value twice over, records its batches, and can be held back."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.running = 0
        self.most_at_once = 0

    async def __call__(self, entries: list[Entry[int, int]]) -> None:
        self.batches.append([entry.value for entry in entries])
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        for entry in entries:
            if entry.value < 0:
                entry.fail(Conflict(f"{entry.value} is negative"))
            else:
                entry.answer(entry.value * 2)


async def test_a_lone_request_is_served_at_once(supervisor: Supervisor) -> None:
    run = Doubler()
    together = Together("t", run, max_batch=8)
    together.start(supervisor)
    assert await asyncio.wait_for(together.submit(21), 1.0) == 42
    assert run.batches == [[21]]


async def test_requests_arriving_while_a_batch_runs_make_the_next_batch(supervisor: Supervisor) -> None:
    run = Doubler()
    run.gate.clear()
    together = Together("t", run, max_batch=3)
    together.start(supervisor)
    first = asyncio.ensure_future(together.submit(1))
    await asyncio.sleep(0.01)  # the first batch is under way, held at the gate
    rest = [asyncio.ensure_future(together.submit(n)) for n in range(2, 7)]
    await asyncio.sleep(0.01)
    run.gate.set()
    assert await asyncio.gather(first, *rest) == [2, 4, 6, 8, 10, 12]
    assert run.batches == [[1], [2, 3, 4], [5, 6]]  # at most max_batch at a time, in arrival order


async def test_a_refused_request_fails_alone(supervisor: Supervisor) -> None:
    run = Doubler()
    run.gate.clear()
    together = Together("t", run, max_batch=8)
    together.start(supervisor)
    blocker = asyncio.ensure_future(together.submit(0))
    await asyncio.sleep(0.01)
    good, bad = asyncio.ensure_future(together.submit(5)), asyncio.ensure_future(together.submit(-1))
    await asyncio.sleep(0.01)
    run.gate.set()
    assert await blocker == 0
    assert await good == 10
    with pytest.raises(Conflict, match="-1 is negative"):
        await bad
    assert run.batches[-1] == [5, -1]


async def test_a_failed_batch_fails_every_request_in_it_and_the_next_is_served(supervisor: Supervisor) -> None:
    calls = 0

    async def flaky(entries: list[Entry[int, int]]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the commit failed")
        for entry in entries:
            entry.answer(entry.value)

    together: Together[int, int] = Together("t", flaky, max_batch=8)
    together.start(supervisor)
    with pytest.raises(RuntimeError, match="the commit failed"):
        await together.submit(1)
    assert await together.submit(2) == 2


async def test_a_request_the_batch_forgets_is_not_left_waiting(supervisor: Supervisor) -> None:
    async def forgetful(entries: list[Entry[int, int]]) -> None:
        for entry in entries:
            if entry.value == 1:
                entry.answer(1)

    together: Together[int, int] = Together("t", forgetful, max_batch=8)
    together.start(supervisor)
    assert await together.submit(1) == 1
    with pytest.raises(RuntimeError, match="left this request unanswered"):
        await asyncio.wait_for(together.submit(2), 1.0)


async def test_a_caller_that_gave_up_is_left_out_of_the_batch(supervisor: Supervisor) -> None:
    run = Doubler()
    run.gate.clear()
    together = Together("t", run, max_batch=8)
    together.start(supervisor)
    blocker = asyncio.ensure_future(together.submit(0))
    await asyncio.sleep(0.01)
    gone = asyncio.ensure_future(together.submit(7))
    kept = asyncio.ensure_future(together.submit(8))
    await asyncio.sleep(0.01)
    gone.cancel()
    run.gate.set()
    assert await kept == 16
    assert await blocker == 0
    assert run.batches == [[0], [8]]


async def test_several_workers_run_batches_side_by_side(supervisor: Supervisor) -> None:
    run = Doubler()
    run.gate.clear()
    together = Together("t", run, max_batch=1, workers=3)
    together.start(supervisor)
    waiting = [asyncio.ensure_future(together.submit(n)) for n in range(6)]
    await asyncio.sleep(0.05)
    assert run.running == 3
    run.gate.set()
    assert await asyncio.gather(*waiting) == [0, 2, 4, 6, 8, 10]
    assert run.most_at_once == 3


async def test_stopping_refuses_what_is_queued_and_what_comes_after(supervisor: Supervisor) -> None:
    run = Doubler()
    run.gate.clear()
    together = Together("t", run, max_batch=1)
    together.start(supervisor)
    running = asyncio.ensure_future(together.submit(1))
    await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(together.submit(2))
    await asyncio.sleep(0.01)
    await together.stop(supervisor)
    for waiting in (running, queued):
        with pytest.raises(Unavailable, match="stopping"):
            await waiting
    with pytest.raises(Unavailable, match="stopping"):
        await together.submit(3)


def test_limits_are_checked() -> None:
    async def run(entries: list[Entry[int, int]]) -> None: ...

    with pytest.raises(ValueError, match="max_batch"):
        Together("t", run, max_batch=0)
    with pytest.raises(ValueError, match="workers"):
        Together("t", run, max_batch=1, workers=0)
