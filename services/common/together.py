"""Group commit: concurrent requests of one kind served together, in one transaction.

Sixteen robots asking for their next item at once would otherwise pay for sixteen transactions,
each with its begin, its outbox row and its durable commit. A `Together` queues them, and one
worker serves everything queued so far in one call (`run`), which a handler writes as one
transaction; the requests that arrive meanwhile make the next batch. There is no waiting for a
batch to fill: a lone request is served at once, and batches grow only under load.

`run` answers each entry (`Entry.answer`) or refuses it (`Entry.fail`, with the error that request
alone earned: it then must have written nothing). An exception out of `run` fails every entry it
left unanswered, so a failed commit answers no one as a success.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from herder.client.tasks import Supervisor
from herder.protocol.errors import Unavailable

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class Entry(Generic[T, R]):
    """One request waiting in a `Together`, with the future its caller awaits."""

    value: T
    future: asyncio.Future[R] = field(repr=False)

    @property
    def open(self) -> bool:
        """Whether the request still waits for its answer (its caller may have given up)."""
        return not self.future.done()

    def answer(self, result: R) -> None:
        if not self.future.done():
            self.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class Together(Generic[T, R]):
    """Serves requests queued by `submit` in batches of up to `max_batch`, with up to `workers`
    batches under way at once (so that one batch's commit does not hold up the next batch)."""

    def __init__(
        self, name: str, run: Callable[[list[Entry[T, R]]], Awaitable[None]], *, max_batch: int, workers: int = 1
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.name = name
        self._run = run
        self._max_batch = max_batch
        self._workers = workers
        self._pending: collections.deque[Entry[T, R]] = collections.deque()
        self._wake = asyncio.Event()
        self._stopped = False

    def start(self, supervisor: Supervisor) -> None:
        """Serve from a task of `supervisor`, which restarts it if it ever fails."""
        self._stopped = False
        for n in range(self._workers):
            supervisor.watch(self._worker_name(n), self._serve)

    async def stop(self, supervisor: Supervisor) -> None:
        """Stop serving; requests still queued are refused as `unavailable`, to be sent again."""
        self._stopped = True
        for n in range(self._workers):
            await supervisor.cancel(self._worker_name(n))
        while self._pending:
            self._pending.popleft().fail(Unavailable("the service is stopping; send the request again"))

    async def submit(self, value: T) -> R:
        """Queue `value` and wait for its answer."""
        if self._stopped:
            raise Unavailable("the service is stopping; send the request again")
        entry: Entry[T, R] = Entry(value, asyncio.get_running_loop().create_future())
        self._pending.append(entry)
        self._wake.set()
        return await entry.future

    def _worker_name(self, n: int) -> str:
        return self.name if n == 0 else f"{self.name}.{n}"

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            if len(self._pending) <= self._max_batch:
                self._wake.clear()  # this worker takes all there is; the others may sleep
            while self._pending:
                batch: list[Entry[T, R]] = []
                while self._pending and len(batch) < self._max_batch:
                    entry = self._pending.popleft()
                    if entry.open:
                        batch.append(entry)
                if not batch:
                    continue
                try:
                    await self._run(batch)
                except asyncio.CancelledError:
                    for entry in batch:
                        entry.fail(Unavailable("the service is stopping; send the request again"))
                    raise
                except Exception as exc:
                    for entry in batch:
                        entry.fail(exc)
                for entry in batch:
                    entry.fail(RuntimeError(f"{self.name}: the batch left this request unanswered"))
