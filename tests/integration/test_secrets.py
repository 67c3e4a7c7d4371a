"""The secrets service against a real NATS and real databases: assets and their scopes, credentials
sealed to the robot that asks and to the operator who reveals, refusals, and tampering."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import AsyncIterator
from datetime import date, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nats.aio.msg import Msg
from sqlalchemy import text, update

from herder.client import sealing
from herder.client import secrets as credentials
from herder.client.connection import connect
from herder.client.requests import Client
from herder.protocol.auth import Role, TokenCreate
from herder.protocol.errors import BadRequest, Conflict, DecryptionFailed, Forbidden, NotFound
from herder.protocol.jobs import JobStart, JobState, LogStream
from herder.protocol.messages import utcnow
from herder.protocol.registry import RobotStatus
from herder.protocol.secrets import (
    AssetDelete,
    AssetGet,
    AssetListRequest,
    AssetSet,
    AssetType,
    AssetWrite,
    CredentialFetch,
    CredentialListRequest,
    RobotKeySet,
    Scope,
    SecretsRewrap,
)
from herder.services.common.credentials import ServiceCredential
from herder.services.secrets import envelope
from herder.services.secrets.repository import credential_values
from herder.services.secrets.service import KEY_FILE_CHECK_S as SERVICE_KEY_CHECK_S
from tests.fleet import Fleet, command_process, python_process, running_fleet
from tests.support import connect_as, eventually

PASSWORD = "s3cr3t-Pa55word-for-the-ERP"


@pytest.fixture
async def fleet(nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    async with running_fleet(nats_url, db_url, tmp_path, credential) as started:
        yield started


async def robot_client(fleet: Fleet, name: str, *, groups: list[str]) -> tuple[Client, str]:
    token = await fleet.add_robot(name, groups=groups)
    nc = await connect_as(fleet.nats_url, token, name=f"robot-{name}")
    return Client(nc, token=token, timeout=10.0), token


async def test_a_robot_reads_the_most_specific_value(fleet: Fleet) -> None:
    admin = fleet.client
    await admin.request(AssetSet(name="erp-url", type=AssetType.TEXT, value="https://erp.example/"))
    await admin.request(AssetSet(name="erp-url", value="https://erp-eu.example/", scope=Scope.of(group="eu")))
    await admin.request(AssetSet(name="erp-url", value="https://erp-r2.example/", scope=Scope.of(robot="r2")))
    r1, _ = await robot_client(fleet, "r1", groups=["eu"])
    r2, _ = await robot_client(fleet, "r2", groups=["eu"])
    r3, _ = await robot_client(fleet, "r3", groups=[])
    try:
        # The directory of robots follows the registry: wait until it knows their groups.
        async def eu() -> str | None:
            got = await r1.request(AssetGet(name="erp-url"))
            return got.value if got.scope == Scope.of(group="eu") else None

        assert await eventually(eu, timeout=10.0) == "https://erp-eu.example/"
        assert (await r2.request(AssetGet(name="erp-url"))).scope == Scope.of(robot="r2")
        assert (await r3.request(AssetGet(name="erp-url"))).value == "https://erp.example/"
        shown = await admin.request(AssetGet(name="erp-url", robot="r2"))
        assert shown.value == "https://erp-r2.example/"
        with pytest.raises(Forbidden, match="its own values"):
            await r1.request(AssetGet(name="erp-url", robot="r2"))
        with pytest.raises(NotFound, match="no asset 'nothing'"):
            await r1.request(AssetGet(name="nothing"))
        # Read-only for robots until the asset says otherwise.
        with pytest.raises(Forbidden, match="read-only"):
            await r1.request(AssetWrite(name="erp-url", value="https://evil.example/"))
        await admin.request(AssetSet(name="counter", type=AssetType.INTEGER, value=1, robots_may_write=True))
        written = await r1.request(AssetWrite(name="counter", value=2))
        assert written.value == 2 and written.scope == Scope()
        own = await r1.request(AssetWrite(name="counter", value=7, own=True))
        assert own.scope == Scope.of(robot="r1")
        assert (await r3.request(AssetGet(name="counter"))).value == 2
        with pytest.raises(BadRequest, match=r"integer asset's value is a whole number"):
            await r1.request(AssetWrite(name="counter", value="three"))
    finally:
        for client in (r1, r2, r3):
            await client.nc.close()


async def test_values_are_checked_against_their_type(fleet: Fleet) -> None:
    admin = fleet.client
    with pytest.raises(BadRequest, match=r"bool asset's value is true or false"):
        await admin.request(AssetSet(name="flag", type=AssetType.BOOL, value=1))
    with pytest.raises(BadRequest, match="give its type"):
        await admin.request(AssetSet(name="flag", value=True))
    holidays = await admin.request(
        AssetSet(name="holidays", type=AssetType.CALENDAR, value=["2026-12-25", "2026-01-01", "2026-12-25"])
    )
    assert holidays.values[0].value == ["2026-01-01", "2026-12-25"]
    with pytest.raises(BadRequest, match=r"value\[0\].*not a date"):
        await admin.request(AssetSet(name="holidays", value=["25/12/2026"]))
    with pytest.raises(Conflict, match="of type calendar"):
        await admin.request(AssetSet(name="holidays", type=AssetType.TEXT, value="x"))
    await admin.request(AssetSet(name="limits", type=AssetType.JSON, value={"max": 3, "codes": ["a", "b"]}))
    listed = {asset.name: asset for asset in (await admin.request(AssetListRequest())).assets}
    assert set(listed) == {"holidays", "limits"}  # the refused ones were never created
    await admin.request(AssetDelete(name="limits"))
    with pytest.raises(NotFound):
        await admin.request(AssetGet(name="limits"))


async def test_credentials_are_listed_without_secrets_and_revealed_only_to_admins(fleet: Fleet) -> None:
    admin = fleet.client
    soon = utcnow().date() + timedelta(days=3)
    await credentials.set_credential(admin, "erp", "robot-user", PASSWORD, expires_on=soon)
    await credentials.set_credential(admin, "old", "someone", "Expired-Secret-1", expires_on=date(2020, 1, 1))
    listed = {c.name: c for c in (await admin.request(CredentialListRequest())).credentials}
    assert listed["erp"].values[0].username == "robot-user"
    assert listed["erp"].values[0].expires_soon and not listed["erp"].values[0].expired
    assert listed["old"].values[0].expired
    assert PASSWORD not in listed["erp"].model_dump_json()
    revealed = await credentials.reveal_credential(admin, "erp")
    assert revealed.secret == PASSWORD and revealed.username == "robot-user"
    assert PASSWORD not in repr(revealed)
    operator = (await admin.request(TokenCreate(name="ops", role=Role.OPERATOR))).secret
    as_operator = Client(fleet.nc, token=operator, timeout=10.0)
    assert [c.name for c in (await as_operator.request(CredentialListRequest())).credentials] == ["erp", "old"]
    with pytest.raises(Forbidden, match=r"secrets\.reveal"):
        await credentials.reveal_credential(as_operator, "erp")
    with pytest.raises(NotFound, match="no credential 'nothing'"):
        await credentials.reveal_credential(admin, "nothing")


async def test_a_robot_reads_a_credential_only_during_its_job(fleet: Fleet) -> None:
    await credentials.set_credential(fleet.client, "erp", "robot-user", PASSWORD)
    robot, _ = await robot_client(fleet, "r1", groups=[])
    try:
        with pytest.raises(Forbidden, match="runs no job"):
            await robot.request(CredentialFetch(name="erp", job_id="0" * 32))
        key = X25519PrivateKey.generate()
        await robot.request(RobotKeySet(public_key=sealing.public_text(key.public_key())))
        with pytest.raises(Forbidden, match="runs no job"):
            await robot.request(CredentialFetch(name="erp", job_id="0" * 32))
        other = X25519PrivateKey.generate()
        with pytest.raises(Forbidden, match="reset-key"):
            await robot.request(RobotKeySet(public_key=sealing.public_text(other.public_key())))
    finally:
        await robot.nc.close()


READS_ITS_CREDENTIAL = """
import hashlib
from herder.robot import sdk

def main():
    login = sdk.credential("erp")
    sdk.log.info("logging in", user=login.username, password=login.password)
    print(f"the password is {login.password}", flush=True)
    print(repr(login), flush=True)
    return {"user": login.username, "digest": hashlib.sha256(login.password.encode()).hexdigest(),
            "url": sdk.asset("erp-url")}
"""


async def test_a_job_reads_its_credential_sealed_and_its_log_never_shows_it(fleet: Fleet, tmp_path: Path) -> None:
    await credentials.set_credential(fleet.client, "erp", "robot-user", PASSWORD, processes=["erp-login"])
    await fleet.client.request(AssetSet(name="erp-url", type=AssetType.TEXT, value="https://erp.example/"))
    await fleet.publish(python_process(tmp_path, "erp-login", READS_ITS_CREDENTIAL))
    await fleet.publish(python_process(tmp_path, "other", READS_ITS_CREDENTIAL))
    token = await fleet.add_robot("r1")
    agent = fleet.start_robot("r1", token)
    await fleet.wait_robot("r1", RobotStatus.AVAILABLE, agent=agent)
    job = await fleet.client.request(JobStart(process="erp-login", robot="r1"))
    done = await fleet.wait_job(job.id, JobState.SUCCESSFUL, JobState.FAULTED, timeout=60.0)
    assert done.state is JobState.SUCCESSFUL, done.reason
    assert done.output == {
        "user": "robot-user",
        "digest": hashlib.sha256(PASSWORD.encode()).hexdigest(),
        "url": "https://erp.example/",
    }
    lines = await fleet.logs(job.id)
    shown = json.dumps([line.model_dump(mode="json") for line in lines])
    assert PASSWORD not in shown
    assert any("the password is ***" in line.message for line in lines if line.stream is LogStream.STDOUT)
    assert "password='***'" in shown
    # A process the credential is not for is refused it.
    refused = await fleet.client.request(JobStart(process="other", robot="r1"))
    faulted = await fleet.wait_job(refused.id, JobState.SUCCESSFUL, JobState.FAULTED, timeout=60.0)
    assert faulted.state is JobState.FAULTED
    assert "not 'other'" in json.dumps([line.model_dump(mode="json") for line in await fleet.logs(refused.id)])


async def test_a_tampered_secret_fails_alone_and_nothing_is_overwritten(fleet: Fleet) -> None:
    admin = fleet.client
    await credentials.set_credential(admin, "first", "one", "First-Secret-1")
    await credentials.set_credential(admin, "second", "two", "Second-Secret-2")
    await credentials.set_credential(admin, "third", "three", "Third-Secret-3")
    engine = fleet.host.services["secrets"].engine
    async with engine.begin() as connection:
        rows = {
            row.credential_id: bytes(row.ciphertext)
            for row in await connection.execute(text("SELECT credential_id, ciphertext FROM secrets_credential_values"))
        }
        ids = sorted(rows)
        # Swap two rows' ciphertexts, and flip one byte of the third.
        first, second, third = ids
        await connection.execute(
            update(credential_values).where(credential_values.c.credential_id == first).values(ciphertext=rows[second])
        )
        await connection.execute(
            update(credential_values).where(credential_values.c.credential_id == second).values(ciphertext=rows[first])
        )
        flipped = bytearray(rows[third])
        flipped[-1] ^= 0x01
        where = credential_values.c.credential_id == third
        await connection.execute(update(credential_values).where(where).values(ciphertext=bytes(flipped)))
    for name in ("first", "second", "third"):
        with pytest.raises(DecryptionFailed, match="does not decrypt"):
            await credentials.reveal_credential(admin, name)
    # The service goes on serving, and setting a value again heals it.
    await credentials.set_credential(admin, "third", "three", "Third-Secret-3b")
    assert (await credentials.reveal_credential(admin, "third")).secret == "Third-Secret-3b"
    with pytest.raises(DecryptionFailed):
        await credentials.reveal_credential(admin, "first")


async def test_the_secret_is_nowhere_on_the_bus_in_the_database_the_store_or_the_logs(
    fleet: Fleet, tmp_path: Path, credential: ServiceCredential, capsys: pytest.CaptureFixture[str]
) -> None:
    """Everything the bus carries while a robot's job fetches a credential and an operator reveals it,
    captured with the services' own identity (which sees every subject and header)."""
    captured: list[bytes] = []

    async def keep(msg: Msg) -> None:
        captured.append(msg.subject.encode() + repr(msg.headers).encode() + msg.data)

    spy = await connect(fleet.nats_url, name="capture", credentials=credential.service)
    try:
        await spy.subscribe(">", cb=keep)
        await credentials.set_credential(fleet.client, "erp", "robot-user", PASSWORD)
        await fleet.client.request(AssetSet(name="erp-url", type=AssetType.TEXT, value="https://erp.example/"))
        await fleet.publish(python_process(tmp_path, "erp-login", READS_ITS_CREDENTIAL))
        token = await fleet.add_robot("r1")
        agent = fleet.start_robot("r1", token)
        await fleet.wait_robot("r1", RobotStatus.AVAILABLE, agent=agent)
        job = await fleet.client.request(JobStart(process="erp-login", robot="r1"))
        done = await fleet.wait_job(job.id, JobState.SUCCESSFUL, JobState.FAULTED, timeout=60.0)
        assert done.state is JobState.SUCCESSFUL, done.reason
        assert (await credentials.reveal_credential(fleet.client, "erp")).secret == PASSWORD
        await spy.flush()
    finally:
        await spy.close()
    assert any(b"credential_fetch" in message for message in captured)  # the capture saw the traffic
    assert not [message for message in captured if PASSWORD.encode() in message]
    await fleet.stop_robots()
    secret = PASSWORD.encode()
    # The test's folder holds the SQLite database (on that run), the JetStream store, the robot's
    # work folder and its log; the services log here, to the captured output.
    holding = await asyncio.to_thread(_files_holding, tmp_path, secret)
    assert not holding, f"the secret is in {holding}"
    assert PASSWORD not in capsys.readouterr().out
    engine = fleet.host.services["secrets"].engine
    async with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            tables = (
                await connection.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"))
            ).scalars()
            for table in list(tables):
                rows = await connection.execute(text(f'SELECT row_to_json(t)::text FROM "{table}" t'))
                assert not [row for row in rows.scalars() if PASSWORD in row], f"the secret is in table {table}"


def _files_holding(root: Path, data: bytes) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and data in path.read_bytes()]


async def test_a_key_rotation_under_load_fails_no_read(fleet: Fleet, tmp_path: Path) -> None:
    admin = fleet.client
    names = [f"login-{n}" for n in range(4)]
    for name in names:
        await credentials.set_credential(admin, name, "user", f"Secret-of-{name}")
    key_file = tmp_path / envelope.KEY_FILE
    assert key_file.exists()
    reads, failures = 0, []
    stop = asyncio.Event()

    async def read_forever(name: str) -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                assert (await credentials.reveal_credential(admin, name)).secret == f"Secret-of-{name}"
                reads += 1
            except Exception as exc:  # every failure is one too many: kept, to be shown
                failures.append(repr(exc))

    readers = [asyncio.ensure_future(read_forever(name)) for name in names]
    try:
        await asyncio.sleep(0.3)
        version = await asyncio.to_thread(envelope.add_version, key_file)
        report = await admin.request(SecretsRewrap())
        assert report.current_version == version == 2
        assert report.rewrapped == len(names) and report.in_use == {"2": len(names)} and not report.failed
        # Set during the rotation: written under the new version.
        await credentials.set_credential(admin, "fresh", "user", "Secret-of-fresh")
        await asyncio.sleep(0.3)
        await asyncio.to_thread(envelope.retire_version, key_file, 1)
        await asyncio.sleep(SERVICE_KEY_CHECK_S + 1.0)  # the service reads the file again
        assert (await admin.request(SecretsRewrap())).versions_loaded == [2]
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*readers)
    assert not failures, failures[:3]
    assert reads > 20
    assert (await credentials.reveal_credential(admin, "fresh")).secret == "Secret-of-fresh"


RF_SUITE = """
*** Settings ***
Library    herder.robot.RobotLibrary

*** Tasks ***
Log In
    ${login}=    Get Credential    erp
    Should Be Equal    ${login.username}    robot-user
    ${length}=    Get Length    ${login.password}
    Should Be Equal As Integers    ${length}    PASSWORD_LENGTH
    ${url}=    Get Asset    erp-url
    Should Be Equal    ${url}    https://erp.example/
""".replace("PASSWORD_LENGTH", str(len(PASSWORD)))

# Runs the suite at the most talkative log level, then looks for the password in what it wrote.
RF_RUN_AND_CHECK = """
import os
import sys
from pathlib import Path

import robot

from herder.robot import sdk

out = Path(os.environ["HERDER_JOB_DIR"]) / "rf"
code = robot.run("suite.robot", outputdir=str(out), loglevel="TRACE", report="NONE", consolecolors="off")
if code:
    sys.exit(code)
secret = sdk.credential("erp").password
leaks = [name for name in ("output.xml", "log.html") if secret in (out / name).read_text()]
print(f"leaks: {leaks}", flush=True)
sys.exit(5 if leaks else 0)
"""


async def test_the_robot_framework_library_keeps_the_password_out_of_its_output(fleet: Fleet, tmp_path: Path) -> None:
    await credentials.set_credential(fleet.client, "erp", "robot-user", PASSWORD)
    await fleet.client.request(AssetSet(name="erp-url", type=AssetType.TEXT, value="https://erp.example/"))
    await fleet.publish(
        command_process(
            tmp_path, "rf-login", [sys.executable, "check.py"], {"suite.robot": RF_SUITE, "check.py": RF_RUN_AND_CHECK}
        )
    )
    token = await fleet.add_robot("r1")
    agent = fleet.start_robot("r1", token)
    await fleet.wait_robot("r1", RobotStatus.AVAILABLE, agent=agent)
    job = await fleet.client.request(JobStart(process="rf-login", robot="r1"))
    done = await fleet.wait_job(job.id, JobState.SUCCESSFUL, JobState.FAULTED, timeout=90.0)
    lines = [line.message for line in await fleet.logs(job.id)]
    assert done.state is JobState.SUCCESSFUL, (done.reason, lines[-20:])
    assert "leaks: []" in lines
    assert PASSWORD not in "\n".join(lines)


WRITES_ITS_CREDENTIAL = """
from herder.robot import sdk

def main():
    sdk.set_credential("rotating-login", "robot-user", "Changed-By-The-Robot-9")
    try:
        sdk.set_credential("fixed-login", "robot-user", "Not-Allowed-1")
    except sdk.CallError as exc:
        return {"refused": exc.code}
    return {"refused": None}
"""


async def test_a_robot_writes_a_credential_it_may_write_and_no_other(fleet: Fleet, tmp_path: Path) -> None:
    await credentials.set_credential(fleet.client, "rotating-login", "robot-user", "Before-1", robots_may_write=True)
    await credentials.set_credential(fleet.client, "fixed-login", "robot-user", "Fixed-1")
    await fleet.publish(python_process(tmp_path, "changer", WRITES_ITS_CREDENTIAL))
    token = await fleet.add_robot("r1")
    agent = fleet.start_robot("r1", token)
    await fleet.wait_robot("r1", RobotStatus.AVAILABLE, agent=agent)
    job = await fleet.client.request(JobStart(process="changer", robot="r1"))
    done = await fleet.wait_job(job.id, JobState.SUCCESSFUL, JobState.FAULTED, timeout=60.0)
    assert done.state is JobState.SUCCESSFUL, done.reason
    assert done.output == {"refused": "forbidden"}
    assert (await credentials.reveal_credential(fleet.client, "rotating-login")).secret == "Changed-By-The-Robot-9"
    assert (await credentials.reveal_credential(fleet.client, "fixed-login")).secret == "Fixed-1"
    logged = json.dumps([line.model_dump(mode="json") for line in await fleet.logs(job.id)])
    assert "Changed-By-The-Robot-9" not in logged
