"""Mail triggers against a real IMAP server: a private dovecot on loopback (installed with apt-get when
missing, on developer machines only), and the real secrets, storage, jobs and scheduler services.

The mails are delivered by writing them into the test's Maildir, as a mail server would; what the
trigger did to them (read, moved) is looked at over IMAP with the standard library's client.
"""

from __future__ import annotations

import asyncio
import fcntl
import grp
import hashlib
import imaplib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from herder.client import storage
from herder.client.secrets import reveal_credential, set_credential
from herder.client.tasks import Supervisor, TaskStatus
from herder.protocol import subjects
from herder.protocol.auth import Principal, PrincipalKind, Role
from herder.protocol.errors import Forbidden, HerderError, NotFound
from herder.protocol.jobs import JobInfo, JobListRequest, JobShow, JobStart, JobState
from herder.protocol.registry import RobotStatus
from herder.protocol.scheduler import (
    MailAfter,
    MailFilters,
    MailRule,
    MailTls,
    TriggerAdd,
    TriggerJob,
    TriggerKind,
    TriggerListRequest,
    TriggerRemove,
    TriggerShow,
)
from herder.protocol.secrets import Scope
from herder.protocol.storage import BucketCreate, FileListRequest
from herder.services.common.credentials import ServiceCredential
from herder.services.scheduler import mailbox
from herder.services.scheduler.mail_wiring import MailTriggers
from herder.services.scheduler.mailbox import Login, MailboxError, MailboxWatcher
from herder.services.scheduler.service import SchedulerService
from herder.services.scheduler.triggers import TriggerRecord
from tests.fleet import Fleet, python_process, running_fleet
from tests.support import eventually

USER = "mailbot"
PASSWORD = "s3cret-wörd"  # not ASCII: the login must go by AUTHENTICATE PLAIN
INSTALL_LOCK = Path("/tmp/herder-tests-dovecot-install.lock")
DOVECOT_START_TIMEOUT_S = 20.0
HOUR_S = 3600.0  # a poll interval no test waits for: the tests poll by hand


# --- a private dovecot ---


def _dovecot_binary() -> str | None:
    found = shutil.which("dovecot")
    if found is None and Path("/usr/sbin/dovecot").exists():
        found = "/usr/sbin/dovecot"
    return found


def _install_dovecot() -> str:
    """dovecot's path, installing dovecot-imapd with apt-get first when it is missing (as root, on a
    developer machine); skips, with the reason, where that cannot be done."""
    if os.environ.get("CI"):
        pytest.skip("mail triggers are tested against dovecot on developer machines only")
    found = _dovecot_binary()
    if found is not None:
        return found
    if os.geteuid() != 0:
        pytest.skip("dovecot-imapd is not installed and installing it takes root: sudo apt-get install dovecot-imapd")
    if shutil.which("apt-get") is None:
        pytest.skip("dovecot-imapd is not installed and there is no apt-get to install it with")
    with INSTALL_LOCK.open("w") as lock:  # pytest-xdist workers install it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _dovecot_binary()
        if found is not None:
            return found
        failure = _apt_install()
        found = _dovecot_binary()
    if found is None:
        pytest.skip(f"dovecot-imapd could not be installed with apt-get: {failure}")
    return found


def _apt_install() -> str:
    """Install dovecot-imapd, without letting its package start the system's dovecot (a private one is
    what the tests run); what went wrong, if it did."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:  # Debian's way to keep a package's postinst from starting its service
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        command = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends"]
        result = subprocess.run([*command, "dovecot-imapd"], env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:  # the package lists may be missing or stale
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            result = subprocess.run([*command, "dovecot-imapd"], env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if result.returncode != 0 and lines else ""


@pytest.fixture(scope="session")
def dovecot_binary() -> str:
    """The dovecot executable (installed when missing, where that can be done)."""
    return _install_dovecot()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost (not for 127.0.0.1), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass
class Dovecot:
    """A dovecot of the test's own: one user, a Maildir, IMAP on loopback (plain and STARTTLS on
    `port`, TLS on `tls_port`), with a self-signed certificate `cert`. Its mail processes run as
    `owner` (uid, gid): dovecot never reads mail as root."""

    root: Path
    port: int
    tls_port: int
    cert: Path
    owner: tuple[int, int]
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def maildir(self) -> Path:
        return self.root / "mail" / USER / "Maildir"

    def deliver(self, message: EmailMessage | bytes, *, seen: bool = False) -> None:
        """Put a mail in the INBOX, as a mail server delivers one (read already, with `seen`)."""
        raw = message if isinstance(message, bytes) else message.as_bytes()
        for part in ("tmp", "new", "cur"):
            (self.maildir / part).mkdir(parents=True, exist_ok=True)
        for folder in (self.maildir.parent.parent, self.maildir.parent, self.maildir, *self.maildir.iterdir()):
            os.chown(folder, *self.owner)
        name = f"{time.time_ns()}.{uuid.uuid4().hex}.herder-test"
        staged = self.maildir / "tmp" / name
        staged.write_bytes(raw)
        os.chown(staged, *self.owner)
        staged.rename(self.maildir / "cur" / f"{name}:2,S" if seen else self.maildir / "new" / name)

    def imap(self) -> imaplib.IMAP4:
        """A client logged in as the user, for the test to look with."""
        client = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        client.authenticate("PLAIN", lambda _: f"\0{USER}\0{PASSWORD}".encode())
        return client

    def unread(self, folder: str = "INBOX") -> list[str]:
        """The subjects of the folder's unread mails."""
        return self._subjects(folder, "UNSEEN")

    def subjects(self, folder: str = "INBOX") -> list[str]:
        """The subjects of every mail of the folder."""
        return self._subjects(folder, "ALL")

    def _subjects(self, folder: str, criteria: str) -> list[str]:
        client = self.imap()
        try:
            status, _ = client.select(mailbox.mailbox_name(folder), readonly=True)
            if status != "OK":
                return []
            _, data = client.uid("SEARCH", criteria)
            uids = data[0].split() if data and data[0] else []
            found: list[str] = []
            for uid in uids:
                _, fetched = client.uid("FETCH", uid.decode(), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                header = fetched[0][1] if fetched and isinstance(fetched[0], tuple) else b""
                found.append(mailbox.parse_mail(header, headers_only=True).subject)
            return sorted(found)
        finally:
            client.logout()

    def start(self, binary: str) -> None:
        for folder in ("run", "state", "mail"):
            (self.root / folder).mkdir()
        os.chown(self.root / "mail", *self.owner)
        passwd = self.root / "passwd"
        passwd.write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
        key = self.cert.with_name("key.pem")
        uid, gid = self.owner
        if os.geteuid() == 0:
            unprivileged = ""
        else:  # dovecot as an ordinary user: every service runs as that user, and none chroots
            name = pwd.getpwuid(os.geteuid()).pw_name
            group = grp.getgrgid(os.getegid()).gr_name
            unprivileged = f"""
default_internal_user = {name}
default_internal_group = {group}
default_login_user = {name}
service auth {{
  user = {name}
}}
service auth-worker {{
  user = {name}
}}
service imap-login {{
  chroot =
}}
service anvil {{
  chroot =
}}
"""
        config = self.root / "dovecot.conf"
        config.write_text(
            f"""
base_dir = {self.root}/run
state_dir = {self.root}/state
instance_name = herder-test-{self.port}
protocols = imap
listen = 127.0.0.1
log_path = {self.root}/dovecot.log
ssl = yes
ssl_cert = <{self.cert}
ssl_key = <{key}
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = {uid}
mail_location = maildir:~/Maildir
{unprivileged}
namespace inbox {{
  inbox = yes
  separator = /
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={self.root}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.tls_port}
    ssl = yes
  }}
}}
"""
        )
        with (self.root / "dovecot.out").open("wb") as out:
            self.process = subprocess.Popen(
                [binary, "-F", "-c", str(config)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + DOVECOT_START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"dovecot exited with {self.process.returncode}:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                    if probe.recv(64).startswith(b"* OK"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"dovecot did not answer within {DOVECOT_START_TIMEOUT_S} s:\n{self.output()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def output(self) -> str:
        """What dovecot said (its log and its console)."""
        texts = [path.read_text(errors="replace") for path in (self.root / "dovecot.log", self.root / "dovecot.out")]
        return "\n".join(text for text in texts if text)[-4000:]


@pytest.fixture
def dovecot(dovecot_binary: str, tmp_path: Path) -> Iterator[Dovecot]:
    """A private dovecot for one test, stopped after it.

    Run by root, dovecot reads mail as `nobody` and its own files as its `dovecot` user, who cannot
    enter pytest's root-only tmp_path: its folder is then one of its own in the temporary directory,
    removed afterwards. Run by anyone else, everything runs as that user, in tmp_path."""
    if os.geteuid() == 0:
        root = Path(tempfile.mkdtemp(prefix="herder-dovecot-"))
        root.chmod(0o755)
        nobody = pwd.getpwnam("nobody")
        owner = (nobody.pw_uid, nobody.pw_gid)
    else:
        root = tmp_path / "dovecot"
        root.mkdir()
        owner = (os.getuid(), os.getgid())
    try:
        cert, _key = _self_signed(root)
        server = Dovecot(root=root, port=_free_port(), tls_port=_free_port(), cert=cert, owner=owner)
        server.start(dovecot_binary)
        try:
            yield server
        finally:
            server.stop()
    finally:
        if not root.is_relative_to(tmp_path):
            shutil.rmtree(root, ignore_errors=True)


# --- mails ---


def mail(
    subject: str,
    *,
    sender: str = "Billing <billing@acme.example>",
    body: str = "Please pay the attached invoice.",
    attachments: dict[str, bytes] | None = None,
    html: str | None = None,
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = f"Mail Bot <{USER}@herder.example>"
    message["Subject"] = subject
    message["Date"] = "Tue, 02 Jun 2026 09:30:00 +0200"
    message["Message-ID"] = f"<{uuid.uuid4().hex}@acme.example>"
    message.set_content(body)
    if html is not None:
        message.add_alternative(html, subtype="html")
    for name, data in (attachments or {}).items():
        message.add_attachment(data, maintype="application", subtype="pdf", filename=name)
    return message


# --- the stack ---


@pytest.fixture
async def fleet(nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    async with running_fleet(nats_url, db_url, tmp_path, credential) as started:
        await started.publish(python_process(tmp_path, "invoices", "def main():\n    return {}\n"))
        await started.add_robot("r1", groups=["pool"])
        await set_credential(started.client, "mailbox", USER, PASSWORD)
        await started.client.request(BucketCreate(name="mail-files"))
        yield started


def rule(server: Dovecot, **changes: Any) -> MailRule:
    given: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port,
        "tls": MailTls.NONE,
        "credential": "mailbox",
        "bucket": "mail-files",
        "poll_s": HOUR_S,
        **changes,
    }
    return MailRule(**given)


class Crash(Exception):
    """The scheduler died."""


@dataclass
class Calls:
    """The callables a watcher is given, doing real work through the fleet's admin client."""

    fleet: Fleet
    started: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    reveals: int = 0
    refuse_with: HerderError | None = None
    # The scheduler dies right after the job was made, before the mail is marked.
    crash_after_start: bool = False
    # The trigger's last jobs are not found (as if many more had been made since).
    forget_jobs: bool = False

    async def reveal(self, name: str) -> Login:
        self.reveals += 1
        revealed = await reveal_credential(self.fleet.client, name)
        return Login(revealed.username, revealed.secret)

    async def store(self, bucket: str, path: str, data: bytes, content_type: str) -> str:
        local = self.fleet.root / f"upload-{uuid.uuid4().hex}"
        local.write_bytes(data)
        try:
            return (await storage.upload(self.fleet.client, bucket, path, local, content_type=content_type)).path
        finally:
            local.unlink()

    async def start_job(self, given: dict[str, Any], key: str) -> str:
        if self.refuse_with is not None:
            raise self.refuse_with
        job = await self.fleet.client.request(
            JobStart(process="invoices", robot="r1", input=given), idempotency_key=key
        )
        self.started.append((job.id, given))
        if self.crash_after_start:
            raise Crash
        return job.id

    async def recent_inputs(self) -> list[dict[str, Any]]:
        if self.forget_jobs:
            return []
        listed = await self.fleet.client.request(JobListRequest(process="invoices", limit=200))
        return [job.input for job in listed.jobs]

    def watcher(
        self, mail_rule: MailRule, *, trigger_id: str = "t" * 32, base: dict[str, Any] | None = None
    ) -> MailboxWatcher:
        return MailboxWatcher(
            trigger_id="t" * 32,
            trigger_name="invoices-in",
            rule=mail_rule,
            base_input=base or {},
            reveal=self.reveal,
            store=self.store,
            start_job=self.start_job,
            recent_inputs=self.recent_inputs,
            log=structlog.get_logger("test"),
        )


async def jobs(fleet: Fleet) -> list[JobInfo]:
    return (await fleet.client.request(JobListRequest(process="invoices", limit=1000))).jobs


async def test_the_filters_pick_the_right_mails_and_their_attachments_land_in_the_bucket(
    fleet: Fleet, dovecot: Dovecot
) -> None:
    pdf = os.urandom(300_000)
    dovecot.deliver(mail("Invoice 42", attachments={"invoice.pdf": pdf, "dir/invoice.pdf": b"%PDF-1.4 second"}))
    dovecot.deliver(mail("Newsletter", body="Please pay attention"))  # the wrong subject
    dovecot.deliver(mail("Invoice 43", sender="Mallory <m@evil.example>"))  # the wrong sender
    dovecot.deliver(mail("invoice 44", body="Nothing to see"))  # the wrong body
    dovecot.deliver(mail("Invoice 45"), seen=True)  # read already
    calls = Calls(fleet)
    filters = MailFilters(subject_contains="INVOICE", sender_contains="acme.example", body_contains="pay")
    watcher = calls.watcher(rule(dovecot, filters=filters), base={"customer": "acme"})

    assert await watcher.poll_once() == 1
    [(job_id, given)] = calls.started
    assert given["customer"] == "acme"
    got = given["mail"]
    assert got["subject"] == "Invoice 42" and got["from"] == "Billing <billing@acme.example>"
    assert got["to"] == [f"Mail Bot <{USER}@herder.example>"] and got["folder"] == "INBOX"
    assert got["date"] == "2026-06-02T09:30:00+02:00" and got["message_id"].endswith("@acme.example>")
    assert got["body_text"].strip() == "Please pay the attached invoice." and not got["body_truncated"]
    assert isinstance(got["uid"], int) and isinstance(got["uidvalidity"], int)
    first, second = got["attachments"]
    assert (first["name"], first["size"], first["content_type"]) == ("invoice.pdf", len(pdf), "application/pdf")
    assert second["name"] == "invoice (2).pdf"
    prefix = f"mail/invoices-in/{got['uidvalidity']}-{got['uid']}/"
    assert (first["bucket"], first["path"]) == ("mail-files", prefix + "invoice.pdf")
    assert second["path"] == prefix + "invoice (2).pdf"
    # What the job gets from the bucket is the attachment, byte for byte.
    target = fleet.root / "downloaded.pdf"
    fetched = await storage.download(fleet.client, "mail-files", first["path"], target)
    assert fetched.sha256 == hashlib.sha256(pdf).hexdigest() and target.read_bytes() == pdf
    listed = await fleet.client.request(FileListRequest(bucket="mail-files"))
    assert sorted(f.path for f in listed.files) == [prefix + "invoice (2).pdf", prefix + "invoice.pdf"]
    # The job exists, with the mail as its input; the mail is read now, the others are as they were.
    job = await fleet.client.request(JobShow(id=job_id))
    assert job.input == given
    assert await asyncio.to_thread(dovecot.unread) == ["Invoice 43", "Newsletter", "invoice 44"]

    # A second poll makes no second job (and does not fetch the mails it has judged again).
    assert await watcher.poll_once() == 0
    assert len(await jobs(fleet)) == 1
    # A new matching mail is the next poll's.
    dovecot.deliver(mail("Invoice 46"))
    assert await watcher.poll_once() == 1
    assert [given["mail"]["subject"] for _id, given in calls.started] == ["Invoice 42", "Invoice 46"]
    assert calls.reveals == 1  # the secret is kept in memory between polls, not revealed each time


async def test_a_batch_makes_one_job_and_mails_can_be_moved(fleet: Fleet, dovecot: Dovecot) -> None:
    for number in range(5):
        dovecot.deliver(mail(f"Order {number}", attachments={f"order-{number}.pdf": b"%PDF " + bytes([number])}))
    dovecot.deliver(mail("Order 9"), seen=True)  # read, and unread_only: not taken
    calls = Calls(fleet)
    watcher = calls.watcher(rule(dovecot, batch=True, after=MailAfter.MOVE, move_to="Done/Orders"))

    assert await watcher.poll_once() == 1
    [(_job_id, given)] = calls.started
    assert [m["subject"] for m in given["mails"]] == [f"Order {n}" for n in range(5)]
    assert all(len(m["attachments"]) == 1 and m["attachments"][0]["path"] for m in given["mails"])
    # Moved (the folder made on the way), and nothing left behind but the mail read before.
    assert await asyncio.to_thread(dovecot.subjects, "Done/Orders") == [f"Order {n}" for n in range(5)]
    assert await asyncio.to_thread(dovecot.subjects) == ["Order 9"]
    assert await watcher.poll_once() == 0
    assert len(await jobs(fleet)) == 1


async def test_unread_only_false_takes_read_mails_too(fleet: Fleet, dovecot: Dovecot) -> None:
    dovecot.deliver(mail("Invoice 1"), seen=True)
    dovecot.deliver(mail("Invoice 2"))
    calls = Calls(fleet)
    watcher = calls.watcher(rule(dovecot, unread_only=False, after=MailAfter.MOVE, move_to="Archive"))
    assert await watcher.poll_once() == 2
    assert await asyncio.to_thread(dovecot.subjects, "Archive") == ["Invoice 1", "Invoice 2"]
    assert await asyncio.to_thread(dovecot.subjects) == []


async def test_no_mail_is_lost_or_made_twice_across_a_crash(fleet: Fleet, dovecot: Dovecot) -> None:
    """A crash between making a mail's job and marking it leaves the mail unread; the poll of the
    watcher that starts next makes no second job, in one-job-per-mail mode and in batch mode."""
    dovecot.deliver(mail("Invoice 1"))
    dovecot.deliver(mail("Invoice 2"))
    calls = Calls(fleet, crash_after_start=True)
    with pytest.raises(Crash):
        await calls.watcher(rule(dovecot)).poll_once()
    assert len(await jobs(fleet)) == 1
    assert await asyncio.to_thread(dovecot.unread) == ["Invoice 1", "Invoice 2"]
    # The next scheduler knows the first mail has its job (it reads the trigger's last jobs): it
    # marks it, and makes the second mail's job.
    calls.crash_after_start = False
    assert await calls.watcher(rule(dovecot)).poll_once() == 1
    made = await jobs(fleet)
    assert sorted(job.input["mail"]["subject"] for job in made) == ["Invoice 1", "Invoice 2"]
    assert await asyncio.to_thread(dovecot.unread) == []

    # Even one that cannot see the job (long gone from the trigger's last jobs) makes no second one:
    # the same mail asks for its job under the same key, and the jobs service answers with the first.
    dovecot.deliver(mail("Invoice 3"))
    calls.crash_after_start = True
    with pytest.raises(Crash):
        await calls.watcher(rule(dovecot)).poll_once()
    calls.crash_after_start, calls.forget_jobs = False, True
    assert await calls.watcher(rule(dovecot)).poll_once() == 1
    assert len(await jobs(fleet)) == 3 and calls.started[-1][0] == calls.started[-2][0]
    calls.forget_jobs = False

    # Batch mode: the batch job is made, the scheduler dies; meanwhile another mail arrives.
    dovecot.deliver(mail("Invoice 4"))
    dovecot.deliver(mail("Invoice 5"))
    batch_rule = rule(dovecot, batch=True)
    calls.crash_after_start = True
    with pytest.raises(Crash):
        await calls.watcher(batch_rule).poll_once()
    dovecot.deliver(mail("Invoice 6"))
    calls.crash_after_start = False
    assert await calls.watcher(batch_rule).poll_once() == 1
    batches = [job.input["mails"] for job in await jobs(fleet) if "mails" in job.input]
    assert sorted([m["subject"] for m in batch] for batch in batches) == [["Invoice 4", "Invoice 5"], ["Invoice 6"]]
    assert await asyncio.to_thread(dovecot.unread) == []


async def test_a_refusal_for_good_marks_the_mail_and_a_passing_one_leaves_it(fleet: Fleet, dovecot: Dovecot) -> None:
    dovecot.deliver(mail("Invoice 1"))
    calls = Calls(fleet)
    watcher = calls.watcher(rule(dovecot))
    calls.refuse_with = HerderError("the jobs service is restarting")  # may pass: the mail waits
    assert await watcher.poll_once() == 0
    assert await asyncio.to_thread(dovecot.unread) == ["Invoice 1"]
    calls.refuse_with = NotFound("no robot named 'r1'")  # for good: the mail is marked, the refusal logged
    with structlog.testing.capture_logs() as logged:
        assert await watcher.poll_once() == 0
    assert await asyncio.to_thread(dovecot.unread) == []
    assert any(entry["event"] == "mail.job_refused" and "r1" in entry["reason"] for entry in logged)


async def test_tls_and_starttls_check_the_certificate(
    fleet: Fleet, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    dovecot.deliver(mail("Invoice 1"))
    dovecot.deliver(mail("Invoice 2"))
    calls = Calls(fleet)
    # Nobody vouches for the server's certificate: no login, no secret sent.
    tls = rule(dovecot, host="localhost", tls=MailTls.TLS, port=dovecot.tls_port)
    with pytest.raises(MailboxError, match=r"handshake failed \(certificate verify failed: self.signed certificate"):
        await calls.watcher(tls).poll_once()
    monkeypatch.setenv("SSL_CERT_FILE", str(dovecot.cert))
    assert await calls.watcher(tls).poll_once() == 2
    dovecot.deliver(mail("Invoice 3"))
    assert await calls.watcher(rule(dovecot, host="localhost", tls=MailTls.STARTTLS)).poll_once() == 1
    # The certificate names localhost, not 127.0.0.1: the same server by another name is refused.
    dovecot.deliver(mail("Invoice 4"))
    with pytest.raises(MailboxError, match=r"TLS handshake failed .*not valid for '127\.0\.0\.1'"):
        await calls.watcher(rule(dovecot, tls=MailTls.TLS, port=dovecot.tls_port)).poll_once()
    with pytest.raises(MailboxError, match="TLS handshake failed"):
        await calls.watcher(rule(dovecot, tls=MailTls.STARTTLS)).poll_once()
    assert await asyncio.to_thread(dovecot.unread) == ["Invoice 4"]


async def test_a_refused_login_says_so_and_reveals_again(fleet: Fleet, dovecot: Dovecot) -> None:
    await set_credential(fleet.client, "wrong", USER, "not-the-password")
    calls = Calls(fleet)
    watcher = calls.watcher(rule(dovecot, credential="wrong"))
    for _ in range(2):
        with pytest.raises(MailboxError, match="login was refused") as refused:
            await watcher.poll_once()
        assert "not-the-password" not in str(refused.value)
    assert calls.reveals == 2  # a refused login may mean a changed password: it is revealed again
    with pytest.raises(MailboxError, match="cannot open folder 'Nowhere'"):
        await calls.watcher(rule(dovecot, folder="Nowhere")).poll_once()


# --- through the scheduler's own wiring ---


@dataclass(frozen=True)
class MailRecord:
    """A mail trigger as the scheduler's TriggerRecord holds one."""

    id: str
    tenant: str
    name: str
    enabled: bool
    job: TriggerJob
    mail: MailRule | None

    def job_start(self) -> JobStart:
        spec = self.job.model_dump(exclude={"max_concurrent"})
        return JobStart(**spec, trigger=self.name, max_concurrent=self.job.max_concurrent)


def scheduler(fleet: Fleet) -> SchedulerService:
    found = fleet.host.services["scheduler"]
    assert isinstance(found, SchedulerService)
    return found


def wiring(fleet: Fleet) -> MailTriggers:
    service = scheduler(fleet)
    return MailTriggers(
        service.runtime, tasks=service.tasks, repo=service.repo, instance_id=service.instance_id, log=service.log
    )


async def test_the_scheduler_watches_a_mail_trigger_as_itself(fleet: Fleet, dovecot: Dovecot) -> None:
    dovecot.deliver(mail("Invoice 1", attachments={"a.pdf": b"%PDF-1.4 a"}))
    mail_triggers = wiring(fleet)
    record = MailRecord(
        id=uuid.uuid4().hex,
        tenant=subjects.DEFAULT_TENANT,
        name="invoices-in",
        enabled=True,
        job=TriggerJob(process="invoices", robot="r1", input={"source": "mail"}),
        mail=rule(dovecot),
    )
    try:
        await mail_triggers.install(record)

        async def one_job() -> list[JobInfo] | None:
            made = (await fleet.client.request(JobListRequest(trigger="invoices-in"))).jobs
            return made if len(made) == 1 else None

        [job] = await eventually(one_job, timeout=20)
        assert job.created_by == "scheduler" and job.trigger == "invoices-in"
        assert job.input["source"] == "mail" and job.input["mail"]["subject"] == "Invoice 1"
        assert job.input["mail"]["attachments"][0]["bucket"] == "mail-files"

        async def all_read() -> bool:
            return await asyncio.to_thread(dovecot.unread) == []

        await eventually(all_read, timeout=10)
        # The fire is in the trigger's history.
        async with scheduler(fleet).engine.connect() as connection:
            fires = await scheduler(fleet).repo.recent(connection, record.id, 10)
        assert [(fire.cause, fire.job_id) for fire in fires] == [("mail", job.id)]
        # One replica holds the mailbox; another does not poll it meanwhile.
        other_tasks = Supervisor()
        other = MailTriggers(
            scheduler(fleet).runtime,
            tasks=other_tasks,
            repo=scheduler(fleet).repo,
            instance_id="other-replica",
            log=scheduler(fleet).log,
        )
        try:
            dovecot.deliver(mail("Invoice 2"))
            await other.install(record)
            assert await other.poll_now(record.id) is None
            assert await mail_triggers.poll_now(record.id) == 1
            assert mail_triggers.watched() == {"invoices-in": None}
            # Disabled here: no longer watched, and the lease is handed back, so the other replica
            # takes the mailbox over at once.
            await mail_triggers.install(replace(record, enabled=False))
            assert mail_triggers.watched() == {}
            assert scheduler(fleet).tasks.states()[f"scheduler.mail.{record.id}"].status is TaskStatus.STOPPED
            dovecot.deliver(mail("Invoice 3"))
            assert await other.poll_now(record.id) == 1
            assert len((await fleet.client.request(JobListRequest(trigger="invoices-in"))).jobs) == 3
        finally:
            await other.stop()
            await other_tasks.stop()
    finally:
        await mail_triggers.stop()


async def test_a_new_mail_trigger_is_checked(fleet: Fleet, dovecot: Dovecot) -> None:
    mail_triggers = wiring(fleet)
    admin = Principal(kind=PrincipalKind.USER, name="admin", role=Role.ADMIN, permissions=frozenset({"*"}))
    await mail_triggers.check(fleet.client, admin, rule(dovecot))
    with pytest.raises(NotFound, match="no credential 'nobody'"):
        await mail_triggers.check(fleet.client, admin, rule(dovecot, credential="nobody"))
    with pytest.raises(NotFound, match="no bucket 'nowhere'"):
        await mail_triggers.check(fleet.client, admin, rule(dovecot, bucket="nowhere"))
    await mail_triggers.check(fleet.client, admin, rule(dovecot, bucket=None))
    await set_credential(fleet.client, "robot-only", USER, PASSWORD, scope=Scope.of(robot="r1"))
    with pytest.raises(NotFound, match="'robot-only' has no global value"):
        await mail_triggers.check(fleet.client, admin, rule(dovecot, credential="robot-only"))
    operator = Principal(
        kind=PrincipalKind.USER, name="op", role=Role.OPERATOR, permissions=frozenset({"secrets.credentials.read"})
    )
    with pytest.raises(Forbidden, match=r"secrets\.reveal"):
        await mail_triggers.check(fleet.client, operator, rule(dovecot))
    # A rule that moves mails names where to; the scheduler refuses it before anything else.
    body = {
        "name": "bad",
        "job": {"process": "invoices", "robot": "r1"},
        "mail": {"host": "127.0.0.1", "credential": "mailbox", "after": "move"},
    }
    reply = await fleet.nc.request(
        subjects.service(fleet.tenant, "scheduler", "trigger_add"),
        json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {fleet.admin_token}", "Content-Type": "application/json"},
        timeout=10,
    )
    assert reply.headers and reply.headers.get("Nats-Service-Error-Code") is not None
    answer = json.loads(reply.data)
    assert answer["code"] == "bad_request" and "move_to" in answer["message"], answer
    with pytest.raises(ValueError, match="move_to"):
        MailRule(host="127.0.0.1", credential="mailbox", after=MailAfter.MOVE)


READS_MAIL = """
import hashlib
import os
from herder.robot import sdk

def main(job):
    mail = job["mail"]
    digests = {}
    for attachment in mail["attachments"]:
        here = os.path.join(os.environ["HERDER_JOB_DIR"], attachment["name"])
        sdk.storage(attachment["bucket"]).get(attachment["path"], here)
        with open(here, "rb") as handle:
            digests[attachment["name"]] = hashlib.sha256(handle.read()).hexdigest()
    return {"subject": mail["subject"], "digests": digests}
"""


async def test_a_job_reads_its_mails_attachments_through_its_sdk(fleet: Fleet, dovecot: Dovecot) -> None:
    scan = os.urandom(200_000)
    dovecot.deliver(mail("Invoice 7", attachments={"scan.pdf": scan}))
    await fleet.publish(python_process(fleet.root, "reads-mail", READS_MAIL))
    agent = fleet.start_robot("r2", await fleet.add_robot("r2"))
    await fleet.wait_robot("r2", RobotStatus.AVAILABLE, agent=agent)
    mail_triggers = wiring(fleet)
    record = MailRecord(
        id=uuid.uuid4().hex,
        tenant=subjects.DEFAULT_TENANT,
        name="reads-mail",
        enabled=True,
        job=TriggerJob(process="reads-mail", robot="r2"),
        mail=rule(dovecot),
    )
    try:
        await mail_triggers.install(record)

        async def started() -> JobInfo | None:
            made = (await fleet.client.request(JobListRequest(trigger="reads-mail"))).jobs
            return made[0] if made else None

        job = await eventually(started, timeout=20)
        done = await fleet.wait_job(job.id, JobState.SUCCESSFUL, timeout=60)
        assert done.output == {"subject": "Invoice 7", "digests": {"scan.pdf": hashlib.sha256(scan).hexdigest()}}
    finally:
        await mail_triggers.stop()


@pytest.mark.skipif(
    "mail" not in TriggerRecord.__dataclass_fields__,
    reason="the scheduler service does not hold mail triggers yet (TriggerRecord has no 'mail')",
)
async def test_a_mail_trigger_added_through_the_scheduler_starts_jobs(fleet: Fleet, dovecot: Dovecot) -> None:
    dovecot.deliver(mail("Invoice 1", attachments={"a.pdf": b"%PDF-1.4 a"}))
    job = TriggerJob(process="invoices", robot="r1")
    with pytest.raises(NotFound, match="no credential 'nobody'"):
        await fleet.client.request(TriggerAdd(name="mailbox", job=job, mail=rule(dovecot, credential="nobody")))
    with pytest.raises(NotFound, match="no bucket 'nowhere'"):
        await fleet.client.request(TriggerAdd(name="mailbox", job=job, mail=rule(dovecot, bucket="nowhere")))
    watched = rule(dovecot, poll_s=5)
    added = await fleet.client.request(TriggerAdd(name="mailbox", job=job, mail=watched))
    assert added.kind is TriggerKind.MAIL and added.mail == watched and added.next_fires == []

    async def made() -> list[JobInfo] | None:
        found = (await fleet.client.request(JobListRequest(trigger="mailbox"))).jobs
        return found or None

    [first] = await eventually(made, timeout=20)
    assert first.input["mail"]["subject"] == "Invoice 1" and first.created_by == "scheduler"

    async def recorded() -> bool:  # the fire is written once the job exists
        details = await fleet.client.request(TriggerShow(name="mailbox"))
        return details.trigger.runs == 1 and [(f.cause, f.job_id) for f in details.fires] == [("mail", first.id)]

    await eventually(recorded, timeout=10)
    assert (await fleet.client.request(TriggerListRequest())).triggers[0].mail == watched
    await fleet.client.request(TriggerRemove(name="mailbox"))
    assert await asyncio.to_thread(dovecot.unread) == []
