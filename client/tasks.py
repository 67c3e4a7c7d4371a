"""Background work that cannot die silently: a supervisor owning a process's long-lived tasks.

Every loop a service, a KV mirror or the robot agent runs in the background belongs to a
`Supervisor`. A failure is logged with its traceback (`task.failed`), and the work goes on: a
periodic task calls again at its next tick, a watcher is started again after a backoff. `states()`
says, per task, whether it is running, restarting (with the last error) or stopped, so that
`herder status` can show a component that keeps failing.

Work whose lifetime is one scope (the calls of one request, the tasks of one job) belongs in an
`asyncio.TaskGroup` instead; the supervisor is for what lives as long as the process.
"""

from __future__ import annotations

import asyncio
import enum
import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from herder.client.backoff import backoff

# A failed watcher waits RESTART_BASE_S before its first restart, doubling up to RESTART_MAX_S.
RESTART_BASE_S = 0.5
RESTART_MAX_S = 30.0
# A watcher that ran this long before failing counts as healthy: its backoff starts over.
RESTART_RESET_S = 60.0
# `TaskState.last_error` is one line of at most this many characters.
ERROR_LINE_CHARS = 200
# How long stopping waits for a cancelled task to end before logging it as stuck and going on.
STOP_TIMEOUT_S = 10.0

RestartDelay = Callable[[int], float]


def default_restart_delay(attempt: int) -> float:
    """The default pause before restarting a watcher after its `attempt`-th failure in a row."""
    return backoff(attempt, base_s=RESTART_BASE_S, max_s=RESTART_MAX_S)


class TaskStatus(enum.StrEnum):
    """Where a supervised task is in its life."""

    RUNNING = "running"
    RESTARTING = "restarting"  # it failed and waits for its backoff to pass
    STOPPED = "stopped"  # cancelled, or (a watcher) returned


@dataclass(frozen=True)
class TaskState:
    """One supervised task as `Supervisor.states()` reports it.

    `restarts` counts a watcher's restarts, `failures` every failure (a periodic task's failed calls
    included); `last_error` is the most recent failure, in one line, and stays after a recovery, with
    `last_error_at` saying when it happened."""

    name: str
    status: TaskStatus
    restarts: int = 0
    failures: int = 0
    last_error: str | None = None
    last_error_at: datetime | None = None


@dataclass
class _Record:
    name: str
    status: TaskStatus = TaskStatus.RUNNING
    restarts: int = 0
    failures: int = 0
    last_error: str | None = None
    last_error_at: datetime | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = error_line(exc)
        self.last_error_at = datetime.now(UTC)

    def state(self) -> TaskState:
        return TaskState(self.name, self.status, self.restarts, self.failures, self.last_error, self.last_error_at)


def error_line(exc: BaseException) -> str:
    """An exception in one short line: its type, and the first line of its message."""
    message = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
    return line if len(line) <= ERROR_LINE_CHARS else line[: ERROR_LINE_CHARS - 1] + "…"


def _cancelled_by_owner() -> bool:
    """Whether the current task is being cancelled, as opposed to an awaited future having been
    cancelled under it: only the first is the way a supervised task is meant to end."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _stop_if_cancelled() -> None:
    """End a loop whose cancellation was swallowed below it (Python 3.11's `wait_for` can do that
    when what it waits for completes in the same instant); otherwise its owner would wait forever."""
    if _cancelled_by_owner():
        raise asyncio.CancelledError


class Supervisor:
    """Owns a process's long-lived background tasks, each under a unique name: logs their failures,
    restarts them, reports their states, and stops them all.

    `restart_delay(n)` is the pause in seconds before restarting a watcher after its n-th failure in
    a row (by default `backoff` from RESTART_BASE_S to RESTART_MAX_S with equal jitter); a run that
    lasted `restart_reset_s` or more before failing starts the count over. Tests inject tiny values.
    """

    def __init__(
        self,
        *,
        restart_delay: RestartDelay = default_restart_delay,
        restart_reset_s: float = RESTART_RESET_S,
        log: structlog.stdlib.BoundLogger | None = None,
    ) -> None:
        self._restart_delay = restart_delay
        self._restart_reset_s = restart_reset_s
        self._log: structlog.stdlib.BoundLogger = log if log is not None else structlog.get_logger("herder.tasks")
        self._records: dict[str, _Record] = {}
        self._stopped = False

    def watch(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run `run()`, a long-running coroutine, until stopped; start it again whenever it fails.

        A failure (any exception but our own cancellation) is logged as `task.failed` with its
        traceback and the restart count; the task then shows as restarting until the backoff has
        passed and `run()` is called afresh. A `run()` that returns normally has finished what it was
        for and is not restarted (restarting it would turn a deliberate end into a busy loop); that
        is logged as `task.ended` and the task shows as stopped. Work that must never end should
        raise when it finds itself ending.
        """
        record = self._register(name)
        record.task = asyncio.create_task(self._supervise(record, run), name=name)

    def periodic(
        self, name: str, fn: Callable[[], Awaitable[object]], interval_s: float, *, start_now: bool = False
    ) -> None:
        """Call `fn()` every `interval_s` seconds until stopped; a failed call is logged as
        `task.failed` with its traceback, and the next call comes at the next tick all the same.

        The interval runs from the end of one call to the start of the next, so calls never overlap.
        The first call comes after one interval, or at once with `start_now`.
        """
        record = self._register(name)
        record.task = asyncio.create_task(self._repeat(record, fn, interval_s, start_now), name=name)

    def states(self) -> dict[str, TaskState]:
        """Every task by name, in the order they were added: running, restarting or stopped."""
        return {name: record.state() for name, record in self._records.items()}

    async def cancel(self, name: str) -> None:
        """Stop one task and wait for it to end; it stays in `states()` as stopped. Unknown names are
        ignored, so that a component may stop what it may not have started."""
        record = self._records.get(name)
        if record is not None and record.task is not None:
            await _cancel(record.task)
            record.status = TaskStatus.STOPPED

    async def stop(self) -> None:
        """Cancel every task and wait for them to end. The supervisor takes no new tasks afterwards."""
        self._stopped = True
        tasks = [record.task for record in self._records.values() if record.task is not None]
        await asyncio.gather(*(_cancel(task) for task in tasks))
        for record in self._records.values():
            record.status = TaskStatus.STOPPED

    def _register(self, name: str) -> _Record:
        if self._stopped:
            raise RuntimeError(f"cannot start task {name!r}: this supervisor is stopped; create a new Supervisor")
        known = self._records.get(name)
        if known is not None and known.task is not None and not known.task.done():
            raise ValueError(f"a task named {name!r} is already running; cancel it first or choose another name")
        record = _Record(name)
        self._records[name] = record
        return record

    async def _supervise(self, record: _Record, run: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        in_a_row = 0
        while True:
            _stop_if_cancelled()
            record.status = TaskStatus.RUNNING
            started = loop.time()
            try:
                await run()
            except asyncio.CancelledError as exc:
                if _cancelled_by_owner():
                    raise
                failure: BaseException = exc
            except Exception as exc:
                failure = exc
            else:
                record.status = TaskStatus.STOPPED
                self._log.info("task.ended", task=record.name, restarts=record.restarts)
                return
            in_a_row = 1 if loop.time() - started >= self._restart_reset_s else in_a_row + 1
            pause_s = self._restart_delay(in_a_row)
            record.failed(failure)
            record.restarts += 1
            record.status = TaskStatus.RESTARTING
            self._log.error(
                "task.failed",
                task=record.name,
                restarts=record.restarts,
                retry_in_s=round(pause_s, 3),
                exc_info=failure,
            )
            await asyncio.sleep(pause_s)

    async def _repeat(
        self, record: _Record, fn: Callable[[], Awaitable[object]], interval_s: float, start_now: bool
    ) -> None:
        if not start_now:
            await asyncio.sleep(interval_s)
        while True:
            _stop_if_cancelled()
            try:
                await fn()
            except asyncio.CancelledError as exc:
                if _cancelled_by_owner():
                    raise
                self._failed_call(record, exc)
            except Exception as exc:
                self._failed_call(record, exc)
            await asyncio.sleep(interval_s)

    def _failed_call(self, record: _Record, exc: BaseException) -> None:
        record.failed(exc)
        self._log.error("task.failed", task=record.name, failures=record.failures, exc_info=exc)


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait for it to end, for at most STOP_TIMEOUT_S: a task that will not end
    is logged with where it is stuck and left behind, so that stopping never hangs."""
    task.cancel()
    # Our own cancellation ends the task; anything else it raised has already been logged.
    await asyncio.wait([task], timeout=STOP_TIMEOUT_S)
    if not task.done():
        stack = io.StringIO()
        task.print_stack(limit=8, file=stack)
        structlog.get_logger("herder").error(
            "task.stuck", task=task.get_name(), waited_s=STOP_TIMEOUT_S, stack=stack.getvalue()
        )
        task.cancel()
    elif not task.cancelled():
        task.exception()  # retrieved, so that asyncio does not warn of it
