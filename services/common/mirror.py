"""A JetStream KV bucket mirrored in memory: the one way a service process follows a bucket.

A watch delivers the bucket's current contents, then every change, and is the mirror's one writer.
nats-py's watcher never reports its own death: when the bucket is deleted or the watch's consumer
is lost, it simply stops delivering. So the mirror checks the watch against the bucket every
`check_interval_s`: a bucket that is gone or was replaced, or a watch that stays behind the bucket's
last revision for two checks in a row, fails the watch, which its `Supervisor` logs and restarts with
backoff. A restarted watch reloads the whole bucket and reports, as changes, every key that changed
while it was away, deletions included.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

import nats.errors
import nats.js.errors
import structlog
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from herder.client.tasks import Supervisor

T = TypeVar("T")

# How often a live watch is checked against the bucket; a dead one is noticed within two checks.
CHECK_INTERVAL_S = 5.0
START_TIMEOUT_S = 10.0

Decoder = Callable[[bytes], T]
# Called with (key, before, after); None stands for "not there".
OnChange = Callable[[str, T | None, T | None], Awaitable[None]]
# Called with (held, arriving) when a write reaches a key the mirror holds; False drops the write.
Accept = Callable[[T, T], bool]


class WatchFailed(Exception):
    """The watch no longer follows the bucket (the bucket was replaced, or the watch fell behind)."""


@dataclass
class _Opened(Generic[T]):
    """A fresh watch, with the bucket's contents as it delivered them first."""

    watcher: KeyValue.KeyWatcher
    contents: dict[str, T]
    revision: int
    created: datetime | None


class KvMirror(Generic[T]):
    """The contents of one KV bucket, key -> `decode(value)`, kept current by a supervised watch.

    `on_change(key, before, after)` hears every change after the initial load, one at a time and in
    the order they arrived; a failing callback is logged, not fatal. `accept(held, arriving)` may
    drop a stale write to a key the mirror holds (deletions always apply). Entries `decode` cannot
    read are logged and skipped: the mirror keeps what it held for that key. `log_key` shortens a
    key for the logs where the key is itself sensitive (a token hash).

    The watch (task `<name>.watch`) and the delivery of changes (`<name>.changes`) run under
    `supervisor`, or under a supervisor of the mirror's own when none is given.
    """

    def __init__(
        self,
        kv: KeyValue,
        decode: Decoder[T],
        *,
        name: str,
        on_change: OnChange[T] | None = None,
        accept: Accept[T] | None = None,
        supervisor: Supervisor | None = None,
        check_interval_s: float = CHECK_INTERVAL_S,
        log_key: Callable[[str], str] = str,
        log: structlog.stdlib.BoundLogger | None = None,
    ) -> None:
        self._kv = kv
        self._decode = decode
        self._name = name
        self._on_change = on_change
        self._accept = accept
        self._shared = supervisor
        self._supervisor: Supervisor | None = None
        self._check_interval_s = check_interval_s
        self._log_key = log_key
        base = log if log is not None else structlog.get_logger("herder.mirror")
        self._log: structlog.stdlib.BoundLogger = base.bind(mirror=name)
        self._entries: dict[str, T] = {}
        self._revision = 0
        self._changes: asyncio.Queue[tuple[str, T | None, T | None]] = asyncio.Queue()
        self._handover: _Opened[T] | None = None

    @property
    def bucket(self) -> KeyValue:
        """The bucket this mirror follows."""
        return self._kv

    @property
    def watch_task(self) -> str:
        """The name of the watch's task in the supervisor's `states()`."""
        return f"{self._name}.watch"

    @property
    def _changes_task(self) -> str:
        return f"{self._name}.changes"

    async def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Load the bucket's current contents and start following it; return once they are loaded.

        A bucket that cannot be read now raises here (as does one that takes longer than `timeout`
        seconds), rather than being retried in the background: the caller is starting up and should
        hear why it cannot."""
        if self._supervisor is not None:
            raise RuntimeError(f"mirror {self._name} is already started; stop it before starting it again")
        opened = await asyncio.wait_for(self._open(), timeout)
        self._entries, self._revision = opened.contents, opened.revision
        self._changes = asyncio.Queue()
        self._handover = opened
        supervisor = self._shared if self._shared is not None else Supervisor()
        on_change = self._on_change
        try:
            supervisor.watch(self.watch_task, self._watch)
            if on_change is not None:
                supervisor.watch(self._changes_task, lambda: self._deliver(on_change))
        except BaseException:  # a name already taken in a shared supervisor
            await supervisor.cancel(self.watch_task)
            await _stop(opened.watcher)
            self._handover = None
            raise
        self._supervisor = supervisor

    async def stop(self) -> None:
        """Stop following the bucket; what was loaded stays readable."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is None:
            return
        if supervisor is self._shared:
            await supervisor.cancel(self.watch_task)
            await supervisor.cancel(self._changes_task)
        else:
            await supervisor.stop()
        if self._handover is not None:  # stopped before the watch task first ran
            await _stop(self._handover.watcher)
            self._handover = None

    def get(self, key: str) -> T | None:
        """The value of `key` as mirrored; None may also mean "not mirrored yet"."""
        return self._entries.get(key)

    def snapshot(self) -> dict[str, T]:
        """A copy of the mirror: key -> value."""
        return dict(self._entries)

    async def fetch(self, key: str) -> T | None:
        """The value of `key` as the bucket holds it now: for an entry written a moment ago, which the
        watch may not have delivered yet. Never written to the mirror: the watch stays its one writer,
        so an older read cannot undo a newer change (a revocation, say)."""
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        try:
            return self._decode(entry.value)
        except Exception:
            return None

    # --- the watch ---

    async def _watch(self) -> None:
        opened, self._handover = self._handover, None
        if opened is None:  # a restart: load afresh, and report what changed while away
            opened = await self._open()
            self._install(opened)
            self._log.info("mirror.reloaded", keys=len(self._entries), revision=self._revision)
        try:
            await self._follow(opened)
        finally:
            await _stop(opened.watcher)

    async def _open(self) -> _Opened[T]:
        # The bucket's identity is read before the watch starts, so a replacement after it is noticed.
        status = await self._kv.status()
        watcher = await self._kv.watchall()
        try:
            contents: dict[str, T] = {}
            revision = 0
            while True:
                # Initial values arrive back to back; a silence as long as two checks is a stall.
                entry = await watcher.updates(timeout=2 * self._check_interval_s)  # type: ignore[no-untyped-call]
                if entry is None:  # the end of the initial contents
                    break
                if not isinstance(entry, KeyValue.Entry):
                    raise WatchFailed("the watch ended while loading the bucket")
                revision = max(revision, entry.revision or 0)
                value = self._read(entry)
                if value is not None:
                    contents[entry.key] = value
                elif _deleted(entry):
                    contents.pop(entry.key, None)
                elif entry.key in self._entries:  # unreadable: keep what the mirror held
                    contents[entry.key] = self._entries[entry.key]
        except BaseException:
            await _stop(watcher)
            raise
        return _Opened(watcher, contents, revision, status.stream_info.created)

    def _install(self, opened: _Opened[T]) -> None:
        """Swap in freshly loaded contents, queueing a change for every key that differs."""
        before, after = self._entries, opened.contents
        if self._accept is not None:
            for key, value in list(after.items()):
                held = before.get(key)
                if held is not None and not self._accept(held, value):
                    after[key] = held
        self._entries, self._revision = after, opened.revision
        for key in sorted(before.keys() | after.keys()):
            was, now = before.get(key), after.get(key)
            if was != now:
                self._changed(key, was, now)

    async def _follow(self, opened: _Opened[T]) -> None:
        loop = asyncio.get_running_loop()
        behind: int | None = None
        next_check = loop.time() + self._check_interval_s
        while True:
            try:
                wait_s = max(0.0, next_check - loop.time())
                entry = await opened.watcher.updates(timeout=wait_s)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                entry = None
            if entry is not None:
                if not isinstance(entry, KeyValue.Entry):
                    raise WatchFailed("the watch was stopped from outside the mirror")
                self._apply(entry)
            if loop.time() >= next_check:
                behind = await self._check(opened.created, behind)
                next_check = loop.time() + self._check_interval_s

    async def _check(self, created: datetime | None, behind: int | None) -> int | None:
        """Raise when the watch no longer follows the bucket; return the revision it must reach by
        the next check (None when it is level with the bucket)."""
        info = (await self._kv.status()).stream_info  # raises when the bucket is gone
        if created is not None and info.created is not None and info.created != created:
            raise WatchFailed("the bucket was deleted and created again")
        last = info.state.last_seq or 0
        if last < self._revision:
            raise WatchFailed(f"the bucket went back from revision {self._revision} to {last}")
        if not info.state.messages or last <= self._revision:
            return None
        if behind is not None and self._revision < behind:
            raise WatchFailed(f"the watch is stuck at revision {self._revision}; the bucket is at {last}")
        return last

    def _apply(self, entry: KeyValue.Entry) -> None:
        self._revision = max(self._revision, entry.revision or 0)
        key = entry.key
        before = self._entries.get(key)
        if _deleted(entry):
            after = None
            self._entries.pop(key, None)
        else:
            after = self._read(entry)
            if after is None:
                return
            if before is not None and self._accept is not None and not self._accept(before, after):
                return  # an older write that overtook a newer one
            self._entries[key] = after
        if before != after:
            self._changed(key, before, after)

    def _read(self, entry: KeyValue.Entry) -> T | None:
        """The entry's value, or None for a deletion or (logged) an entry that cannot be read."""
        data = entry.value
        if _deleted(entry) or not data:
            return None
        try:
            return self._decode(data)
        except Exception as exc:
            self._log.warning("mirror.unreadable_entry", key=self._log_key(entry.key), error=repr(exc))
            return None

    # --- changes ---

    def _changed(self, key: str, before: T | None, after: T | None) -> None:
        if self._on_change is not None:
            self._changes.put_nowait((key, before, after))

    async def _deliver(self, on_change: OnChange[T]) -> None:
        while True:
            key, before, after = await self._changes.get()
            try:
                await on_change(key, before, after)
            except Exception:
                self._log.exception("mirror.change_failed", key=self._log_key(key))
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A callback that swallowed the cancellation (as a failure of its own) must not keep
                # the mirror from stopping.
                raise asyncio.CancelledError


def _deleted(entry: KeyValue.Entry) -> bool:
    return entry.operation in (KV_DEL, KV_PURGE) or not entry.value


async def _stop(watcher: KeyValue.KeyWatcher) -> None:
    # The connection or the bucket may be gone already, and then there is nothing left to stop.
    with contextlib.suppress(Exception):
        await watcher.stop()  # type: ignore[no-untyped-call]
