"""The supervisor: failures logged with their traceback and survived, states reported, a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs
from structlog.typing import EventDict

from herder.client import tasks
from herder.client.tasks import Supervisor, TaskStatus, error_line
from tests.support import eventually

TICK_S = 0.001


def quick(attempt: int) -> float:
    """A restart delay fit for a unit test."""
    return TICK_S


@pytest.fixture
async def supervisor() -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(restart_delay=quick)
    try:
        yield supervisor
    finally:
        await supervisor.stop()


def failures(logs: list[EventDict]) -> list[EventDict]:
    return [entry for entry in logs if entry["event"] == "task.failed"]


async def test_a_failing_watcher_is_logged_with_its_traceback_and_started_again(supervisor: Supervisor) -> None:
    runs = 0
    healthy = asyncio.Event()

    async def watcher() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise ConnectionError(f"lost the bucket, run {runs}")
        healthy.set()
        await asyncio.Event().wait()

    with capture_logs() as logs:
        supervisor.watch("mirror.watch", watcher)
        await asyncio.wait_for(healthy.wait(), 5.0)

    failed = failures(logs)
    assert [(entry["task"], entry["restarts"], entry["log_level"]) for entry in failed] == [
        ("mirror.watch", 1, "error"),
        ("mirror.watch", 2, "error"),
    ]
    assert all(isinstance(entry["exc_info"], ConnectionError) for entry in failed)  # the traceback rides along
    state = supervisor.states()["mirror.watch"]
    assert (state.status, state.restarts, state.failures) == (TaskStatus.RUNNING, 2, 2)
    assert state.last_error == "ConnectionError: lost the bucket, run 2"
    assert state.last_error_at is not None


async def test_states_show_a_watcher_restarting_with_its_error_in_one_line() -> None:
    supervisor = Supervisor(restart_delay=lambda attempt: 60.0)  # it stays restarting while we look

    async def watcher() -> None:
        raise RuntimeError("bucket HERDER_ROBOTS not found\nsecond line of detail")

    def restarting() -> bool:
        return supervisor.states()["directory.watch"].status is TaskStatus.RESTARTING

    supervisor.watch("directory.watch", watcher)
    try:
        await eventually(restarting, interval=TICK_S)
        state = supervisor.states()["directory.watch"]
        assert state.restarts == 1
        assert state.last_error == "RuntimeError: bucket HERDER_ROBOTS not found"
    finally:
        await supervisor.stop()
    assert supervisor.states()["directory.watch"].status is TaskStatus.STOPPED


async def test_backoff_grows_with_failures_in_a_row_and_starts_over_after_a_healthy_run() -> None:
    asked: list[int] = []

    def delay(attempt: int) -> float:
        asked.append(attempt)
        return TICK_S

    async def fails_at_once() -> None:
        raise OSError("down")

    brittle = Supervisor(restart_delay=delay, restart_reset_s=60.0)
    brittle.watch("brittle", fails_at_once)
    await eventually(lambda: len(asked) >= 4, interval=TICK_S)
    await brittle.stop()
    assert asked[:4] == [1, 2, 3, 4]

    asked.clear()
    # Every run counts as healthy when any run is long enough: each failure is a first one.
    forgiving = Supervisor(restart_delay=delay, restart_reset_s=0.0)
    forgiving.watch("forgiving", fails_at_once)
    await eventually(lambda: len(asked) >= 4, interval=TICK_S)
    await forgiving.stop()
    assert set(asked) == {1}


async def test_a_periodic_task_survives_a_failing_call(supervisor: Supervisor) -> None:
    calls = 0

    async def sweep() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ValueError("the database blinked")

    with capture_logs() as logs:
        supervisor.periodic("jobs.sweep", sweep, TICK_S)
        await eventually(lambda: calls >= 4, interval=TICK_S)

    failed = failures(logs)
    assert [(entry["task"], entry["failures"]) for entry in failed] == [("jobs.sweep", 1)]
    assert isinstance(failed[0]["exc_info"], ValueError)
    state = supervisor.states()["jobs.sweep"]
    assert (state.status, state.failures, state.restarts) == (TaskStatus.RUNNING, 1, 0)
    assert state.last_error == "ValueError: the database blinked"


async def test_a_periodic_task_waits_one_interval_unless_told_to_start_now(supervisor: Supervisor) -> None:
    calls: list[str] = []

    async def call(name: str) -> None:
        calls.append(name)

    supervisor.periodic("later", lambda: call("later"), 60.0)
    supervisor.periodic("now", lambda: call("now"), 60.0, start_now=True)
    await eventually(lambda: "now" in calls, interval=TICK_S)
    assert calls == ["now"]


async def test_stop_ends_every_task_and_no_cancellation_is_logged_as_a_failure() -> None:
    supervisor = Supervisor(restart_delay=quick)
    started = asyncio.Event()
    cancelled: list[str] = []

    async def watcher() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append("watcher")
            raise

    async def tick() -> None:
        await asyncio.sleep(0)

    with capture_logs() as logs:
        supervisor.watch("watcher", watcher)
        supervisor.periodic("ticker", tick, TICK_S, start_now=True)
        await asyncio.wait_for(started.wait(), 5.0)
        await supervisor.stop()

    assert cancelled == ["watcher"]
    assert {name: state.status for name, state in supervisor.states().items()} == {
        "watcher": TaskStatus.STOPPED,
        "ticker": TaskStatus.STOPPED,
    }
    assert failures(logs) == []
    assert not [task for task in asyncio.all_tasks() if task.get_name() in {"watcher", "ticker"}]
    with pytest.raises(RuntimeError, match="supervisor is stopped"):
        supervisor.watch("late", watcher)


async def test_a_watcher_that_returns_has_finished_and_is_not_restarted(supervisor: Supervisor) -> None:
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    with capture_logs() as logs:
        supervisor.watch("once", once)
        await eventually(lambda: supervisor.states()["once"].status is TaskStatus.STOPPED, interval=TICK_S)

    # The restart would run in the same asyncio task, which has ended.
    assert not [task for task in asyncio.all_tasks() if task.get_name() == "once"]
    assert runs == 1
    assert [entry["event"] for entry in logs] == ["task.ended"]


async def test_a_stray_cancellation_inside_a_watcher_is_a_failure_not_a_silent_end(supervisor: Supervisor) -> None:
    runs = 0

    async def watcher() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            # A future cancelled under us (a library's internal task, say): not our owner stopping us.
            raise asyncio.CancelledError
        await asyncio.Event().wait()

    with capture_logs() as logs:
        supervisor.watch("watcher", watcher)
        await eventually(lambda: runs == 2, interval=TICK_S)

    assert [entry["restarts"] for entry in failures(logs)] == [1]
    assert supervisor.states()["watcher"].last_error == "CancelledError"


async def test_one_task_can_be_cancelled_and_its_name_taken_again(supervisor: Supervisor) -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    supervisor.watch("mirror.watch", forever)
    with pytest.raises(ValueError, match="already running"):
        supervisor.watch("mirror.watch", forever)
    supervisor.watch("other", forever)

    await supervisor.cancel("mirror.watch")
    await supervisor.cancel("never-started")
    states = supervisor.states()
    assert (states["mirror.watch"].status, states["other"].status) == (TaskStatus.STOPPED, TaskStatus.RUNNING)

    supervisor.watch("mirror.watch", forever)
    assert supervisor.states()["mirror.watch"].status is TaskStatus.RUNNING


async def test_a_periodic_task_whose_cancellation_is_swallowed_still_ends() -> None:
    """Something under the task catches the cancellation and returns (as Python 3.11's `wait_for`
    may): the loop sees that it is being cancelled and ends instead of ticking on."""
    supervisor = Supervisor(restart_delay=quick)
    inside = asyncio.Event()

    async def tick() -> None:
        inside.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return  # swallowed

    supervisor.periodic("sweep", tick, TICK_S, start_now=True)
    await asyncio.wait_for(inside.wait(), 5.0)
    await asyncio.wait_for(supervisor.stop(), 5.0)
    assert supervisor.states()["sweep"].status is TaskStatus.STOPPED


async def test_a_task_that_will_not_end_is_logged_as_stuck_and_stopping_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks, "STOP_TIMEOUT_S", 0.05)
    supervisor = Supervisor(restart_delay=quick)
    inside = asyncio.Event()
    release = asyncio.Event()

    async def stubborn() -> None:
        inside.set()
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    supervisor.watch("stubborn", stubborn)
    await asyncio.wait_for(inside.wait(), 5.0)
    with capture_logs() as logs:
        await asyncio.wait_for(supervisor.stop(), 5.0)
    stuck = [entry for entry in logs if entry["event"] == "task.stuck"]
    assert [entry["task"] for entry in stuck] == ["stubborn"] and "stubborn" in stuck[0]["stack"]
    release.set()  # let it end, so that the test leaves no task behind


def test_an_error_line_is_one_short_line() -> None:
    assert error_line(KeyError("x")) == "KeyError: 'x'"
    assert error_line(TimeoutError()) == "TimeoutError"
    long = error_line(RuntimeError("y" * 500))
    assert len(long) == 200
    assert long.endswith("…")
