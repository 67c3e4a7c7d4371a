"""Mail triggers' mailboxes: reading an IMAP folder, choosing the mails a trigger takes, and handing each
of them (or a poll's mails together) to a job.

The pure part decides, with no I/O: `parse_mail` reads a message, `matches` applies a trigger's
filters, `mail_value` and `job_input` build the job's JSON-safe input, `batches` splits a poll's mails
into inputs that fit, `job_key` makes the job's idempotency key, `attachment_path` says where an
attachment is stored.

`MailboxWatcher` does the I/O. It speaks IMAP with the standard library's `imaplib`, each blocking call
in a thread (`asyncio.to_thread`): imaplib is maintained with CPython, does TLS and STARTTLS through
`ssl` with certificate and host name checks, and a poll is a short sequence of commands, so an
asynchronous IMAP library (aioimaplib) would add a dependency and buy nothing here. It reaches the rest
of herder only through the callables it is given: reveal the credential, store an attachment, start a
job, list the jobs it started before.

What it promises:
- a mail is marked read (or moved) only after its job exists, so a crash in between loses no mail;
- the job's idempotency key derives from the trigger, the folder's UIDVALIDITY and the mail's UID, so
  the poll after a crash makes the same job, not a second one; and the first poll of a watcher reads
  which mails the trigger's last jobs were given, so that a batch job made just before a crash is not
  made again with a different set of mails;
- a mail whose job is refused for good (its process or robot gone) is marked anyway and the refusal
  logged; a failure that may pass (the jobs service unreachable, every robot busy) leaves it unread for
  the next poll;
- the credential's secret lives in memory only, is never logged, and is revealed again after a refused
  login (it may have been changed) and every `REVEAL_EVERY_S`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.header
import email.policy
import email.utils
import hashlib
import html.parser
import imaplib
import json
import mimetypes
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesParser
from pathlib import PurePosixPath
from typing import Any, TypeVar

import structlog

from herder.protocol.errors import BadRequest, Conflict, Forbidden, HerderError, NotFound
from herder.protocol.jobs import MAX_INPUT_BYTES
from herder.protocol.scheduler import MailAfter, MailFilters, MailRule, MailTls
from herder.protocol.storage import path_problem

KIB = 1024
MIB = 1024 * KIB
# A job gets at most this much of a mail's body text; `body_truncated` says when there was more.
MAX_BODY_BYTES = 64 * KIB
# A mail larger than this is handed over with its headers only (`too_large`): fetching it whole into
# memory would put the scheduler at the mercy of whoever sends the mailbox a huge file.
MAX_MAIL_BYTES = 50 * MIB
# A header's text in the job's input is cut at this many characters; at most this many addresses.
MAX_HEADER_CHARS = 1000
MAX_ADDRESSES = 100
MAX_ATTACHMENTS = 100
MAX_NAME_CHARS = 150
# A poll takes at most this many new mails (oldest first); the next poll takes the rest.
MAX_MAILS_PER_POLL = 200
# UIDs per FETCH or STORE command, to keep command lines short.
UIDS_PER_COMMAND = 200
IMAP_TIMEOUT_S = 30.0
# A revealed secret is used this long before it is revealed again (a rotated password is picked up).
REVEAL_EVERY_S = 900.0
# How many of its last jobs a watcher reads at its first poll, to learn which mails were given out.
RECOVERY_JOBS = 200
# Mails judged not to match are remembered (per UIDVALIDITY), up to this many, so as not to fetch again.
MAX_REMEMBERED = 100_000
# Room kept in a job's input for the keys `job_input` adds around the mails.
_INPUT_MARGIN_BYTES = 64

# Answers of the jobs service that asking again would not change: the mail is marked, the refusal logged.
FINAL_REFUSALS: tuple[type[HerderError], ...] = (BadRequest, NotFound, Forbidden)
# How the jobs service's `conflict` reads when an idempotency key already made a job for another request.
_KEY_TAKEN = "was used for a different request"
# A media type as a storage bucket takes it; a sender's odd one is stored as application/octet-stream.
_MEDIA_TYPE = re.compile(r"[!-~]{1,127}/[!-~]{1,127}")

T = TypeVar("T")


# --- the pure part ---


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file a mail carries."""

    name: str
    content_type: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ParsedMail:
    """A mail as a trigger reads it: decoded headers, its body as text, its attachments."""

    message_id: str | None
    subject: str
    sender: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    date: str | None  # ISO 8601, from the Date header
    body_text: str
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True, slots=True)
class Login:
    """A credential's username and secret, as the mailbox takes them; `repr` hides the secret."""

    username: str
    secret: str = field(repr=False)


_POLICY = email.policy.default


def parse_mail(raw: bytes, *, headers_only: bool = False) -> ParsedMail:
    """Read a message (RFC 5322 bytes); with `headers_only`, its headers alone. Never raises on a
    malformed mail: what cannot be decoded is read as well as it can be, or left empty."""
    message = BytesParser(policy=_POLICY).parsebytes(raw, headersonly=headers_only)
    assert isinstance(message, EmailMessage)
    body_text, attachments = ("", ()) if headers_only else _contents(message)
    return ParsedMail(
        message_id=_header(message, "Message-ID") or None,
        subject=_header(message, "Subject"),
        sender=_header(message, "From"),
        to=_addresses(message, "To"),
        cc=_addresses(message, "Cc"),
        date=_date(message),
        body_text=body_text,
        attachments=attachments,
    )


def matches(filters: MailFilters, mail: ParsedMail) -> bool:
    """Whether `mail` passes every filter given (each a substring, ignoring case)."""
    return _headers_match(filters, mail) and _contains(mail.body_text, filters.body_contains)


def _headers_match(filters: MailFilters, mail: ParsedMail) -> bool:
    return _contains(mail.subject, filters.subject_contains) and _contains(mail.sender, filters.sender_contains)


def _contains(text: str, wanted: str | None) -> bool:
    return wanted is None or wanted.casefold() in text.casefold()


def attachment_names(attachments: Sequence[Attachment]) -> list[str]:
    """The names the attachments are stored and shown under: cleaned, and unique within the mail
    (a second `scan.pdf` is `scan (2).pdf`)."""
    names: list[str] = []
    taken: set[str] = set()
    for index, attachment in enumerate(attachments, start=1):
        name = _clean_name(attachment.name) or _unnamed(index, attachment.content_type)
        stem, dot, extension = name.rpartition(".")
        if not dot or not stem:
            stem, dot, extension = name, "", ""
        candidate, copy = name, 1
        while candidate.casefold() in taken:
            copy += 1
            candidate = f"{stem} ({copy}){dot}{extension}"
        taken.add(candidate.casefold())
        names.append(candidate)
    return names


def attachment_path(trigger: str, uidvalidity: int, uid: int, name: str) -> str:
    """Where an attachment goes in the trigger's bucket: `mail/<trigger>/<uidvalidity>-<uid>/<name>`,
    the same on every poll (a mail read again after a crash replaces its own files)."""
    path = f"mail/{trigger}/{uidvalidity}-{uid}/{name}"
    if path_problem(path) is not None:  # a name only a storage path refuses: keep its extension
        path = f"mail/{trigger}/{uidvalidity}-{uid}/attachment{PurePosixPath(name).suffix[:16]}"
    return path


def mail_value(
    mail: ParsedMail,
    *,
    uid: int,
    uidvalidity: int,
    folder: str,
    size: int,
    attachments: Sequence[dict[str, Any]],
    too_large: bool = False,
    body_bytes: int = MAX_BODY_BYTES,
) -> dict[str, Any]:
    """One mail in a job's input (JSON-safe): its metadata, its body text cut at `body_bytes`, and
    its attachments as `attachment_entry` made them."""
    body, truncated = _cut(_safe(mail.body_text), body_bytes)
    return {
        "uid": uid,
        "uidvalidity": uidvalidity,
        "folder": folder,
        "message_id": _safe(mail.message_id)[:MAX_HEADER_CHARS] if mail.message_id else None,
        "subject": _safe(mail.subject)[:MAX_HEADER_CHARS],
        "from": _safe(mail.sender)[:MAX_HEADER_CHARS],
        "to": [_safe(address)[:MAX_HEADER_CHARS] for address in mail.to[:MAX_ADDRESSES]],
        "cc": [_safe(address)[:MAX_HEADER_CHARS] for address in mail.cc[:MAX_ADDRESSES]],
        "date": mail.date,
        "size": size,
        "body_text": body,
        "body_truncated": truncated,
        "too_large": too_large,
        "attachments": list(attachments),
    }


def attachment_entry(
    name: str, attachment: Attachment, *, bucket: str | None = None, path: str | None = None
) -> dict[str, Any]:
    """One attachment in a job's input: `bucket` and `path` say where it was stored (None: it was not)."""
    return {
        "name": _safe(name),
        "size": len(attachment.data),
        "content_type": _safe(attachment.content_type),
        "bucket": bucket if path is not None else None,
        "path": path,
    }


def job_input(base: dict[str, Any], mails: Sequence[dict[str, Any]], *, batch: bool) -> dict[str, Any]:
    """A job's input: the trigger's own input with `mail` (one mail) or `mails` (a batch) added."""
    if batch:
        return {**base, "mails": list(mails)}
    if len(mails) != 1:
        raise ValueError(f"a job of a mail trigger without batch takes one mail, not {len(mails)}")
    return {**base, "mail": mails[0]}


def value_bytes(value: object) -> int:
    """The size of `value` as herder measures free-form values: UTF-8 JSON with json's default separators."""
    return len(json.dumps(value, ensure_ascii=False).encode())


def batches(
    base: dict[str, Any], mails: Sequence[dict[str, Any]], *, max_bytes: int = MAX_INPUT_BYTES
) -> list[list[dict[str, Any]]]:
    """A poll's mails, in order, as the batches of as many consecutive mails as fit one job's input;
    a mail that would not fit even alone has its body cut further (`fit`)."""
    room = max_bytes - value_bytes(base) - _INPUT_MARGIN_BYTES
    found: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    used = 0
    for mail in mails:
        fitted = fit(mail, room)
        size = value_bytes(fitted) + 2  # the separator before it in the list
        if current and used + size > room:
            found.append(current)
            current, used = [], 0
        current.append(fitted)
        used += size
    if current:
        found.append(current)
    return found


def fit(mail: dict[str, Any], room: int) -> dict[str, Any]:
    """`mail` with its body text cut so that the whole is at most `room` bytes (as far as cutting the
    body can take it: what is over then is refused by the jobs service, and logged)."""
    over = value_bytes(mail) - room
    if over <= 0 or not mail["body_text"]:
        return mail
    text: str = mail["body_text"]
    # A character's JSON form can take more bytes than its UTF-8 (escapes): cut by the JSON text's size.
    keep = max(len(json.dumps(text, ensure_ascii=False).encode()) - over - 2, 0)
    body, _truncated = _cut(text, keep)
    while body and value_bytes({**mail, "body_text": body, "body_truncated": True}) > room:
        body = body[: len(body) * 3 // 4]
    return {**mail, "body_text": body, "body_truncated": True}


def job_key(trigger_id: str, uidvalidity: int, uids: Sequence[int]) -> str:
    """The idempotency key of the job given the mails `uids` of a folder with `uidvalidity`: the same
    on every poll and every scheduler replica, so that a mail read again makes the same job."""
    if len(uids) == 1:
        return f"mail:{trigger_id[:24]}:{uidvalidity}:{uids[0]}"
    digest = hashlib.sha256(",".join(str(uid) for uid in uids).encode()).hexdigest()[:16]
    return f"mail:{trigger_id[:24]}:{uidvalidity}:{uids[0]}-{uids[-1]}:{digest}"


def handed_mails(inputs: Iterable[dict[str, Any]], folder: str) -> set[tuple[int, int]]:
    """The mails of `folder` (as UIDVALIDITY, UID) that jobs with these inputs were given."""
    found: set[tuple[int, int]] = set()
    for given in inputs:
        mails = given.get("mails")
        candidates = mails if isinstance(mails, list) else [given.get("mail")]
        for mail in candidates:
            if not isinstance(mail, dict) or mail.get("folder") != folder:
                continue
            uid, uidvalidity = mail.get("uid"), mail.get("uidvalidity")
            if isinstance(uid, int) and isinstance(uidvalidity, int):
                found.add((uidvalidity, uid))
    return found


def uid_sets(uids: Sequence[int], *, per_set: int = UIDS_PER_COMMAND) -> list[str]:
    """UIDs as IMAP sequence sets (`3:5,9`), at most `per_set` UIDs each."""
    found: list[str] = []
    ordered = sorted(set(uids))
    for start in range(0, len(ordered), per_set):
        chunk = ordered[start : start + per_set]
        parts: list[str] = []
        first = last = chunk[0]
        for uid in chunk[1:]:
            if uid == last + 1:
                last = uid
                continue
            parts.append(f"{first}:{last}" if last > first else str(first))
            first = last = uid
        parts.append(f"{first}:{last}" if last > first else str(first))
        found.append(",".join(parts))
    return found


def mailbox_name(folder: str) -> str:
    """A folder name as an IMAP command takes it: modified UTF-7 (RFC 3501 5.1.3), quoted."""
    encoded: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            packed = base64.b64encode("".join(pending).encode("utf-16-be")).decode().rstrip("=")
            encoded.append("&" + packed.replace("/", ",") + "-")
            pending.clear()

    for char in folder:
        if " " <= char <= "~":
            flush()
            encoded.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    text = "".join(encoded)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- reading a message ---


def _header(message: Message, name: str) -> str:
    """A header decoded (RFC 2047 words too), on one line; "" when absent. A header the email package
    cannot parse is decoded from its raw text instead."""
    try:
        value = message.get(name)
        text = "" if value is None else str(value)
    except Exception:  # the email package can raise on some malformed headers
        raw = next((value for key, value in message.raw_items() if key.lower() == name.lower()), "")
        try:
            text = str(email.header.make_header(email.header.decode_header(str(raw))))
        except Exception:
            text = str(raw)
    return " ".join(text.split())


def _addresses(message: Message, name: str) -> tuple[str, ...]:
    text = _header(message, name)
    if not text:
        return ()
    try:
        pairs = email.utils.getaddresses([text])
    except Exception:
        return (text,)
    found = tuple(email.utils.formataddr(pair) if pair[0] else pair[1] for pair in pairs if pair[1] or pair[0])
    return found or (text,)


def _date(message: Message) -> str | None:
    text = _header(message, "Date")
    if not text:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # "-0000": the time is UTC, the sender's zone unknown
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat()


def _contents(message: EmailMessage) -> tuple[str, tuple[Attachment, ...]]:
    """The body as text (the plain part, else the HTML part as text) and the attachments."""
    try:
        body = message.get_body(preferencelist=("plain", "html"))
    except Exception:
        body = None
    text = ""
    if body is not None:
        text = _part_text(body)
        if body.get_content_subtype() == "html":
            text = html_text(text)
    attachments: list[Attachment] = []
    for part in _leaves(message):
        if part is body or not _is_attachment(part):
            continue
        if len(attachments) >= MAX_ATTACHMENTS:
            break
        attachments.append(
            Attachment(name=_filename(part) or "", content_type=part.get_content_type(), data=_part_bytes(part))
        )
    return text, tuple(attachments)


def _leaves(message: MIMEPart) -> Iterator[MIMEPart]:
    """The parts of a message that are not multipart containers, in order; a message attached whole
    (message/rfc822) is one leaf, not looked into. Not recursive: nesting cannot exhaust the stack."""
    stack: list[MIMEPart] = [message]
    while stack:
        part = stack.pop()
        if part.is_multipart() and part.get_content_maintype() == "multipart":
            stack.extend(reversed([child for child in part.iter_parts() if isinstance(child, MIMEPart)]))
        else:
            yield part


def _is_attachment(part: MIMEPart) -> bool:
    disposition = part.get_content_disposition()
    if disposition == "attachment":
        return True
    if part.get_content_maintype() == "message":
        return True
    # An inline part with a name that is not text (an image, a PDF) is a file the sender sent.
    return bool(_filename(part)) and part.get_content_type() not in ("text/plain", "text/html")


def _filename(part: MIMEPart) -> str | None:
    try:
        return part.get_filename()
    except Exception:
        return None


def _part_bytes(part: MIMEPart) -> bytes:
    if part.get_content_maintype() == "message":
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            try:
                return inner[0].as_bytes(policy=_POLICY)
            except Exception:
                return bytes(inner[0])
        return str(inner).encode("utf-8", "replace")
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    payload = part.get_payload()
    return payload.encode("utf-8", "replace") if isinstance(payload, str) else b""


def _part_text(part: MIMEPart) -> str:
    try:
        content = part.get_content()
        if isinstance(content, str):
            return content
    except Exception:  # an unknown charset, a broken transfer encoding
        pass
    data = _part_bytes(part)
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


class _HtmlText(html.parser.HTMLParser):
    """The text of an HTML document, with line breaks where blocks end; scripts and styles left out."""

    _BLOCKS = frozenset({"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote"})
    _HIDDEN = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(self._hidden - 1, 0)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def html_text(markup: str) -> str:
    """The readable text of an HTML body: tags dropped, entities decoded, blank runs squeezed."""
    reader = _HtmlText()
    try:
        reader.feed(markup)
        reader.close()
    except Exception:
        return re.sub(r"<[^>]*>", " ", markup)
    lines = (" ".join(line.split()) for line in "".join(reader.parts).splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _clean_name(name: str) -> str:
    """A file name a sender gave, fit to store and show: its last path part, no control characters,
    at most MAX_NAME_CHARS characters (its extension kept)."""
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(char if char.isprintable() else "_" for char in _safe(name))
    name = " ".join(name.split()).strip(" .")
    if len(name) > MAX_NAME_CHARS:
        suffix = PurePosixPath(name).suffix[:16]
        name = name[: MAX_NAME_CHARS - len(suffix)].rstrip(" .") + suffix
    return name


def _unnamed(index: int, content_type: str) -> str:
    extension = mimetypes.guess_extension(content_type) or ".bin"
    if content_type == "message/rfc822":
        extension = ".eml"
    return f"attachment-{index}{extension}"


def _safe(text: str) -> str:
    """`text` as herder stores it: no NUL, no lone surrogate."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text.encode("utf-8", "replace").decode("utf-8")


def _cut(text: str, max_bytes: int) -> tuple[str, bool]:
    """`text` cut to at most `max_bytes` in UTF-8 (on a character boundary), and whether it was cut."""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text, False
    return encoded[:max_bytes].decode("utf-8", "ignore"), True


# --- IMAP ---


class MailboxError(Exception):
    """The mailbox could not be read or changed: the server unreachable, the TLS handshake or the login
    refused, a folder missing. Its message names the server and what failed, never a secret."""

    def __init__(self, message: str, *, login_refused: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.login_refused = login_refused


_FETCH_UID = re.compile(rb"\bUID (\d+)")
_FETCH_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")


class ImapSession:
    """One IMAP session, blocking: `MailboxWatcher` runs each method in a thread, one at a time."""

    def __init__(self, rule: MailRule, *, timeout_s: float = IMAP_TIMEOUT_S) -> None:
        self.rule = rule
        self.timeout_s = timeout_s
        self._imap: imaplib.IMAP4 | None = None
        # What the server offers once logged in (MOVE, UIDPLUS are often announced only then).
        self._offered: frozenset[str] = frozenset()

    @property
    def where(self) -> str:
        """The server, as messages name it."""
        return f"{self.rule.host}:{self.rule.port}"

    def _connected(self) -> imaplib.IMAP4:
        if self._imap is None:
            raise MailboxError(f"{self.where}: not connected; call connect() first")
        return self._imap

    def connect(self) -> None:
        """Connect, with TLS as the rule says (certificate and host name checked)."""
        rule = self.rule
        try:
            if rule.tls is MailTls.TLS:
                self._imap = imaplib.IMAP4_SSL(
                    rule.host, rule.port, ssl_context=ssl.create_default_context(), timeout=self.timeout_s
                )
            else:
                self._imap = imaplib.IMAP4(rule.host, rule.port, timeout=self.timeout_s)
                if rule.tls is MailTls.STARTTLS:
                    self._imap.starttls(ssl_context=ssl.create_default_context())
        except ssl.SSLError as exc:
            raise MailboxError(f"{self.where}: the TLS handshake failed ({_reason(exc)})") from None
        except (imaplib.IMAP4.error, OSError, EOFError) as exc:
            raise MailboxError(f"{self.where}: cannot connect ({_reason(exc)})") from None

    def login(self, login: Login) -> None:
        """Log in: AUTHENTICATE PLAIN when the server offers it (any UTF-8 password), else LOGIN."""
        imap = self._connected()
        offered = {str(capability).upper() for capability in imap.capabilities}
        try:
            if "AUTH=PLAIN" in offered:
                imap.authenticate("PLAIN", lambda _challenge: _plain(login))
            elif "LOGINDISABLED" in offered:
                raise MailboxError(
                    f"{self.where}: the server takes no login on an unencrypted connection; use tls 'tls' or "
                    "'starttls'",
                    login_refused=True,
                )
            else:
                imap.login(login.username, login.secret)
        except UnicodeEncodeError:
            raise MailboxError(
                f"{self.where}: the server offers only LOGIN, which takes ASCII user names and passwords",
                login_refused=True,
            ) from None
        except imaplib.IMAP4.abort as exc:
            raise MailboxError(f"{self.where}: the connection broke while logging in ({_reason(exc)})") from None
        except imaplib.IMAP4.error as exc:
            raise MailboxError(f"{self.where}: the login was refused ({_reason(exc)})", login_refused=True) from None
        except OSError as exc:
            raise MailboxError(f"{self.where}: the connection broke while logging in ({_reason(exc)})") from None
        status, data = self._run("ask for capabilities", imap.capability)
        words = b" ".join(part for part in data if isinstance(part, bytes)).decode("ascii", "replace").split()
        self._offered = frozenset(word.upper() for word in words) if status == "OK" else frozenset()

    def select(self, folder: str) -> int:
        """Open `folder` for reading and writing; its UIDVALIDITY."""
        imap = self._connected()
        status, data = self._run(f"open folder {folder!r}", imap.select, mailbox_name(folder))
        if status != "OK":
            raise MailboxError(f"{self.where}: cannot open folder {folder!r} ({_answer(data)})")
        _code, values = imap.response("UIDVALIDITY")
        try:
            return int(values[0])
        except (TypeError, ValueError, IndexError):
            raise MailboxError(
                f"{self.where}: folder {folder!r} has no UIDVALIDITY; is this an IMAP4rev1 server?"
            ) from None

    def search(self, *, unread_only: bool) -> list[int]:
        """The UIDs of the folder's mails (unread ones only), ascending; deleted ones left out."""
        imap = self._connected()
        criteria = "UNSEEN UNDELETED" if unread_only else "UNDELETED"
        status, data = self._run("search", imap.uid, "SEARCH", criteria)
        if status != "OK":
            raise MailboxError(f"{self.where}: the search was refused ({_answer(data)})")
        found: set[int] = set()
        for line in data:
            if isinstance(line, bytes):
                found.update(int(word) for word in line.split() if word.isdigit())
        return sorted(found)

    def headers(self, uids: Sequence[int]) -> dict[int, tuple[int, bytes]]:
        """Each mail's size and header, by UID (not marking anything read)."""
        imap = self._connected()
        found: dict[int, tuple[int, bytes]] = {}
        for uid_set in uid_sets(uids):
            status, data = self._run("read headers", imap.uid, "FETCH", uid_set, "(UID RFC822.SIZE BODY.PEEK[HEADER])")
            if status != "OK":
                raise MailboxError(f"{self.where}: reading headers was refused ({_answer(data)})")
            for meta, literal in _fetched(data):
                uid, size = _number(_FETCH_UID, meta), _number(_FETCH_SIZE, meta)
                if uid is not None:
                    found[uid] = (size if size is not None else len(literal), literal)
        return found

    def message(self, uid: int) -> bytes | None:
        """The whole mail `uid` (not marking it read); None when it is gone."""
        imap = self._connected()
        status, data = self._run("read a mail", imap.uid, "FETCH", str(uid), "(UID BODY.PEEK[])")
        if status != "OK":
            raise MailboxError(f"{self.where}: reading mail {uid} was refused ({_answer(data)})")
        for meta, literal in _fetched(data):
            if _number(_FETCH_UID, meta) in (uid, None):
                return literal
        return None

    def mark_read(self, uids: Sequence[int]) -> None:
        """Set \\Seen on the mails."""
        imap = self._connected()
        for uid_set in uid_sets(uids):
            status, data = self._run("mark mails read", imap.uid, "STORE", uid_set, "+FLAGS.SILENT", "(\\Seen)")
            if status != "OK":
                raise MailboxError(f"{self.where}: marking mails read was refused ({_answer(data)})")

    def move(self, uids: Sequence[int], folder: str) -> None:
        """Move the mails to `folder` (made when missing): MOVE where the server has it; else COPY,
        then delete them here (expunging only these with UIDPLUS; without it they stay, deleted and read)."""
        imap = self._connected()
        offered = self._offered
        target = mailbox_name(folder)
        verb = "MOVE" if "MOVE" in offered else "COPY"
        for uid_set in uid_sets(uids):
            self._into(folder, verb, uid_set, target)
            if verb == "COPY":
                flagged = self._run(
                    "delete moved mails", imap.uid, "STORE", uid_set, "+FLAGS.SILENT", "(\\Deleted \\Seen)"
                )
                if flagged[0] != "OK":
                    raise MailboxError(f"{self.where}: deleting moved mails was refused ({_answer(flagged[1])})")
                if "UIDPLUS" in offered:
                    self._run("expunge moved mails", imap.uid, "EXPUNGE", uid_set)

    def _into(self, folder: str, verb: str, uid_set: str, target: str) -> None:
        """`verb` (MOVE or COPY) the mails into `folder`, creating it when the server says to (TRYCREATE)."""
        imap = self._connected()
        status, data = self._run(f"move mails to {folder!r}", imap.uid, verb, uid_set, target)
        if status != "OK" and b"TRYCREATE" in _answer(data).encode():
            created = self._run(f"create folder {folder!r}", imap.create, target)
            if created[0] != "OK":
                raise MailboxError(f"{self.where}: cannot create folder {folder!r} ({_answer(created[1])})")
            status, data = self._run(f"move mails to {folder!r}", imap.uid, verb, uid_set, target)
        if status != "OK":
            raise MailboxError(f"{self.where}: moving mails to {folder!r} was refused ({_answer(data)})")

    def close(self) -> None:
        """Log out (quietly: the session is over either way)."""
        imap, self._imap = self._imap, None
        if imap is None:
            return
        try:
            imap.logout()
        except Exception:
            with contextlib.suppress(Exception):
                imap.shutdown()

    def _run(self, what: str, command: Callable[..., tuple[str, list[Any]]], *args: str) -> tuple[str, list[Any]]:
        """`command(*args)`, its failures as `MailboxError` naming `what` was being done."""
        try:
            return command(*args)
        except imaplib.IMAP4.abort as exc:
            raise MailboxError(f"{self.where}: the connection broke ({what}: {_reason(exc)})") from None
        except imaplib.IMAP4.error as exc:
            raise MailboxError(f"{self.where}: {what} failed ({_reason(exc)})") from None
        except (OSError, EOFError) as exc:
            raise MailboxError(f"{self.where}: the connection broke ({what}: {_reason(exc)})") from None


def _plain(login: Login) -> bytes:
    return f"\0{login.username}\0{login.secret}".encode()


def _fetched(data: Sequence[Any]) -> list[tuple[bytes, bytes]]:
    """The (metadata, literal) pairs of a FETCH answer; metadata after the literal (`UID 7)`) joined in."""
    found: list[tuple[bytes, bytes]] = []
    for item in data:
        if isinstance(item, tuple) and len(item) == 2:
            found.append((bytes(item[0]), bytes(item[1])))
        elif isinstance(item, bytes) and found and item.strip() not in (b"", b")"):
            meta, literal = found[-1]
            found[-1] = (meta + b" " + item, literal)
    return found


def _number(pattern: re.Pattern[bytes], meta: bytes) -> int | None:
    match = pattern.search(meta)
    return int(match.group(1)) if match else None


def _answer(data: Sequence[Any]) -> str:
    """A server's answer as one short line of text."""
    words = [part.decode("utf-8", "replace") if isinstance(part, bytes) else str(part) for part in data if part]
    return " ".join(" ".join(words).split())[:200] or "no reason given"


def _reason(exc: BaseException) -> str:
    """Why a call failed, in one short line: what the server, TLS or the network said."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = exc.args[0] if exc.args else exc
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    line = " ".join(str(text).split())[:200]
    return line or type(exc).__name__


# --- the watcher ---

Reveal = Callable[[str], Awaitable[Login]]
# (bucket, path, data, content type) -> the path stored under.
Store = Callable[[str, str, bytes, str], Awaitable[str]]
# (job input, idempotency key) -> the job's id. Raises the jobs service's HerderError.
StartJob = Callable[[dict[str, Any], str], Awaitable[str]]
# The inputs of the trigger's last jobs, newest first.
RecentInputs = Callable[[], Awaitable[list[dict[str, Any]]]]
SessionFactory = Callable[[MailRule], ImapSession]


@dataclass
class _Candidate:
    uid: int
    size: int
    header: bytes = field(repr=False)


class MailboxWatcher:
    """One mail trigger's mailbox: `poll_once` starts the jobs of the mails that arrived, and marks
    them. Calls never overlap (the scheduler polls one trigger at a time)."""

    def __init__(
        self,
        *,
        trigger_id: str,
        trigger_name: str,
        rule: MailRule,
        base_input: dict[str, Any],
        reveal: Reveal,
        store: Store,
        start_job: StartJob,
        recent_inputs: RecentInputs,
        log: structlog.stdlib.BoundLogger,
        session: SessionFactory = ImapSession,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.trigger_id = trigger_id
        self.trigger_name = trigger_name
        self.rule = rule
        self.base_input = base_input
        self._reveal = reveal
        self._store = store
        self._start_job = start_job
        self._recent_inputs = recent_inputs
        self._session = session
        self._clock = clock
        self.log = log.bind(trigger=trigger_name, mailbox=f"{rule.host}:{rule.port}", folder=rule.folder)
        self._login: Login | None = None
        self._revealed_at = 0.0
        self._uidvalidity: int | None = None
        # Mails judged not to match (of `_uidvalidity`): not fetched again.
        self._rejected: set[int] = set()
        # Mails whose job exists but that are not marked yet: marked at the next poll, no second job.
        self._handed: set[tuple[int, int]] = set()
        self._recovered = False

    async def poll_once(self) -> int:
        """Look in the folder once: start the jobs of the new mails that match, mark them; how many
        jobs were started. `MailboxError` when the mailbox cannot be read or changed."""
        login = await self._credential()
        session = self._session(self.rule)
        try:
            await asyncio.to_thread(session.connect)
            try:
                await asyncio.to_thread(session.login, login)
            except MailboxError as exc:
                if exc.login_refused:
                    self._login = None  # the secret may have been changed: reveal it again next time
                raise
            uidvalidity = await asyncio.to_thread(session.select, self.rule.folder)
            return await self._poll(session, uidvalidity)
        finally:
            await asyncio.to_thread(session.close)

    async def _poll(self, session: ImapSession, uidvalidity: int) -> int:
        if uidvalidity != self._uidvalidity:
            if self._uidvalidity is not None:
                self.log.warning("mail.uidvalidity_changed", before=self._uidvalidity, now=uidvalidity)
            self._uidvalidity = uidvalidity
            self._rejected.clear()
        if not self._recovered:
            # Which mails the trigger's last jobs got: one may have been made just before a crash.
            self._handed |= handed_mails(await self._recent_inputs(), self.rule.folder)
            self._recovered = True
        uids = await asyncio.to_thread(session.search, unread_only=self.rule.unread_only)
        given = [uid for uid in uids if (uidvalidity, uid) in self._handed]
        # The other mails handed out are marked already (or of another UIDVALIDITY): forgotten.
        self._handed = {(uidvalidity, uid) for uid in given}
        if given:
            self.log.info("mail.marked_late", uids=given)  # their jobs exist: no second job
            await self._finish(session, uidvalidity, given)
        skip = self._rejected.union(given)
        fresh = [uid for uid in uids if uid not in skip]
        fresh = fresh[:MAX_MAILS_PER_POLL]
        if not fresh:
            return 0
        found = await asyncio.to_thread(session.headers, fresh)
        candidates: list[_Candidate] = []
        for uid in fresh:
            if uid not in found:
                continue  # gone since the search
            size, header = found[uid]
            if _headers_match(self.rule.filters, parse_mail(header, headers_only=True)):
                candidates.append(_Candidate(uid, size, header))
            else:
                self._reject(uid)
        started = 0
        waiting: list[dict[str, Any]] = []
        for candidate in candidates:
            value = await self._read(session, candidate, uidvalidity)
            if value is None:
                continue
            if self.rule.batch:
                waiting.append(value)
                continue
            made = await self._hand(session, uidvalidity, [value])
            if made is None:
                return started  # the rest wait for the next poll
            started += made
        for group in batches(self.base_input, waiting) if waiting else []:
            made = await self._hand(session, uidvalidity, group)
            if made is None:
                break
            started += made
        return started

    async def _read(self, session: ImapSession, candidate: _Candidate, uidvalidity: int) -> dict[str, Any] | None:
        """The job-input value of one mail, its attachments stored; None when it does not match."""
        rule, uid = self.rule, candidate.uid
        if candidate.size > MAX_MAIL_BYTES:
            if rule.filters.body_contains is not None:
                self.log.warning("mail.too_large_to_filter", uid=uid, size=candidate.size)
                self._reject(uid)
                return None
            self.log.warning("mail.too_large", uid=uid, size=candidate.size, max_bytes=MAX_MAIL_BYTES)
            mail = parse_mail(candidate.header, headers_only=True)
            return mail_value(
                mail,
                uid=uid,
                uidvalidity=uidvalidity,
                folder=rule.folder,
                size=candidate.size,
                attachments=[],
                too_large=True,
            )
        raw = await asyncio.to_thread(session.message, uid)
        if raw is None:
            return None  # gone meanwhile
        mail = await asyncio.to_thread(parse_mail, raw)
        if not matches(rule.filters, mail):
            self._reject(uid)
            return None
        entries: list[dict[str, Any]] = []
        for name, attachment in zip(attachment_names(mail.attachments), mail.attachments, strict=True):
            entries.append(await self._keep(attachment, name, uidvalidity, uid))
        return mail_value(
            mail, uid=uid, uidvalidity=uidvalidity, folder=rule.folder, size=candidate.size, attachments=entries
        )

    async def _keep(self, attachment: Attachment, name: str, uidvalidity: int, uid: int) -> dict[str, Any]:
        """Store one attachment in the trigger's bucket (when it has one); its entry in the job's input.
        A refusal for good (the file too large for the bucket) leaves it unstored and is logged; a
        failure that may pass is raised, and the mail waits for the next poll."""
        bucket = self.rule.bucket
        if bucket is None:
            return attachment_entry(name, attachment)
        path = attachment_path(self.trigger_name, uidvalidity, uid, name)
        kind = attachment.content_type if _MEDIA_TYPE.fullmatch(attachment.content_type) else "application/octet-stream"
        try:
            stored = await self._store(bucket, path, attachment.data, kind)
        except FINAL_REFUSALS as exc:
            self.log.warning("mail.attachment_not_stored", uid=uid, attachment=name, bucket=bucket, error=exc.message)
            return attachment_entry(name, attachment)
        return attachment_entry(name, attachment, bucket=bucket, path=stored)

    async def _hand(self, session: ImapSession, uidvalidity: int, mails: list[dict[str, Any]]) -> int | None:
        """Start the job of `mails` and mark them; 1 when a job was made, 0 when it was refused for good
        (the mails marked all the same), None when it may work later (the mails left as they are)."""
        uids = [int(mail["uid"]) for mail in mails]
        given = job_input(self.base_input, mails, batch=self.rule.batch)
        made = 0
        if value_bytes(given) > MAX_INPUT_BYTES:
            self.log.warning("mail.job_refused", uids=uids, reason="the mail's metadata does not fit a job's input")
        else:
            try:
                job_id = await self._start_job(given, job_key(self.trigger_id, uidvalidity, uids))
            except Conflict as exc:
                if _KEY_TAKEN not in exc.message:  # every robot busy, or the trigger at its limit of open jobs
                    self.log.info("mail.job_deferred", uids=uids, reason=exc.message)
                    return None
                # The key made a job from an earlier reading of these mails that came out otherwise (an
                # attachment stored this time, not then): that job has them. Asking again would not help.
                self.log.warning("mail.job_made_before", uids=uids, reason=exc.message)
            except FINAL_REFUSALS as exc:
                self.log.warning("mail.job_refused", uids=uids, reason=exc.message)
            except HerderError as exc:
                self.log.warning("mail.job_not_started", uids=uids, error=exc.message)
                return None
            else:
                made = 1
                self.log.info("mail.job_started", uids=uids, job_id=job_id)
        self._handed.update((uidvalidity, uid) for uid in uids)
        await self._finish(session, uidvalidity, uids)
        return made

    async def _finish(self, session: ImapSession, uidvalidity: int, uids: list[int]) -> None:
        """Mark the mails read, or move them, as the rule says; then forget them."""
        if self.rule.after is MailAfter.MOVE:
            assert self.rule.move_to is not None
            await asyncio.to_thread(session.move, uids, self.rule.move_to)
        else:
            await asyncio.to_thread(session.mark_read, uids)
        self._handed.difference_update((uidvalidity, uid) for uid in uids)

    async def _credential(self) -> Login:
        if self._login is None or self._clock() - self._revealed_at > REVEAL_EVERY_S:
            self._login = await self._reveal(self.rule.credential)
            self._revealed_at = self._clock()
        return self._login

    def _reject(self, uid: int) -> None:
        if len(self._rejected) >= MAX_REMEMBERED:
            self._rejected.clear()
        self._rejected.add(uid)


__all__ = [
    "FINAL_REFUSALS",
    "MAX_BODY_BYTES",
    "MAX_MAIL_BYTES",
    "Attachment",
    "ImapSession",
    "Login",
    "MailboxError",
    "MailboxWatcher",
    "ParsedMail",
    "attachment_entry",
    "attachment_names",
    "attachment_path",
    "batches",
    "fit",
    "handed_mails",
    "html_text",
    "job_input",
    "job_key",
    "mail_value",
    "mailbox_name",
    "matches",
    "parse_mail",
    "uid_sets",
    "value_bytes",
]
