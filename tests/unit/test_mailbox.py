"""Mail triggers' pure part: reading mails, the filters, the job's input and its key, batching; and the
watcher's decisions against an in-memory mailbox (what is marked when, what waits for the next poll)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from herder.protocol.errors import BadRequest, Conflict, NotFound, Unavailable
from herder.protocol.jobs import MAX_INPUT_BYTES
from herder.protocol.scheduler import MailAfter, MailFilters, MailRule, MailTls, QueueRule, TriggerAdd, TriggerJob
from herder.protocol.values import check_value
from herder.services.scheduler.mailbox import (
    MAX_BODY_BYTES,
    Attachment,
    ImapSession,
    Login,
    MailboxError,
    MailboxWatcher,
    attachment_entry,
    attachment_names,
    attachment_path,
    batches,
    handed_mails,
    html_text,
    job_input,
    job_key,
    mail_value,
    mailbox_name,
    matches,
    parse_mail,
    uid_sets,
)


def message(
    subject: str = "Invoice 42",
    *,
    sender: str = "Billing <billing@acme.example>",
    body: str = "Please pay.",
    files: dict[str, bytes] | None = None,
) -> EmailMessage:
    built = EmailMessage()
    built["From"] = sender
    built["To"] = "Bot <bot@herder.example>, other@herder.example"
    built["Subject"] = subject
    built["Date"] = "Tue, 02 Jun 2026 09:30:00 +0200"
    built["Message-ID"] = "<1@acme.example>"
    built.set_content(body)
    for name, data in (files or {}).items():
        built.add_attachment(data, maintype="application", subtype="pdf", filename=name)
    return built


# --- reading ---


def test_a_mail_is_read_with_its_headers_decoded_and_its_attachments() -> None:
    built = message(files={"invoice.pdf": b"%PDF-1.4", "dir/invoice.pdf": b"%PDF-1.5"})
    built.replace_header("Subject", "=?utf-8?q?Rechnung_f=C3=BCr_Juni?=")
    mail = parse_mail(built.as_bytes())
    assert mail.subject == "Rechnung für Juni" and mail.sender == "Billing <billing@acme.example>"
    assert mail.to == ("Bot <bot@herder.example>", "other@herder.example") and mail.cc == ()
    assert mail.date == "2026-06-02T09:30:00+02:00" and mail.message_id == "<1@acme.example>"
    assert mail.body_text.strip() == "Please pay."
    assert [(a.name, a.content_type, a.data) for a in mail.attachments] == [
        ("invoice.pdf", "application/pdf", b"%PDF-1.4"),
        ("dir/invoice.pdf", "application/pdf", b"%PDF-1.5"),
    ]
    assert attachment_names(mail.attachments) == ["invoice.pdf", "invoice (2).pdf"]
    headers = parse_mail(built.as_bytes(), headers_only=True)
    assert headers.subject == mail.subject and headers.body_text == "" and headers.attachments == ()


def test_an_html_only_mail_gives_its_text_and_a_forwarded_mail_is_one_attachment() -> None:
    built = EmailMessage()
    built["Subject"] = "Fwd"
    built["Date"] = "Tue, 02 Jun 2026 09:30:00 -0000"
    built.set_content(
        "<html><head><style>p{}</style></head><body><p>Hello&nbsp;<b>there</b></p>x</body></html>", "html"
    )
    built.add_attachment(message("Inner"))  # message/rfc822
    built.add_attachment(b"\x89PNG", maintype="image", subtype="png", filename="logo.png", disposition="inline")
    mail = parse_mail(built.as_bytes())
    assert mail.body_text == "Hello there\nx"  # a no-break space is a space
    assert mail.date == "2026-06-02T09:30:00+00:00"  # -0000: UTC
    assert [a.content_type for a in mail.attachments] == ["message/rfc822", "image/png"]
    assert parse_mail(mail.attachments[0].data).subject == "Inner"
    assert attachment_names(mail.attachments) == ["attachment-1.eml", "logo.png"]


def test_a_malformed_mail_is_read_as_well_as_it_can_be() -> None:
    raw = (
        b"From: =?x-unknown?q?M=FCller?= <m@example>\r\nSubject: =?utf-8?b?broken\r\nDate: yesterday\r\n"
        b"To: ,,,\r\nContent-Type: text/plain; charset=no-such-charset\r\n\r\nGr\xfc\xdfe\x00 aus Bern\r\n"
    )
    mail = parse_mail(raw)
    assert mail.date is None and "m@example" in mail.sender
    assert "aus Bern" in mail.body_text
    value = mail_value(mail, uid=1, uidvalidity=2, folder="INBOX", size=len(raw), attachments=[])
    check_value(value)  # JSON-safe whatever came in (the NUL is gone)
    assert "\x00" not in value["body_text"]


def test_html_text() -> None:
    assert html_text("<div>a</div><div>b<br>c</div><script>x()</script>") == "a\n\nb\nc"
    assert html_text("<p>unclosed <b>tags") == "unclosed tags"


@pytest.mark.parametrize(
    ("filters", "taken"),
    [
        (MailFilters(), True),
        (MailFilters(subject_contains="invoice"), True),  # ignoring case
        (MailFilters(subject_contains="order"), False),
        (MailFilters(sender_contains="ACME.example"), True),
        (MailFilters(sender_contains="Billing"), True),  # the display name counts too
        (MailFilters(sender_contains="evil"), False),
        (MailFilters(body_contains="PAY"), True),
        (MailFilters(subject_contains="invoice", body_contains="refund"), False),  # every filter must pass
    ],
)
def test_matches(filters: MailFilters, taken: bool) -> None:
    assert matches(filters, parse_mail(message().as_bytes())) is taken


def test_attachment_names_are_cleaned_unique_and_kept_short() -> None:
    files = [
        Attachment("../../etc/passwd", "text/plain", b""),
        Attachment("C:\\Users\\me\\Scan.PDF", "application/pdf", b""),
        Attachment("scan.pdf", "application/pdf", b""),
        Attachment("", "image/png", b""),
        Attachment("a\x00b\nc.txt", "text/plain", b""),
        Attachment("x" * 300 + ".xlsx", "application/octet-stream", b""),
        Attachment("README", "text/plain", b""),
        Attachment("readme", "text/plain", b""),
    ]
    names = attachment_names(files)
    assert names[:5] == ["passwd", "Scan.PDF", "scan (2).pdf", "attachment-4.png", "ab_c.txt"]
    assert len(names[5]) == 150 and names[5].endswith(".xlsx")
    assert names[6:] == ["README", "readme (2)"]
    assert attachment_path("inbox", 7, 12, "Scan.PDF") == "mail/inbox/7-12/Scan.PDF"


# --- the job's input ---


def value(uid: int, body: str = "text") -> dict[str, Any]:
    mail = parse_mail(message(f"Invoice {uid}", body=body).as_bytes())
    return mail_value(mail, uid=uid, uidvalidity=9, folder="INBOX", size=100, attachments=[])


def test_the_job_input_of_a_mail_and_of_a_batch() -> None:
    attachment = Attachment("a.pdf", "application/pdf", b"12345")
    entry = attachment_entry("a.pdf", attachment, bucket="files", path="mail/t/9-1/a.pdf")
    assert entry == {
        "name": "a.pdf",
        "size": 5,
        "content_type": "application/pdf",
        "bucket": "files",
        "path": "mail/t/9-1/a.pdf",
    }
    assert attachment_entry("a.pdf", attachment, bucket="files")["bucket"] is None  # not stored
    one = value(1)
    assert set(one) >= {"uid", "message_id", "subject", "from", "to", "date", "body_text", "attachments"}
    assert job_input({"customer": "acme", "mail": "overridden"}, [one], batch=False) == {
        "customer": "acme",
        "mail": one,
    }
    assert job_input({}, [one, value(2)], batch=True) == {"mails": [one, value(2)]}
    with pytest.raises(ValueError, match="takes one mail"):
        job_input({}, [one, value(2)], batch=False)


def test_a_long_body_is_cut_on_a_character_boundary() -> None:
    long = value(1, body="ü" * MAX_BODY_BYTES)
    assert long["body_truncated"] and len(long["body_text"].encode()) <= MAX_BODY_BYTES
    assert set(long["body_text"]) == {"ü"}
    assert not value(1)["body_truncated"]


def test_batches_fit_a_jobs_input_and_keep_the_order() -> None:
    mails = [value(uid, body="x" * 60_000) for uid in range(1, 11)]
    found = batches({"customer": "acme"}, mails)
    assert [m["uid"] for group in found for m in group] == list(range(1, 11))
    assert len(found) == 3  # four mails of ~60 KB fit 256 KiB
    for group in found:
        size = len(json.dumps(job_input({"customer": "acme"}, group, batch=True), ensure_ascii=False).encode())
        assert size <= MAX_INPUT_BYTES
    # A mail too large alone has its body cut to fit (a big input of the trigger's own leaves less room).
    [[alone]] = batches({"big": "y" * 200_000}, [value(1, body="z" * MAX_BODY_BYTES)])
    assert alone["body_truncated"] and 0 < len(alone["body_text"]) < MAX_BODY_BYTES
    size = len(json.dumps(job_input({"big": "y" * 200_000}, [alone], batch=True), ensure_ascii=False).encode())
    assert size <= MAX_INPUT_BYTES


def test_job_keys_are_the_same_for_the_same_mails_only() -> None:
    trigger = "a" * 32
    assert job_key(trigger, 9, [12]) == job_key(trigger, 9, [12]) == f"mail:{'a' * 24}:9:12"
    assert job_key(trigger, 10, [12]) != job_key(trigger, 9, [12])  # the folder was made anew
    assert job_key("b" * 32, 9, [12]) != job_key(trigger, 9, [12])
    assert job_key(trigger, 9, [1, 2, 3]) != job_key(trigger, 9, [1, 3])
    assert job_key(trigger, 9, [1, 2, 3]) == job_key(trigger, 9, [1, 2, 3])


def test_handed_mails_are_read_from_jobs_inputs() -> None:
    inputs: list[dict[str, Any]] = [
        {"mail": value(1)},
        {"mails": [value(2), value(3), {**value(4), "folder": "Other"}]},
        {"customer": "no mail"},
        {"mail": {"uid": "5", "uidvalidity": 9, "folder": "INBOX"}},  # not a mail the watcher made
    ]
    assert handed_mails(inputs, "INBOX") == {(9, 1), (9, 2), (9, 3)}


def test_uid_sets_and_mailbox_names() -> None:
    assert uid_sets([5, 1, 2, 3, 9, 10, 3]) == ["1:3,5,9:10"]
    assert uid_sets(list(range(1, 6)), per_set=2) == ["1:2", "3:4", "5"]
    assert mailbox_name("INBOX") == '"INBOX"'
    assert mailbox_name("Entwürfe/A&B") == '"Entw&APw-rfe/A&-B"'
    assert mailbox_name('say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert mailbox_name("日本") == '"&ZeVnLA-"'


# --- the rule on the wire ---


def test_mail_rules_are_checked() -> None:
    assert MailRule(host="imap.example.com", credential="box").port == 993
    assert MailRule(host="imap.example.com", credential="box", tls=MailTls.STARTTLS).port == 143
    assert MailRule(host="imap.example.com", credential="box", tls="none", port=1143).port == 1143
    cases: list[tuple[dict[str, Any], str]] = [
        ({"after": "move"}, "give move_to"),
        ({"move_to": "Done"}, "belongs to after 'move'"),
        ({"after": "move", "move_to": "INBOX"}, "name another folder"),
        ({"unread_only": False}, "would start a job at every poll"),
        ({"poll_s": 1}, "greater than or equal to 5"),
        ({"host": "imap example"}, "host name"),
        ({"folder": "a\nb"}, "control characters"),
        ({"filters": {"subject_contains": ""}}, "at least 1 character"),
        ({"credential": "no spaces"}, "letters, digits"),
    ]
    for bad, words in cases:
        given: dict[str, Any] = {"host": "imap.example.com", "credential": "box", **bad}
        with pytest.raises(ValidationError, match=words):
            MailRule(**given)
    job = TriggerJob(process="p", robot="r")
    mail = MailRule(host="h", credential="c")
    TriggerAdd(name="t", job=job, mail=mail)
    with pytest.raises(ValidationError, match="give one of"):
        TriggerAdd(name="t", job=job)
    with pytest.raises(ValidationError, match="give one of"):
        TriggerAdd(name="t", job=job, mail=mail, queue=QueueRule(queue="q"))


# --- the watcher, against an in-memory mailbox ---


@dataclass
class Box:
    """An IMAP folder in memory: mails by UID, the read ones, the moved ones, and failures to inject."""

    mails: dict[int, bytes] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)
    moved: dict[str, list[int]] = field(default_factory=dict)
    uidvalidity: int = 9
    fail_marking: bool = False
    logins: list[str] = field(default_factory=list)

    def add(self, uid: int, built: EmailMessage) -> None:
        self.mails[uid] = built.as_bytes()


class FakeSession(ImapSession):
    """An `ImapSession` over a `Box`."""

    def __init__(self, box: Box, rule: MailRule) -> None:
        super().__init__(rule)
        self.box = box

    def connect(self) -> None:
        pass

    def login(self, login: Login) -> None:
        self.box.logins.append(login.username)
        if login.secret != "right":
            raise MailboxError("refused", login_refused=True)

    def select(self, folder: str) -> int:
        return self.box.uidvalidity

    def search(self, *, unread_only: bool) -> list[int]:
        return sorted(uid for uid in self.box.mails if not (unread_only and uid in self.box.seen))

    def headers(self, uids: Sequence[int]) -> dict[int, tuple[int, bytes]]:
        return {uid: (len(self.box.mails[uid]), self.box.mails[uid].split(b"\n\n")[0]) for uid in uids}

    def message(self, uid: int) -> bytes | None:
        return self.box.mails.get(uid)

    def mark_read(self, uids: Sequence[int]) -> None:
        if self.box.fail_marking:
            raise MailboxError("the connection broke")
        self.box.seen.update(uids)

    def move(self, uids: Sequence[int], folder: str) -> None:
        self.box.moved.setdefault(folder, []).extend(uids)
        for uid in uids:
            del self.box.mails[uid]

    def close(self) -> None:
        pass


@dataclass
class Jobs:
    """The jobs service as a watcher sees it: keys it has seen, and what to answer."""

    made: dict[str, dict[str, Any]] = field(default_factory=dict)
    refusal: Exception | None = None
    secret: str = "right"
    reveals: int = 0
    starts: int = 0

    async def reveal(self, name: str) -> Login:
        self.reveals += 1
        return Login("bot", self.secret)

    async def store(self, bucket: str, path: str, data: bytes, content_type: str) -> str:
        return path

    async def start(self, given: dict[str, Any], key: str) -> str:
        self.starts += 1
        if self.refusal is not None:
            raise self.refusal
        self.made.setdefault(key, given)
        return key

    async def recent(self) -> list[dict[str, Any]]:
        return list(self.made.values())


def watcher(box: Box, jobs: Jobs, **changes: Any) -> MailboxWatcher:
    rule = MailRule(**{"host": "imap.example.com", "credential": "box", "bucket": "files", **changes})
    return MailboxWatcher(
        trigger_id="t" * 32,
        trigger_name="inbox",
        rule=rule,
        base_input={},
        reveal=jobs.reveal,
        store=jobs.store,
        start_job=jobs.start,
        recent_inputs=jobs.recent,
        log=structlog.get_logger("test"),
        session=lambda rule: FakeSession(box, rule),
    )


async def test_busy_robots_leave_the_mails_for_the_next_poll() -> None:
    box, jobs = Box(), Jobs()
    for uid in (1, 2, 3):
        box.add(uid, message(f"Invoice {uid}", files={"a.pdf": b"%PDF"}))
    watching = watcher(box, jobs)
    jobs.refusal = Conflict("every robot is busy, and this start skips then")
    assert await watching.poll_once() == 0
    assert box.seen == set() and jobs.made == {}
    jobs.refusal = Unavailable("no reply from the jobs service")
    assert await watching.poll_once() == 0 and box.seen == set()
    jobs.refusal = None
    assert await watching.poll_once() == 3
    assert box.seen == {1, 2, 3}
    [first, *_rest] = jobs.made.values()
    assert first["mail"]["attachments"][0]["path"] == "mail/inbox/9-1/a.pdf"


async def test_a_refusal_for_good_marks_the_mail() -> None:
    box, jobs = Box(), Jobs()
    box.add(1, message())
    jobs.refusal = BadRequest("job.input: too large")
    assert await watcher(box, jobs).poll_once() == 0
    assert box.seen == {1}
    jobs.refusal = NotFound("no robot named 'r'")
    box.add(2, message())
    assert await watcher(box, jobs).poll_once() == 0 and box.seen == {1, 2}
    # The mail's key made a job already, from a reading that came out otherwise: that job has it.
    jobs.refusal = Conflict("idempotency key 'mail:ttt…' was used for a different request; send a new key")
    box.add(3, message())
    assert await watcher(box, jobs).poll_once() == 0 and box.seen == {1, 2, 3}


async def test_a_mail_whose_marking_failed_is_marked_at_the_next_poll_without_a_second_job() -> None:
    box, jobs = Box(fail_marking=True), Jobs()
    box.add(1, message())
    watching = watcher(box, jobs)
    with pytest.raises(MailboxError, match="broke"):
        await watching.poll_once()
    assert len(jobs.made) == 1 and box.seen == set()
    box.fail_marking = False
    assert await watching.poll_once() == 0
    assert box.seen == {1} and jobs.starts == 1


async def test_mails_not_matching_are_left_alone_and_not_read_again() -> None:
    box, jobs = Box(), Jobs()
    box.add(1, message("Newsletter"))
    box.add(2, message("Invoice 2", body="nothing to do"))
    box.add(3, message("Invoice 3"))
    watching = watcher(box, jobs, filters={"subject_contains": "invoice", "body_contains": "pay"})
    fetched: list[int] = []
    original = FakeSession.message

    def spy(self: FakeSession, uid: int) -> bytes | None:
        fetched.append(uid)
        return original(self, uid)

    FakeSession.message = spy  # type: ignore[method-assign]
    try:
        assert await watching.poll_once() == 1
        assert await watching.poll_once() == 0
    finally:
        FakeSession.message = original  # type: ignore[method-assign]
    assert box.seen == {3} and fetched == [2, 3]  # the newsletter's header sufficed; nothing read twice
    # A folder made anew (another UIDVALIDITY) is judged afresh.
    box.uidvalidity = 10
    box.seen.clear()
    assert await watching.poll_once() == 1


async def test_a_batch_and_moving() -> None:
    box, jobs = Box(), Jobs()
    for uid in (4, 5, 6):
        box.add(uid, message(f"Order {uid}"))
    assert await watcher(box, jobs, batch=True, after=MailAfter.MOVE, move_to="Done").poll_once() == 1
    [(key, given)] = jobs.made.items()
    assert [m["uid"] for m in given["mails"]] == [4, 5, 6] and key == job_key("t" * 32, 9, [4, 5, 6])
    assert box.moved == {"Done": [4, 5, 6]} and box.mails == {}


async def test_the_secret_is_revealed_once_and_again_after_a_refused_login() -> None:
    box, jobs = Box(), Jobs(secret="wrong")
    watching = watcher(box, jobs)
    with pytest.raises(MailboxError, match="refused"):
        await watching.poll_once()
    jobs.secret = "right"  # the password was changed in herder
    assert await watching.poll_once() == 0
    assert await watching.poll_once() == 0
    assert jobs.reveals == 2 and box.logins == ["bot", "bot", "bot"]
    assert "right" not in repr(Login("bot", "right"))
