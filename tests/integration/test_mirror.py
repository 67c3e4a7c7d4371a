"""The KV mirror on a real bus: it loads and follows a bucket, and survives the bucket's deletion."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from structlog.testing import capture_logs

from herder.client.tasks import Supervisor, TaskStatus
from herder.protocol import codec
from herder.protocol.messages import Model
from herder.services.common.mirror import KvMirror
from tests.support import eventually

BUCKET = "HERDER_MIRROR_TEST"
CHECK_INTERVAL_S = 0.05
RESTART_DELAY_S = 0.05


class Note(Model):
    """What the test bucket holds."""

    text: str
    seq: int = 0


Change = tuple[str, Note | None, Note | None]


def note(text: str, seq: int = 0) -> bytes:
    return codec.dump(Note(text=text, seq=seq))


def read_note(data: bytes) -> Note:
    return codec.load(Note, data)


def newer(held: Note, arriving: Note) -> bool:
    return arriving.seq >= held.seq


class Recorder:
    """An on_change callback that remembers what it heard."""

    def __init__(self) -> None:
        self.changes: list[Change] = []

    async def __call__(self, key: str, before: Note | None, after: Note | None) -> None:
        self.changes.append((key, before, after))


@pytest.fixture
def js(nc: NATS) -> JetStreamContext:
    return nc.jetstream()


@pytest.fixture
async def kv(js: JetStreamContext) -> KeyValue:
    return await js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1))


@pytest.fixture
async def supervisor() -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(restart_delay=lambda attempt: RESTART_DELAY_S)
    try:
        yield supervisor
    finally:
        await supervisor.stop()


def mirror_of(
    kv: KeyValue, supervisor: Supervisor, recorder: Recorder | None = None, **options: object
) -> KvMirror[Note]:
    return KvMirror(
        kv,
        read_note,
        name="test.notes",
        on_change=recorder,
        supervisor=supervisor,
        check_interval_s=CHECK_INTERVAL_S,
        **options,  # type: ignore[arg-type]
    )


async def test_a_mirror_loads_the_bucket_then_follows_puts_and_deletes(kv: KeyValue, supervisor: Supervisor) -> None:
    await kv.put("a", note("first a"))
    await kv.put("b", note("first b"))
    await kv.put("gone", note("deleted before the start"))
    await kv.delete("gone")
    recorder = Recorder()
    mirror = mirror_of(kv, supervisor, recorder)
    await mirror.start(timeout=5.0)
    try:
        # Loaded by the time start returns; the initial contents are not reported as changes.
        assert mirror.snapshot() == {"a": Note(text="first a"), "b": Note(text="first b")}

        with capture_logs() as logs:
            await kv.put("c", note("new c"))
            await kv.put("a", note("second a"))
            await kv.delete("b")
            await kv.put("bad", b"\xc1 not msgpack")
            await kv.put("a", b"\xc1 not msgpack either")
            await kv.purge("c")
            await kv.put("d", note("last"))
            await eventually(lambda: len(recorder.changes) == 5)

        assert recorder.changes == [
            ("c", None, Note(text="new c")),
            ("a", Note(text="first a"), Note(text="second a")),
            ("b", Note(text="first b"), None),
            ("c", Note(text="new c"), None),
            ("d", None, Note(text="last")),
        ]
        # An entry the decoder cannot read is logged and skipped: the mirror keeps what it held.
        assert mirror.snapshot() == {"a": Note(text="second a"), "d": Note(text="last")}
        unreadable = [entry["key"] for entry in logs if entry["event"] == "mirror.unreadable_entry"]
        assert unreadable == ["bad", "a"]
        assert supervisor.states()[mirror.watch_task].restarts == 0
    finally:
        await mirror.stop()
    assert supervisor.states()[mirror.watch_task].status is TaskStatus.STOPPED


async def test_a_stale_write_is_dropped_and_fetch_reads_the_bucket_without_writing_the_mirror(
    kv: KeyValue, supervisor: Supervisor
) -> None:
    mirror = mirror_of(kv, supervisor, accept=newer)
    await mirror.start(timeout=5.0)
    try:
        await kv.put("robot", note("seen at 2", seq=2))
        await eventually(lambda: mirror.get("robot") is not None)
        await kv.put("robot", note("overtaken", seq=1))
        await kv.put("marker", note("after the stale write"))
        await eventually(lambda: mirror.get("marker") is not None)  # the watch is past the stale write

        assert mirror.get("robot") == Note(text="seen at 2", seq=2)
        assert await mirror.fetch("robot") == Note(text="overtaken", seq=1)
        assert mirror.get("robot") == Note(text="seen at 2", seq=2)
        assert await mirror.fetch("nobody") is None
        await kv.delete("robot")
        assert await mirror.fetch("robot") is None
        await eventually(lambda: mirror.get("robot") is None)  # deletions apply whatever `accept` says
    finally:
        await mirror.stop()


async def test_a_failing_callback_is_logged_and_later_changes_still_arrive(
    kv: KeyValue, supervisor: Supervisor
) -> None:
    heard: list[str] = []

    async def fussy(key: str, before: Note | None, after: Note | None) -> None:
        if key == "boom":
            raise RuntimeError("the callback broke")
        heard.append(key)

    mirror = KvMirror(kv, read_note, name="test.notes", on_change=fussy, supervisor=supervisor)
    await mirror.start(timeout=5.0)
    try:
        with capture_logs() as logs:
            await kv.put("boom", note("x"))
            await kv.put("fine", note("y"))
            await eventually(lambda: heard == ["fine"])
        failed = [entry for entry in logs if entry["event"] == "mirror.change_failed"]
        assert [(entry["key"], entry["mirror"]) for entry in failed] == [("boom", "test.notes")]
    finally:
        await mirror.stop()


async def test_the_watch_survives_its_bucket_being_deleted_and_created_again(
    js: JetStreamContext, kv: KeyValue, supervisor: Supervisor
) -> None:
    await kv.put("old", note("only before"))
    await kv.put("kept", note("same both times"))
    await kv.put("changed", note("before"))
    recorder = Recorder()
    mirror = mirror_of(kv, supervisor, recorder)
    await mirror.start(timeout=5.0)
    try:
        with capture_logs() as logs:
            await js.delete_key_value(BUCKET)
            # While the bucket is gone the watch keeps failing, and shows as restarting.
            await eventually(
                lambda: supervisor.states()[mirror.watch_task].status is TaskStatus.RESTARTING, interval=0.005
            )
            during = supervisor.states()[mirror.watch_task]
            assert during.restarts >= 1
            assert during.last_error is not None and "not found" in during.last_error
            # What was loaded stays readable meanwhile.
            assert set(mirror.snapshot()) == {"old", "kept", "changed"}

            again = await js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1))
            await again.put("kept", note("same both times"))
            await again.put("changed", note("after"))
            await again.put("new", note("only after"))
            await eventually(lambda: len(recorder.changes) >= 3)

        assert mirror.snapshot() == {
            "kept": Note(text="same both times"),
            "changed": Note(text="after"),
            "new": Note(text="only after"),
        }
        # Every key that changed while the watch was away, and only those, in key order.
        assert recorder.changes == [
            ("changed", Note(text="before"), Note(text="after")),
            ("new", None, Note(text="only after")),
            ("old", Note(text="only before"), None),
        ]
        failed = [entry for entry in logs if entry["event"] == "task.failed"]
        assert failed and all(entry["task"] == mirror.watch_task for entry in failed)
        assert any(entry["event"] == "mirror.reloaded" for entry in logs)
        after = supervisor.states()[mirror.watch_task]
        assert after.status is TaskStatus.RUNNING
        assert after.restarts >= 1

        # The resumed watch follows the new bucket live.
        await again.put("later", note("live again"))
        await eventually(lambda: recorder.changes[-1] == ("later", None, Note(text="live again")))
    finally:
        await mirror.stop()


async def test_a_watch_whose_consumer_died_is_noticed_as_stuck_and_restarted(
    js: JetStreamContext, kv: KeyValue, supervisor: Supervisor
) -> None:
    mirror = mirror_of(kv, supervisor)
    await mirror.start(timeout=5.0)
    try:
        # What a dropped connection can leave behind: a watcher whose consumer the server no longer has.
        stream = f"KV_{BUCKET}"
        for consumer in await js.consumers_info(stream):
            await js.delete_consumer(stream, consumer.name)
        await kv.put("written", note("while the watch was dead"))
        await eventually(lambda: mirror.get("written") is not None)
        state = supervisor.states()[mirror.watch_task]
        assert state.restarts >= 1
        assert state.last_error is not None and "stuck at revision" in state.last_error
    finally:
        await mirror.stop()


async def test_a_bucket_replaced_between_two_checks_is_reloaded_without_false_changes(
    js: JetStreamContext, kv: KeyValue, supervisor: Supervisor
) -> None:
    await kv.put("same", note("unchanged"))
    await kv.put("other", note("before"))
    recorder = Recorder()
    mirror = mirror_of(kv, supervisor, recorder)
    await mirror.start(timeout=5.0)
    try:
        await js.delete_key_value(BUCKET)
        again = await js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1))
        await again.put("same", note("unchanged"))
        await again.put("other", note("after"))
        await eventually(lambda: supervisor.states()[mirror.watch_task].restarts >= 1)
        await eventually(lambda: mirror.get("other") == Note(text="after"))
        assert recorder.changes == [("other", Note(text="before"), Note(text="after"))]
    finally:
        await mirror.stop()


async def test_a_bucket_missing_at_start_is_an_error_for_the_caller(
    js: JetStreamContext, kv: KeyValue, supervisor: Supervisor
) -> None:
    await js.delete_key_value(BUCKET)
    mirror = mirror_of(kv, supervisor)
    with pytest.raises(nats.js.errors.NotFoundError):
        await mirror.start(timeout=5.0)
    assert mirror.watch_task not in supervisor.states()
