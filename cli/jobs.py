"""`herder job start|list|show|stop|kill|logs`: jobs, and following one as it runs."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import Annotated, Any, TextIO

import typer
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from herder.cli.context import (
    BundleOption,
    DataDirOption,
    JsonOption,
    Target,
    TokenFileOption,
    UrlOption,
    call,
    connected,
    resolve,
)
from herder.cli.output import Column, WideOption, fail, print_json, print_table, run, when
from herder.client.follow import JobFollower
from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.errors import BadRequest, NotFound
from herder.protocol.jobs import (
    DEFAULT_LOST_AFTER_S,
    MAX_INPUT_BYTES,
    MAX_LOST_AFTER_S,
    MIN_LOST_AFTER_S,
    JobInfo,
    JobKill,
    JobListRequest,
    JobShow,
    JobStart,
    JobState,
    JobStateChangedEvent,
    JobStop,
    LogRecord,
    LogStream,
    OnRobotLost,
    Priority,
)
from herder.protocol.values import parse_json_object

SHORT_ID = 12
# `job list` on a narrow terminal: PRIORITY goes first, then CREATED, VERSION and ROBOT; REASON is cut
# to the room left; ID, PROCESS and STATE are always whole.
JOB_COLUMNS = (
    Column("ID"),
    Column("PROCESS"),
    Column("VERSION", drop=3),
    Column("STATE"),
    Column("ROBOT", drop=4),
    Column("PRIORITY", drop=1),
    Column("CREATED (UTC)", drop=2),
    Column("REASON", cut=True, min_width=20),
)

job_app = typer.Typer(help="Jobs: start, watch, stop and kill processes on unattended robots.", no_args_is_help=True)

IdArgument = Annotated[
    str, typer.Argument(help="The job's id, or enough of its start to tell it apart (4+ characters).")
]


def _if_lost(job: JobInfo) -> str:
    if job.on_robot_lost is OnRobotLost.FAULT:
        return "fault"
    return f"re-queue once the robot is known not to run it, or after {job.lost_after_s:g} s"


@job_app.command("start")
def start(
    process: Annotated[str, typer.Argument(help="The process to run.")],
    version: Annotated[str | None, typer.Option("--version", help="The version to run (default: the newest).")] = None,
    robot: Annotated[str | None, typer.Option("--robot", help="Run it on this unattended robot.")] = None,
    group: Annotated[str | None, typer.Option("--group", help="Run it on any available robot of this group.")] = None,
    input_json: Annotated[str | None, typer.Option("--input", help="The input: a JSON object.")] = None,
    priority: Annotated[
        Priority, typer.Option("--priority", help="Which waiting job a robot takes first.")
    ] = Priority.NORMAL,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Hard-stop the job after this many seconds.", min=0.001)
    ] = None,
    kill_grace: Annotated[
        float, typer.Option("--kill-grace", help="Seconds between SIGTERM and SIGKILL on a hard stop.", min=0)
    ] = 10.0,
    requeue: Annotated[
        bool, typer.Option("--requeue", help="If its robot is lost mid-run, run the job again instead of Faulting it.")
    ] = False,
    lost_after: Annotated[
        float,
        typer.Option(
            "--lost-after",
            help="With --requeue: how many seconds a lost robot has to come back (it may only be cut off, "
            "still running the job) before the job runs again elsewhere.",
            min=MIN_LOST_AFTER_S,
            max=MAX_LOST_AFTER_S,
        ),
    ] = DEFAULT_LOST_AFTER_S,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Follow its states and log lines until it ends; exit 0 only if it is Successful."),
    ] = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Start a process on a robot (--robot) or on any available robot of a group (--group)."""
    if (robot is None) == (group is None):
        fail("say where to run it: --robot NAME or --group NAME (one of them)", 2)
    request = JobStart(
        process=process,
        version=version,
        robot=robot,
        group=group,
        input=_parse_input(input_json),
        priority=priority,
        timeout_s=timeout,
        kill_grace_s=kill_grace,
        on_robot_lost=OnRobotLost.REQUEUE if requeue else OnRobotLost.FAULT,
        lost_after_s=lost_after,
    )
    target = resolve(data_dir, url, token_file, bundle)
    if not wait:
        job = call(target, lambda c: c.request(request))
        if json_out:
            print_json(job)
        else:
            print(f"job {job.id} {job.process} {job.version}: {_state_line(job)}")
        return
    job = run(lambda: _start_and_follow(target, request, json_out))
    if job.state is not JobState.SUCCESSFUL:
        raise typer.Exit(1)


def _parse_input(text: str | None) -> dict[str, Any]:
    """The job input `--input` gives, refused in one line (`BadRequest`) unless it is a JSON-safe object."""
    if text is None:
        return {}
    return parse_json_object(text, what="--input", max_bytes=MAX_INPUT_BYTES)


async def _start_and_follow(target: Target, request: JobStart, json_out: bool) -> JobInfo:
    async with connected(target, "herder-cli") as nc:
        client = Client(nc, token=target.token, tenant=target.tenant)
        printer = _Printer(sys.stderr if json_out else sys.stdout)
        follower = JobFollower(nc, client, on_state=printer.state, on_log=printer.log)
        # Listen for state changes before the job exists, so none is missed.
        await follower.listen()
        job = await client.request(request)
        printer.started(job)
        final = await follower.follow(job)
    if json_out:
        print_json(final)  # its output and error are in it
    else:
        printer.ended(final)
    return final


@job_app.command("list")
def list_jobs(
    states: Annotated[
        list[JobState] | None, typer.Option("--state", help="Only jobs in this state; repeat for several.")
    ] = None,
    process: Annotated[str | None, typer.Option("--process", help="Only jobs of this process.")] = None,
    robot: Annotated[
        str | None, typer.Option("--robot", help="Only jobs of this robot: those it ran and those aimed at it.")
    ] = None,
    group: Annotated[str | None, typer.Option("--group", help="Only jobs aimed at this group.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first.", min=1, max=1000)] = 50,
    wide: WideOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """List jobs, newest first; a Pending job says why it has not started."""
    request = JobListRequest(states=states or [], process=process, robot=robot, group=group, limit=limit)
    listed = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(request))
    if json_out:
        print_json(listed.jobs)
        return
    print_table(
        JOB_COLUMNS,
        [
            (
                job.id[:SHORT_ID],
                job.process,
                job.version,
                job.state.value,
                job.robot or job.target_robot or (f"group {job.target_group}" if job.target_group else None),
                job.priority.value,
                when(job.created_at),
                job.reason or None,
            )
            for job in listed.jobs
        ],
        wide=wide,
    )


@job_app.command("show")
def show(
    job_id: IdArgument,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show one job: where it runs, its state and why, its input and output, and its chain: the trigger or
    the job that started it, and the jobs it started."""
    request = JobShow(id=job_id)  # a malformed id is refused before connecting
    stack = resolve(data_dir, url, token_file, bundle)
    chain = run(lambda: _chain_of(stack, request))
    job = chain.job
    if json_out:
        print_json(
            {
                **job.model_dump(mode="json"),
                "parent": _brief(chain.parent) if chain.parent is not None else None,
                "children": [_brief(child) for child in chain.children],
            }
        )
        return
    target = f"robot {job.target_robot}" if job.target_robot else f"group {job.target_group}"
    fields = [
        ("id", job.id),
        ("process", f"{job.process} {job.version}"),
        ("state", job.state.value),
        ("reason", job.reason or "-"),
        ("target", target),
        ("robot", f"{job.robot} on host {job.host}" if job.robot else "-"),
        ("attempt", str(job.attempt)),
        ("priority", job.priority.value),
        ("timeout", f"{job.timeout_s:g} s" if job.timeout_s else "none"),
        ("kill grace", f"{job.kill_grace_s:g} s"),
        ("if robot lost", _if_lost(job)),
        ("created", f"{when(job.created_at)} UTC by {job.created_by or '-'}"),
        ("started", f"{when(job.started_at)} UTC" if job.started_at else "-"),
        ("ended", f"{when(job.ended_at)} UTC" if job.ended_at else "-"),
        ("input", json.dumps(job.input)),
        ("output", json.dumps(job.output) if job.output is not None else "-"),
    ]
    if job.error:
        fields.append(("error", job.error))
    fields += _chain_fields(chain)
    for label, value in fields:
        print(f"{label:<14} {value}" if label else f"  {value}")


# `job show` lists at most this many of the jobs a job started, the newest.
CHILDREN_SHOWN = 100


@dataclass(frozen=True)
class _Chain:
    """A job with the job that started it (None when none did, or it is not found) and the jobs it
    started, oldest first."""

    job: JobInfo
    parent: JobInfo | None
    children: list[JobInfo]


async def _chain_of(target: Target, request: JobShow) -> _Chain:
    async with connected(target, "herder-cli") as nc:
        client = Client(nc, token=target.token, tenant=target.tenant)
        job = await client.request(request)

        async def parent() -> JobInfo | None:
            if job.parent_job is None:
                return None
            try:
                return await client.request(JobShow(id=job.parent_job))
            except NotFound:
                return None

        started, listed = await asyncio.gather(
            parent(), client.request(JobListRequest(parent_job=job.id, limit=CHILDREN_SHOWN))
        )
    return _Chain(job=job, parent=started, children=listed.jobs[::-1])


def _brief(job: JobInfo) -> dict[str, Any]:
    """A job of a chain, as `job show --json` gives it."""
    return {"id": job.id, "process": job.process, "version": job.version, "state": job.state.value, "robot": job.robot}


def _chain_fields(chain: _Chain) -> list[tuple[str, str]]:
    """The lines of `job show` about its chain: the trigger, the parent, the children (one line each, unlabelled)."""
    job = chain.job
    fields: list[tuple[str, str]] = []
    if job.trigger:
        fields.append(("trigger", job.trigger))
    if job.parent_job:
        parent = chain.parent
        shown = f"{parent.id} {parent.process} {parent.state.value}" if parent else f"{job.parent_job} (not found)"
        fields.append(("parent", shown))
    count = len(chain.children)
    if count >= CHILDREN_SHOWN:
        fields.append(("children", f"the newest {count} (it may have started more), oldest first"))
    else:
        fields.append(("children", {0: "-", 1: "1"}.get(count, f"{count}, oldest first")))
    fields += [("", f"{child.id} {child.process} {child.state.value}") for child in chain.children]
    return fields


@job_app.command("stop")
def stop(
    job_id: IdArgument,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Soft-stop a job: its script sees should_stop() and ends itself. A Pending job is cancelled."""
    _ask(resolve(data_dir, url, token_file, bundle), JobStop(id=job_id), json_out)


@job_app.command("kill")
def kill(
    job_id: IdArgument,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Hard-stop a job: SIGTERM to its processes, SIGKILL after its grace period. A Pending job is cancelled."""
    _ask(resolve(data_dir, url, token_file, bundle), JobKill(id=job_id), json_out)


def _ask(target: Target, request: JobStop | JobKill, json_out: bool) -> None:
    job = call(target, lambda c: c.request(request))
    if json_out:
        print_json(job)
    else:
        print(f"job {job.id[:SHORT_ID]}: {_state_line(job)}")


@job_app.command("logs")
def logs(
    job_id: IdArgument,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until the job ends.")] = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print each line as a JSON object.")] = False,
) -> None:
    """Print a job's log lines: its script's stdout, stderr and SDK records, and what the robot did."""
    request = JobShow(id=job_id)  # a malformed id is refused before connecting
    run(lambda: _logs(resolve(data_dir, url, token_file, bundle), request, follow, json_out))


async def _logs(target: Target, request: JobShow, follow: bool, json_out: bool) -> None:
    async with connected(target, "herder-cli") as nc:
        client = Client(nc, token=target.token, tenant=target.tenant)
        if follow:
            printer = _Printer(sys.stdout, json_lines=json_out, show_states=False)
            follower = JobFollower(nc, client, on_log=printer.log)
            await follower.listen()
            await follower.follow(await client.request(request))
            return
        job = await client.request(request)
        await _print_stored(nc, target.tenant, job.id, json_out)


async def _print_stored(nc: NATS, tenant: str, job_id: str, json_out: bool) -> None:
    js = nc.jetstream()
    subject = subjects.job_log_filter(tenant, job_id)
    info = await js.stream_info(subjects.logs_stream(tenant), subjects_filter=subject)
    if not info.state.subjects:
        print(f"job {job_id[:SHORT_ID]} has no log lines (yet)", file=sys.stderr)
        return
    done = asyncio.Event()
    failed: list[OSError] = []

    async def show(msg: Msg) -> None:
        # An error here would be swallowed by the subscription: keep it for after (a reader that
        # went away, `| head`, must end the command, not leave it waiting).
        try:
            print(_format_record(msg, json_out), flush=False)
        except OSError as exc:
            failed.append(exc)
            done.set()
        if msg.metadata.num_pending == 0:
            done.set()

    subscription = await js.subscribe(
        subject,
        stream=subjects.logs_stream(tenant),
        cb=show,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    try:
        await done.wait()
    finally:
        await subscription.unsubscribe()
    if failed:
        raise failed[0]
    sys.stdout.flush()


def _format_record(msg: Msg, json_out: bool) -> str:
    try:
        record = codec.load(LogRecord, msg.data)
    except BadRequest:
        return (
            json.dumps({"undecodable_bytes": len(msg.data)})
            if json_out
            else f"(undecodable line, {len(msg.data)} bytes)"
        )
    if json_out:
        return record.model_dump_json()
    return format_log_line(record)


def format_log_line(record: LogRecord) -> str:
    """One log line as people read it: time, level, where it came from, the message and its fields."""
    fields = " ".join(f"{key}={_value(value)}" for key, value in record.fields.items() if key != "state")
    stamp = record.time.strftime("%H:%M:%S.%f")[:-3]
    text = f"{stamp} {record.level.value.upper():<7} {record.stream.value:<6} {record.message}"
    return f"{text} {fields}" if fields else text


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if text and " " not in text else json.dumps(text)


def _state_line(job: JobInfo) -> str:
    return _describe_state(job.state, job.robot, job.reason)


def _describe_state(state: JobState, robot: str | None, reason: str) -> str:
    if reason:
        return f"{state.value} ({reason})"
    return f"{state.value} on robot {robot}" if robot and state.active else state.value


# Where a state stands within one attempt of a job: an attempt starts Running and moves forward; a
# robot lost (or still busy) puts the job back to Pending at the same attempt, and the next start is
# the next attempt. A new job is Pending at attempt 0.
_STEP = {JobState.RUNNING: 1, JobState.STOPPING: 2, JobState.TERMINATING: 3, JobState.PENDING: 4}
_STEP_FINAL = 5


def _progress(state: JobState, attempt: int) -> tuple[int, int]:
    """How far a job in `state` at `attempt` has come: a later state compares greater."""
    return attempt, _STEP_FINAL if state.final else _STEP[state]


class _Printer:
    """Prints what a `JobFollower` delivers: state changes and log lines, as people or programs read them."""

    def __init__(self, out: TextIO, *, json_lines: bool = False, show_states: bool = True) -> None:
        self.out = out
        self.json_lines = json_lines
        self.show_states = show_states
        self._shown: tuple[int, int] | None = None  # how far the job had come in the line that started it

    def show(self, line: str) -> None:
        """Print a line of the follower's own."""
        print(line, file=self.out, flush=True)

    def started(self, job: JobInfo) -> None:
        """The job as the reply to its start has it: its id, process, version and state."""
        self._shown = _progress(job.state, job.attempt)
        self.show(f"job {job.id} {job.process} {job.version}: {_state_line(job)}")

    def state(self, change: JobStateChangedEvent) -> None:
        """A state change of the job, unless the start line has said it already (the reply is often Running)."""
        if not self.show_states:
            return
        if self._shown is not None and _progress(change.state, change.attempt) <= self._shown:
            return
        now = _describe_state(change.state, change.robot, change.reason)
        self.show(f"job {change.job_id[:SHORT_ID]}: {change.previous.value} → {now}")

    def ended(self, job: JobInfo) -> None:
        """What the ended job left: its output on one line, and a Faulted job's error (its first line)."""
        if job.output is not None:
            self.show(f"  output {json.dumps(job.output)}")
        if job.state is JobState.FAULTED and job.error:
            self.show(f"  error {job.error.splitlines()[0]}")

    def log(self, record: LogRecord) -> None:
        """A log line of the job."""
        if record.stream is LogStream.END and self.show_states:
            return  # the state line says the same
        if self.json_lines:
            self.show(record.model_dump_json())
        else:
            self.show("  " + format_log_line(record) if self.show_states else format_log_line(record))
