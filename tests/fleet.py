"""A whole herder on a test's nats-server and database, with real robot agents as subprocesses.

`Fleet` runs the auth, registry, packages, jobs, queues, secrets and storage services in one
`ServiceHost`, holds an admin client, registers robots, starts `herder robot run` for them as child
processes (so that they can be killed with SIGKILL like any real robot), publishes process folders,
and waits on jobs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client as NATS

from herder.cli.packages import publish_folder
from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.jobs import JobInfo, JobShow, JobState, LogRecord
from herder.protocol.packages import VersionInfo
from herder.protocol.registry import RobotAdd, RobotInfo, RobotShow, RobotStatus, RobotType
from herder.services.auth.service import AuthService
from herder.services.common.credentials import ServiceCredential
from herder.services.common.host import ServiceHost
from herder.services.common.runtime import Service
from herder.services.jobs.service import JobsService
from herder.services.packages.service import PackagesService
from herder.services.queues.service import QueuesService
from herder.services.registry.service import RegistryService
from herder.services.scheduler.service import SchedulerService
from herder.services.secrets.service import SecretsService
from herder.services.storage.service import StorageService
from tests.conftest import running_stack
from tests.support import eventually

ALL_SERVICES: tuple[type[Service], ...] = (
    AuthService,
    RegistryService,
    PackagesService,
    JobsService,
    QueuesService,
    SecretsService,
    StorageService,
    SchedulerService,
)
HEARTBEAT_S = 0.5
ROBOT_CONNECT_TIMEOUT_S = 30.0


@dataclass
class RobotProcess:
    """A `herder robot run` child process."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def kill9(self) -> None:
        """SIGKILL the agent: no goodbye, no report; its presence must speak for it. (Waiting for a
        killed process is immediate: blocking the event loop for it costs nothing.)"""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as a service manager would, and wait for the exit code without blocking the event
        loop: the agent's last report and goodbye go to services that run on it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, timeout)

    def output(self) -> str:
        """What the agent logged."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Fleet:
    """herder's services, an admin client, and the robots started for one test."""

    host: ServiceHost
    nc: NATS
    client: Client
    nats_url: str
    root: Path
    admin_token: str
    robots: list[RobotProcess] = field(default_factory=list)
    tenant: str = subjects.DEFAULT_TENANT

    async def add_robot(
        self, name: str, *, robot_type: RobotType = RobotType.UNATTENDED, host: str = "box1", groups: Sequence[str] = ()
    ) -> str:
        """Register a robot; return its token."""
        added = await self.client.request(RobotAdd(name=name, type=robot_type, host=host, groups=list(groups)))
        return added.token

    def start_robot(
        self, name: str, token: str, *, heartbeat_s: float = HEARTBEAT_S, options: Sequence[str] = ()
    ) -> RobotProcess:
        """Start `herder robot run NAME` (with `options`) as a child process."""
        work = self.root / "robots" / name
        work.mkdir(parents=True, exist_ok=True)
        log = self.root / f"robot-{name}-{len(self.robots)}.log"
        env = {**os.environ, "HERDER_ROBOT_TOKEN": token}
        env.pop("HERDER_DATA_DIR", None)
        with log.open("ab") as out:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "herder.cli.app",
                    "robot",
                    "run",
                    name,
                    "--url",
                    self.nats_url,
                    "--heartbeat",
                    str(heartbeat_s),
                    "--work-dir",
                    str(work),
                    "--log-format",
                    "json",
                    *options,
                ],
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        robot = RobotProcess(name=name, process=process, log=log)
        self.robots.append(robot)
        return robot

    async def run_robot(
        self,
        name: str,
        *,
        groups: Sequence[str] = (),
        heartbeat_s: float = HEARTBEAT_S,
        host: str = "box1",
        options: Sequence[str] = (),
    ) -> RobotProcess:
        """Register a robot, start its agent (with `options` of `herder robot run`), and wait until it is Available."""
        token = await self.add_robot(name, groups=groups, host=host)
        robot = self.start_robot(name, token, heartbeat_s=heartbeat_s, options=options)
        await self.wait_robot(name, RobotStatus.AVAILABLE, agent=robot)
        return robot

    async def wait_robot(
        self,
        name: str,
        *statuses: RobotStatus,
        agent: RobotProcess | None = None,
        timeout: float = ROBOT_CONNECT_TIMEOUT_S,
    ) -> RobotInfo:
        """Wait until the robot's status is one of `statuses`."""

        async def reached() -> RobotInfo | None:
            if agent is not None and agent.process.poll() is not None:
                raise AssertionError(f"robot {name} exited with {agent.process.returncode}:\n{agent.output()}")
            robot = await self.client.request(RobotShow(name=name))
            return robot if robot.status in statuses else None

        return await eventually(reached, timeout=timeout)

    async def publish(self, folder: Path) -> VersionInfo:
        """Pack, upload and publish a process folder, as `herder package publish` does."""
        return await publish_folder(self.nc, self.client, folder)

    async def job(self, job_id: str) -> JobInfo:
        """A job as it is now."""
        return await self.client.request(JobShow(id=job_id))

    async def wait_job(self, job_id: str, *states: JobState, timeout: float = 30.0) -> JobInfo:
        """Wait until the job is in one of `states`; fail early if it ends in another."""

        async def reached() -> JobInfo | None:
            job = await self.job(job_id)
            if job.state in states:
                return job
            if job.state.final:
                raise AssertionError(f"job ended {job.state.value} ({job.reason}; {job.error}), not {states}")
            return None

        try:
            return await eventually(reached, timeout=timeout, interval=0.05)
        except AssertionError as exc:
            logs = "\n".join(robot.output()[-3000:] for robot in self.robots)
            raise AssertionError(f"{exc}; job now: {await self.job(job_id)}\nrobot logs:\n{logs}") from exc

    async def logs(self, job_id: str) -> list[LogRecord]:
        """Every stored log line of a job, in order."""
        js = self.nc.jetstream()
        subject = subjects.job_log_filter(self.tenant, job_id)
        found: list[LogRecord] = []
        info = await js.stream_info(subjects.logs_stream(self.tenant), subjects_filter=subject)
        if not info.state.subjects:
            return found
        subscription = await js.pull_subscribe(subject, stream=subjects.logs_stream(self.tenant))
        try:
            wanted = sum(info.state.subjects.values())
            while len(found) < wanted:
                for msg in await subscription.fetch(wanted - len(found), timeout=5):
                    found.append(codec.load(LogRecord, msg.data))
                    await msg.ack()
        finally:
            await subscription.unsubscribe()
        return found

    async def stop_robots(self) -> None:
        """Stop every robot agent still running, together (SIGKILL if SIGTERM is not enough)."""

        async def stop(robot: RobotProcess) -> None:
            if robot.process.poll() is None:
                try:
                    await robot.stop(timeout=15)
                except subprocess.TimeoutExpired:
                    robot.process.kill()
                    await asyncio.to_thread(robot.process.wait)

        await asyncio.gather(*(stop(robot) for robot in self.robots))


@asynccontextmanager
async def running_fleet(
    nats_url: str,
    db_url: str,
    root: Path,
    credential: ServiceCredential,
    services: tuple[type[Service], ...] = ALL_SERVICES,
) -> AsyncIterator[Fleet]:
    """Start the services on the test's NATS and database with an admin client; stop it all after,
    robots first."""
    async with running_stack(nats_url, db_url, root, credential, services) as stack:
        fleet = Fleet(
            host=stack.host,
            nc=stack.nc,
            client=Client(stack.nc, token=stack.admin_token, timeout=10.0),
            nats_url=nats_url,
            root=root,
            admin_token=stack.admin_token,
        )
        try:
            yield fleet
        finally:
            await fleet.stop_robots()


def python_process(root: Path, name: str, body: str, *, version: str = "1.0.0") -> Path:
    """A process folder whose entry point is `main()` in `main.py`, with `body` as the module's code."""
    folder = root / "processes" / f"{name}-{version}"
    folder.mkdir(parents=True)
    (folder / "herder.toml").write_text(f'name = "{name}"\nversion = "{version}"\n\n[entry]\npython = "main:main"\n')
    (folder / "main.py").write_text(textwrap.dedent(body).lstrip())
    return folder


def command_process(
    root: Path, name: str, words: Sequence[str], files: dict[str, str], *, version: str = "1.0.0"
) -> Path:
    """A process folder whose entry point is a command line."""
    folder = root / "processes" / f"{name}-{version}"
    folder.mkdir(parents=True)
    command = ", ".join(f'"{word}"' for word in words)
    (folder / "herder.toml").write_text(f'name = "{name}"\nversion = "{version}"\n\n[entry]\ncommand = [{command}]\n')
    for file_name, text in files.items():
        path = folder / file_name
        path.write_text(textwrap.dedent(text).lstrip())
        path.chmod(0o755)
    return folder
