"""The private channel between a running script and its robot agent: how `sdk.queue(...)` reaches herder.

When the agent starts a run it opens a channel for it: a Unix domain socket in a folder of its own
(mode 0700, the socket 0600), whose path the script finds in HERDER_JOB_CHANNEL. The script's SDK
sends its queue calls there; the agent checks each one against the protocol, sends it to herder with
the robot's own identity (the agent's `Client`) and answers. So the script never holds a token or a
NATS connection, and can ask for nothing beyond the verbs in `VERBS`.

The wire is newline-delimited JSON, one object per line, both ways:

    → {"id": 7, "verb": "item_next", "body": {"queues": [{"name": "invoices"}]}}
    ← {"id": 7, "reply": {"items": [{"id": "…", "lease": 1, …}]}}
    → {"id": 8, "verb": "item_add", "body": {"queue": "invoices", "items": [{"content": {"n": 1e999}}]}}
    ← {"id": 8, "error": {"code": "bad_request", "message": "invalid item_add request: items.0.content.n: …"}}

`id` is the caller's (a non-negative integer) and comes back with the answer. Answers go out as
requests finish, not in the order they came, so a script with threads may have several in flight.
`body` is the verb's request model in JSON (see herder.protocol.queues); `item_next` is taken for the
run's job, whatever the body says, and `job_start` (`sdk.start_job`) starts a job as the run's own job,
which herder records as the new one's parent: a body naming a `job_id` is refused. Errors carry
herder's codes and messages (protocol/errors.py), with `details` when herder gave some; a failure of
the agent itself is `internal`, with the traceback in the agent's log only.

A line is at most MAX_LINE_BYTES. A longer one, or one that is not a JSON request, is answered with
`bad_request` (under its id when the line starts with one, else under `"id": null`) and the
connection goes on with the next line. A call that cannot reach herder (the agent is cut off from
NATS, or no queues service runs: herder is restarting) waits for it to come back, up to the
channel's `ride_out_s` (DEFAULT_RIDE_OUT_S, `herder robot run --queue-wait`), and is then answered
`unavailable`; a call that reached herder and got no reply in time is answered `unavailable` at once,
since it may have been carried out.

The channel closes when the run ends, however it ends: what is in flight is dropped, the socket
and its folder are removed. An agent killed outright (SIGKILL) cannot remove its folders; they are
named after its pid, and the next agent to start removes those of agents that are gone
(`sweep_stale`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog
from pydantic import ValidationError

from herder.client import sealing
from herder.client import storage as storage_files
from herder.client.backoff import backoff
from herder.client.requests import Client
from herder.protocol import codec
from herder.protocol.errors import BadRequest, Conflict, HerderError, Internal, NotFound, Unavailable
from herder.protocol.jobs import RobotJob, RobotJobStart
from herder.protocol.messages import Model, Request
from herder.protocol.queues import (
    DEFAULT_QUEUE_WAIT_S,
    ItemAdd,
    ItemNext,
    ItemPostpone,
    ItemProgress,
    ItemResultRequest,
    ItemsTaken,
)
from herder.protocol.secrets import (
    AssetGet,
    AssetWrite,
    CredentialFetch,
    CredentialWrite,
    TransportKeyRequest,
    credential_fetch_context,
    credential_write_context,
)
from herder.protocol.storage import FileDelete, FileListRequest
from herder.robot import sdk
from herder.robot.masking import Masks
from herder.robot.runner import LineSplitter

log = structlog.get_logger("herder.robot")

R = TypeVar("R", bound=Model)

# The SDK keeps its requests within this; what a script sends past it is refused, not read.
MAX_LINE_BYTES = sdk.MAX_CHANNEL_LINE_BYTES
# How many requests of one connection may be in flight before the channel stops reading it.
MAX_IN_FLIGHT = 64
READ_CHUNK_BYTES = 64 * 1024
SOCKET_NAME = "channel.sock"
# `herder-channel-<agent pid>-<random>` in the temporary folder.
FOLDER_PREFIX = "herder-channel-"
FOLDER_MODE = 0o700
SOCKET_MODE = 0o600
# A Unix socket's path must fit in sun_path (108 bytes on Linux, 104 on macOS), its NUL included.
MAX_SOCKET_PATH_BYTES = 100
MAX_CALL_ID = 2**53 - 1
DEFAULT_RIDE_OUT_S = DEFAULT_QUEUE_WAIT_S
_RETRY_BASE_S = 0.2
_RETRY_MAX_S = 2.0

# What a script may ask for, by verb, and the request each becomes.
VERBS: Mapping[str, type[Request[Any]]] = {
    "item_add": ItemAdd,
    "item_next": ItemNext,
    "item_result": ItemResultRequest,
    "item_postpone": ItemPostpone,
    "item_progress": ItemProgress,
    "asset_get": AssetGet,
    "asset_write": AssetWrite,
}
# Verbs the agent serves itself, with the robot's key: a credential comes sealed to the robot and is
# opened here; a credential written is sealed here to the secrets service.
SECRET_VERBS = ("credential_get", "credential_set")
_CREDENTIAL_GET_FIELDS = frozenset({"name"})
_CREDENTIAL_SET_FIELDS = frozenset({"name", "username", "password", "own"})
# Verbs the agent serves itself for storage buckets: it reads the local file of a put and writes the
# one of a get itself (script and agent run as one user on one machine), streaming it with
# `herder.client.storage`; a list or a delete goes to the storage service as it is.
STORAGE_VERBS = ("storage_put", "storage_get", "storage_list", "storage_delete")
_STORAGE_FILE_FIELDS = frozenset({"bucket", "path", "local_file"})
_STORAGE_LIST_FIELDS = frozenset({"bucket", "prefix", "cursor"})
_STORAGE_DELETE_FIELDS = frozenset({"bucket", "path"})
# Verbs the agent serves itself for jobs: a start is sent as the run's own job (`jobs.robot_start`), which
# herder records as the new job's parent; the script names what runs where, never the parent.
JOB_VERBS = ("job_start", "job_state")
_JOB_START_FIELDS = frozenset(RobotJobStart.model_fields) - {"job_id"}

_SERVED = (*VERBS, *SECRET_VERBS, *STORAGE_VERBS, *JOB_VERBS)

_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*(\d{1,16})\s*[,}]')
_FOLDER_NAME = re.compile(re.escape(FOLDER_PREFIX) + r"(\d{1,10})-[A-Za-z0-9_]+")


@dataclass(frozen=True)
class Call:
    """One request of a script, as read from its line."""

    id: int
    verb: str
    body: dict[str, Any]


class BadCall(BadRequest):
    """A line that is no request the channel serves; `call_id` is its id when it names one."""

    def __init__(self, message: str, call_id: int | None) -> None:
        super().__init__(message)
        self.call_id = call_id


def leading_id(head: bytes) -> int | None:
    """The id a request line starts with (`{"id": 7, …`), as the SDK writes it; None when it does not."""
    found = _LEADING_ID.match(head)
    if found is None:
        return None
    value = int(found.group(1))
    return value if value <= MAX_CALL_ID else None


def parse_call(kept: bytes, length: int) -> Call:
    """The request a line holds (`kept`: its first bytes, `length`: its whole length); `BadCall` otherwise."""
    if length > MAX_LINE_BYTES:
        raise BadCall(
            f"the request is {length} bytes, more than the {MAX_LINE_BYTES} one line of the channel may hold; "
            "send fewer or smaller items at a time",
            leading_id(kept),
        )
    try:
        # Decoded here: `json.loads` would take bytes in UTF-16 or UTF-32 too, and the channel speaks UTF-8.
        message = json.loads(kept.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadCall("the request is not UTF-8 text", leading_id(kept)) from None
    except RecursionError:
        raise BadCall("the request is nested too deeply to read", leading_id(kept)) from None
    except ValueError as exc:
        raise BadCall(f"the request is not valid JSON ({_json_problem(exc)})", leading_id(kept)) from None
    if not isinstance(message, dict):
        raise BadCall('the request must be a JSON object: {"id": 1, "verb": "item_next", "body": {…}}', None)
    call_id = message.get("id")
    if not isinstance(call_id, int) or isinstance(call_id, bool) or not 0 <= call_id <= MAX_CALL_ID:
        raise BadCall(f'the request needs an "id": a whole number from 0 to {MAX_CALL_ID}', None)
    verb = message.get("verb")
    if not isinstance(verb, str) or verb not in _SERVED:
        shown = repr(verb)[:60]
        served = ", ".join(_SERVED)
        raise BadCall(f"the channel serves no verb {shown}; it serves {served}", call_id)
    body = message.get("body", {})
    if not isinstance(body, dict):
        raise BadCall(f'the "body" of {verb} must be a JSON object', call_id)
    unknown = sorted(set(message) - {"id", "verb", "body"})
    if unknown:
        raise BadCall(f"the request has fields the channel does not know: {', '.join(map(str, unknown))}", call_id)
    return Call(id=call_id, verb=verb, body=body)


def _json_problem(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    return "an integer of thousands of digits" if "digits" in str(exc) else type(exc).__name__


def request_of(call: Call, job_id: str) -> Request[Any]:
    """The request model `call` makes, validated; `BadRequest` naming the fields (and paths) that fail.

    `item_next` takes items for the run's job: the agent says which job that is, not the script.
    """
    body = dict(call.body)
    if call.verb == "item_next":
        body["job_id"] = job_id
    if call.verb == "asset_get" and "robot" in body:
        raise BadRequest("asset_get: a script reads its own robot's values; leave out 'robot'")
    try:
        return VERBS[call.verb].model_validate(body)
    except ValidationError as exc:
        raise codec.invalid(f"{call.verb} request", exc) from None


def error_of(exc: BaseException) -> dict[str, Any]:
    """The `error` of an answer: a herder error's code and message (and details); `internal` for anything else."""
    if not isinstance(exc, HerderError):
        exc = Internal("the robot agent failed to serve this call; the agent's log says why")
    error: dict[str, Any] = {"code": exc.code.value, "message": exc.message}
    if exc.details:
        error["details"] = exc.details
    return error


def answer_line(
    call_id: int | None, *, reply: Mapping[str, Any] | None = None, error: Mapping[str, Any] | None = None
) -> bytes:
    """One answer, as the line sent back: `{"id": …, "reply": …}` or `{"id": …, "error": …}`."""
    message: dict[str, Any] = {"id": call_id}
    if error is not None:
        message["error"] = error
    else:
        message["reply"] = reply if reply is not None else {}
    try:
        text = json.dumps(message, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        # Details herder gave that JSON cannot hold: the code and the message say enough.
        if error is None:
            raise
        text = json.dumps({"id": call_id, "error": {"code": error["code"], "message": error["message"]}})
    return text.encode() + b"\n"


class Holdings:
    """The items a run holds, as its channel saw them taken and given back: what the run leaves
    unfinished when it ends. (herder knows too; a run by hand has no herder job whose end would tell it.)"""

    def __init__(self) -> None:
        self._leases: dict[str, int] = {}

    def note(self, request: Model, reply: Model) -> None:
        """Take in what a call that succeeded changed."""
        if isinstance(request, ItemNext) and isinstance(reply, ItemsTaken):
            self._leases.update((item.id, item.lease) for item in reply.items)
        elif isinstance(request, ItemResultRequest):
            for result in request.results:
                self._leases.pop(result.id, None)
        elif isinstance(request, ItemPostpone):
            self._leases.pop(request.id, None)

    def held(self) -> dict[str, int]:
        """The items still held, with their leases."""
        return dict(self._leases)


def _folder_parents() -> tuple[str, ...]:
    """Where channels' folders go: the temporary folder, or /tmp when its path leaves no room for a socket."""
    return tuple(dict.fromkeys((tempfile.gettempdir(), "/tmp")))


def _private_folder() -> Path:
    """A new folder only this user may enter, with room for the socket's path within MAX_SOCKET_PATH_BYTES."""
    for parent in _folder_parents():
        folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=parent))  # mode 0700
        if len(os.fsencode(folder / SOCKET_NAME)) <= MAX_SOCKET_PATH_BYTES:
            return folder
        folder.rmdir()
    raise OSError(f"no temporary folder has a path short enough for a Unix socket (TMPDIR={tempfile.gettempdir()})")


def stale_folder(name: str, *, owned: bool, alive: Callable[[int], bool]) -> bool:
    """Whether a folder called `name` is a channel's whose agent is gone: ours (`owned`), and named after a
    pid no process has now. Pure: `alive` says whether a pid runs."""
    found = _FOLDER_NAME.fullmatch(name)
    return owned and found is not None and not alive(int(found.group(1)))


def sweep_stale() -> int:
    """Remove the channels' folders agents killed outright left behind (this user's only); how many."""
    removed = 0
    for parent in _folder_parents():
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            if not entry.name.startswith(FOLDER_PREFIX):
                continue
            try:
                owned = entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid()
            except OSError:
                continue
            if stale_folder(entry.name, owned=owned, alive=_alive):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    return True


@dataclass(frozen=True)
class Secrets:
    """What a channel needs to open credentials sealed to its robot: the robot's key and tenant."""

    key: Any  # X25519PrivateKey
    tenant: str


def _only(call: Call, fields: frozenset[str]) -> None:
    unknown = sorted(set(call.body) - fields)
    if unknown:
        known = ", ".join(sorted(fields))
        raise BadRequest(f"{call.verb}: unknown fields {', '.join(map(str, unknown))}; it takes {known}")


M = TypeVar("M", bound=Model)


def _validated(model: type[M], verb: str, body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise codec.invalid(f"{verb} request", exc) from None


def _day(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


class Channel:
    """The channel of one run: a Unix socket serving the script's queue calls with the agent's client."""

    def __init__(
        self,
        client: Client,
        job_id: str,
        folder: Path,
        *,
        robot: str | None = None,
        ride_out_s: float = DEFAULT_RIDE_OUT_S,
        secrets: Secrets | None = None,
        masks: Masks | None = None,
        herder_job: bool = True,
    ) -> None:
        """Use `Channel.open`."""
        self._client = client
        self._robot = robot
        self._herder_job = herder_job
        self._secrets = secrets
        self._transport_key: str | None = None
        self._ride_out_s = ride_out_s
        self._job_id = job_id
        # The jobs this run started: the only ones its script may follow.
        self._started_jobs: set[str] = set()
        self._folder = folder
        self.path = folder / SOCKET_NAME
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._log = log.bind(job_id=job_id, robot=robot)
        self.holdings = Holdings()
        # The passwords handed to the script, masked in the job's log (the agent gives its log's).
        self.masks = masks if masks is not None else Masks()

    @classmethod
    async def open(
        cls,
        client: Client,
        job_id: str,
        *,
        robot: str | None = None,
        ride_out_s: float = DEFAULT_RIDE_OUT_S,
        secrets: Secrets | None = None,
        masks: Masks | None = None,
        herder_job: bool = True,
    ) -> Channel:
        """Open the channel of a run: its private folder and its socket, listening. `OSError` if it cannot.
        Without `secrets` (the robot's key) the script can read no credential; without `herder_job` (a run
        by hand, whose `job_id` herder does not know) it can start no job."""
        folder = await asyncio.to_thread(_private_folder)
        channel = cls(
            client,
            job_id,
            folder,
            robot=robot,
            ride_out_s=ride_out_s,
            secrets=secrets,
            masks=masks,
            herder_job=herder_job,
        )
        try:
            channel._server = await asyncio.start_unix_server(channel._connection, path=str(channel.path))
            # The folder already keeps others out; the socket says the same.
            os.chmod(channel.path, SOCKET_MODE)
        except BaseException:
            await channel.close()
            raise
        channel._log.debug("channel.opened", path=str(channel.path))
        return channel

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        return self._closed

    async def close(self) -> None:
        """Stop serving: drop the connections and what is in flight, remove the socket and its folder. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        await asyncio.to_thread(shutil.rmtree, self._folder, ignore_errors=True)
        self._log.debug("channel.closed")

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection of the script: read its lines, answer each as it finishes."""
        if self._closed:
            writer.close()
            return
        self._writers.add(writer)
        splitter = LineSplitter(MAX_LINE_BYTES)
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        sending = asyncio.Lock()
        mine: set[asyncio.Task[None]] = set()
        try:
            while chunk := await reader.read(READ_CHUNK_BYTES):
                for kept, length in splitter.feed(chunk):
                    await slots.acquire()
                    if self._closed:
                        return
                    task = asyncio.ensure_future(self._answer(kept, length, writer, sending))
                    task.add_done_callback(lambda _: slots.release())
                    self._track(task, mine)
            # The script closed its end: what it asked before is still answered (it may only have
            # shut down its writing half), then the connection goes.
            if mine:
                await asyncio.wait(set(mine))
        except (ConnectionError, OSError):
            pass  # the script went away mid-line: nothing more to answer
        finally:
            self._writers.discard(writer)
            writer.close()

    def _track(self, task: asyncio.Task[None], mine: set[asyncio.Task[None]]) -> None:
        self._tasks.add(task)
        mine.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(mine.discard)

    async def _answer(self, kept: bytes, length: int, writer: asyncio.StreamWriter, sending: asyncio.Lock) -> None:
        call_id: int | None = None
        try:
            call = parse_call(kept, length)
            call_id = call.id
            line = answer_line(call.id, reply=await self.serve(call))
        except BadCall as exc:
            self._log.info("channel.bad_call", call_id=exc.call_id, reason=exc.message)
            line = answer_line(exc.call_id, error=error_of(exc))
        except HerderError as exc:
            line = answer_line(call_id, error=error_of(exc))
        except Exception as exc:
            self._log.exception("channel.call_failed", call_id=call_id)
            line = answer_line(call_id, error=error_of(exc))
        async with sending:
            if writer.is_closing():
                return
            writer.write(line)
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()

    async def serve(self, call: Call) -> dict[str, Any]:
        """Send one call to herder as the robot and return the reply as JSON values; herder's errors raise."""
        if call.verb in STORAGE_VERBS:
            return await self._storage(call)
        if call.verb == "job_start":
            return await self._job_start(call)
        if call.verb == "job_state":
            return await self._job_state(call)
        if call.verb == "credential_get":
            return await self._credential_get(call)
        if call.verb == "credential_set":
            return await self._credential_set(call)
        request = request_of(call, self._job_id)
        reply: Model = await self._send(call.verb, request)
        self.holdings.note(request, reply)
        answer: dict[str, Any] = reply.model_dump(mode="json")
        return answer

    async def _send(self, verb: str, request: Request[R]) -> R:
        """Send `request`, riding out an outage of herder for a call that reached nobody."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ride_out_s
        attempt = 0
        while True:
            try:
                reply = await self._reach(request)
                break
            except Unavailable as exc:
                # Only a call that reached nobody is sent again: it cannot be carried out twice.
                unreached = exc.details.get("cut_off") or exc.details.get("no_responders")
                attempt += 1
                pause = backoff(attempt, base_s=_RETRY_BASE_S, max_s=_RETRY_MAX_S)
                if not unreached or loop.time() + pause > deadline:
                    self._log.info("channel.refused", verb=verb, code=exc.code.value, reason=exc.message)
                    raise
                if attempt == 1:
                    self._log.info("channel.waiting", verb=verb, reason=exc.message, up_to_s=self._ride_out_s)
                await asyncio.sleep(pause)
            except HerderError as exc:
                self._log.info("channel.refused", verb=verb, code=exc.code.value, reason=exc.message)
                raise
        self._log.debug("channel.served", verb=verb)
        return reply

    def _with_secrets(self, verb: str) -> Secrets:
        if self._secrets is None or self._robot is None:
            raise Unavailable(f"{verb}: this robot has no sealing key, so it can receive no credential")
        return self._secrets

    async def _credential_get(self, call: Call) -> dict[str, Any]:
        secrets = self._with_secrets(call.verb)
        _only(call, _CREDENTIAL_GET_FIELDS)
        request = _validated(CredentialFetch, call.verb, {"name": call.body.get("name"), "job_id": self._job_id})
        reply = await self._send(call.verb, request)
        assert self._robot is not None
        context = sealing.context(*credential_fetch_context(secrets.tenant, self._robot, self._job_id, request.name))
        try:
            secret = sealing.open_sealed(secrets.key, sealing.Sealed.from_text(reply.sealed_secret), context)
            password = secret.decode()
        except (sealing.SealError, UnicodeDecodeError) as exc:
            raise Internal(f"credential {request.name!r} came sealed in a way this robot cannot open ({exc})") from None
        if not self.masks.add(password):
            self._log.warning("channel.secret_too_short_to_mask", credential=request.name)
        return {
            "name": reply.name,
            "username": reply.username,
            "password": password,
            "expires_on": _day(reply.expires_on),
        }

    async def _credential_set(self, call: Call) -> dict[str, Any]:
        secrets = self._with_secrets(call.verb)
        _only(call, _CREDENTIAL_SET_FIELDS)
        password = call.body.get("password")
        if not isinstance(password, str) or not password:
            raise BadRequest("credential_set: 'password' is a string, not empty")
        name = call.body.get("name")
        assert self._robot is not None
        for attempt in range(2):
            if self._transport_key is None or attempt:
                self._transport_key = (await self._send(call.verb, TransportKeyRequest())).public_key
            key = sealing.public_from_text(self._transport_key)
            context = credential_write_context(secrets.tenant, self._robot, self._job_id, str(name))
            box = sealing.seal(key, password.encode(), sealing.context(*context))
            body = {
                "name": name,
                "username": call.body.get("username"),
                "sealed_secret": box.text(),
                "sealed_to": self._transport_key,
                "job_id": self._job_id,
                "own": call.body.get("own", False),
            }
            request = _validated(CredentialWrite, call.verb, body)
            try:
                await self._send(call.verb, request)
            except Conflict as exc:
                if attempt == 0 and "transport key" in exc.message:
                    continue  # the service's key changed (a master key rotation): seal again to the new one
                raise
            break
        self.masks.add(password)
        return {}

    async def _job_start(self, call: Call) -> dict[str, Any]:
        """Start a job as the run's own job: herder makes it the new job's parent (only while it runs here)."""
        if "job_id" in call.body:
            raise BadRequest("job_start: a script starts jobs as its own job, which its robot names; leave out job_id")
        if not self._herder_job:
            raise Conflict(
                "job_start: a run by hand ('herder robot run --run') is no herder job, so it cannot start one; "
                "start the process as a herder job on an unattended robot to have it start others"
            )
        _only(call, _JOB_START_FIELDS)
        request = _validated(RobotJobStart, call.verb, {**call.body, "job_id": self._job_id})
        job = await self._send(call.verb, request)
        self._started_jobs.add(job.id)
        self._log.info("channel.job_started", child_job=job.id, process=job.process, state=job.state.value)
        return job.model_dump(mode="json")

    async def _job_state(self, call: Call) -> dict[str, Any]:
        """A job this run started, as herder has it now (`sdk.start_job(wait=True)` follows it)."""
        _only(call, frozenset({"id"}))
        job_id = call.body.get("id")
        if job_id not in self._started_jobs:
            raise NotFound(f"job_state: this run started no job {job_id!r}; a script follows only the jobs it starts")
        job = await self._send(call.verb, _validated(RobotJob, call.verb, {"id": job_id}))
        return job.model_dump(mode="json")

    async def _storage(self, call: Call) -> dict[str, Any]:
        """A storage call: a put or a get moves the local file itself; a list or a delete is sent as it is."""
        if call.verb == "storage_list":
            _only(call, _STORAGE_LIST_FIELDS)
            listed = await self._send(call.verb, _validated(FileListRequest, call.verb, call.body))
            return listed.model_dump(mode="json")
        if call.verb == "storage_delete":
            _only(call, _STORAGE_DELETE_FIELDS)
            deleted = await self._send(call.verb, _validated(FileDelete, call.verb, call.body))
            return deleted.model_dump(mode="json")
        _only(call, _STORAGE_FILE_FIELDS)
        # Checked here, before any file is touched: the bucket's name and the path in it.
        named = _validated(FileDelete, call.verb, {"bucket": call.body.get("bucket"), "path": call.body.get("path")})
        local_file = call.body.get("local_file")
        if not isinstance(local_file, str) or not os.path.isabs(local_file):
            raise BadRequest(f"{call.verb}: 'local_file' is the local file's absolute path (the SDK makes it so)")
        move = storage_files.upload if call.verb == "storage_put" else storage_files.download
        info = await move(self._client, named.bucket, named.path, local_file)
        self._log.info(f"channel.{call.verb}", bucket=info.bucket, path=info.path, size=info.size)
        return info.model_dump(mode="json")

    async def _reach(self, request: Request[R]) -> R:
        if not self._client.nc.is_connected:
            raise Unavailable(
                "the robot is cut off from herder (NATS is unreachable, it is reconnecting); try again later",
                details={"cut_off": True},
            )
        return await self._client.request(request)


__all__ = [
    "JOB_VERBS",
    "MAX_LINE_BYTES",
    "SECRET_VERBS",
    "STORAGE_VERBS",
    "VERBS",
    "BadCall",
    "Call",
    "Channel",
    "Holdings",
    "Secrets",
    "answer_line",
    "error_of",
    "leading_id",
    "parse_call",
    "request_of",
    "stale_folder",
    "sweep_stale",
]
