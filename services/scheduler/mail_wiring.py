"""Mail triggers in the scheduler service: one supervised poller per enabled mail trigger, the checks a
new mail trigger passes, and the callables each `MailboxWatcher` is given (reveal the credential as the
scheduler, store attachments in the trigger's bucket, start the job and record the fire).

The service drives it through `MailTriggers` in a few lines: make one in `setup`, `check` a new mail
trigger in `trigger_add`, `install` a trigger whenever it is added, loaded or changed, `uninstall` a
removed one, `sync` with every enabled mail trigger at each reload, and `stop` in `teardown`.

Replicas take turns: before each poll a replica takes (or renews) the trigger's lease in the KV bucket
`MAIL_LEASES_BUCKET`, and only the holder polls, so a mailbox is read by one replica at a time. A lease
lasts a few polls: when its holder dies, another replica takes over once it has run out. The job keys
(`mailbox.job_key`) keep one mail one job even while two replicas overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import nats.errors
import nats.js.errors
import structlog
from nats.js.kv import KeyValue
from pydantic import ValidationError

from herder.client import storage
from herder.client.requests import Client
from herder.client.secrets import reveal_credential
from herder.client.tasks import Supervisor
from herder.protocol import codec
from herder.protocol.auth import Permission, Principal
from herder.protocol.errors import Forbidden, HerderError, NotFound
from herder.protocol.jobs import JobListRequest, JobStart
from herder.protocol.messages import new_id, utcnow
from herder.protocol.scheduler import MAIL_LEASES_BUCKET, MailRule, TriggerJob
from herder.protocol.secrets import CredentialListRequest, ScopeKind
from herder.protocol.storage import BucketListRequest
from herder.services.common import bus
from herder.services.common.runtime import Runtime
from herder.services.scheduler.mailbox import (
    FINAL_REFUSALS,
    RECOVERY_JOBS,
    Login,
    MailboxError,
    MailboxWatcher,
)
from herder.services.scheduler.repository import FireRow, TriggerRepository

# A lease on a mailbox lasts this many polls (and at least MIN_LEASE_S): a replica that died hands its
# mailboxes over after that long.
LEASE_POLLS = 3
MIN_LEASE_S = 60.0
# Requests to other services (storage uploads take their own, longer, time by size).
REQUEST_TIMEOUT_S = 10.0
# A poll failing the same way is logged again at most this often.
REPEAT_LOG_S = 600.0
TASK_PREFIX = "scheduler.mail."


class MailTrigger(Protocol):
    """What `MailTriggers` reads of a trigger (the scheduler's `TriggerRecord` once it holds `mail`)."""

    @property
    def id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def enabled(self) -> bool: ...
    @property
    def job(self) -> TriggerJob: ...
    @property
    def mail(self) -> MailRule | None: ...
    def job_start(self) -> JobStart: ...


@dataclass
class _Watch:
    """One mail trigger as this replica watches it."""

    trigger: MailTrigger
    rule: MailRule
    watcher: MailboxWatcher
    log: structlog.stdlib.BoundLogger
    last_error: str | None = None
    logged_at: float = field(default=0.0)
    # Polls of one mailbox never overlap (the periodic one and one asked for with `poll_now`).
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def task(self) -> str:
        return TASK_PREFIX + self.trigger.id

    @property
    def lease_key(self) -> str:
        return f"{self.trigger.tenant}.{self.trigger.id}"


class MailTriggers:
    """The mail triggers of one scheduler replica: a poller per enabled mail trigger, under the
    service's supervisor (`scheduler.mail.<trigger id>`)."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        tasks: Supervisor,
        repo: TriggerRepository,
        instance_id: str,
        log: structlog.stdlib.BoundLogger,
        service: str = "scheduler",
    ) -> None:
        self.runtime = runtime
        self.tasks = tasks
        self.repo = repo
        self.instance_id = instance_id
        self.log = log
        self.service = service
        self._watches: dict[str, _Watch] = {}
        self._clients: dict[str, Client] = {}
        self._lock = asyncio.Lock()
        self._leases: KeyValue | None = None

    # --- what the service calls ---

    async def check(self, asker: Client, principal: Principal | None, rule: MailRule) -> None:
        """Refuse a new mail trigger whose credential or bucket does not exist (`not_found`), or whose
        author may not see the credential's secret (`forbidden`): the trigger sends it to the server it
        names, so adding one is as good as reading it. `asker` asks as the author, in its tenant."""
        if principal is None or not principal.can(Permission.SECRETS_REVEAL):
            raise Forbidden(
                f"a mail trigger logs in to {rule.host} with the secret of credential {rule.credential!r}: adding "
                f"one takes the right to see secrets ({Permission.SECRETS_REVEAL.value}); ask an admin"
            )
        listed = await asker.request(CredentialListRequest())
        credential = next((found for found in listed.credentials if found.name == rule.credential), None)
        if credential is None:
            raise NotFound(
                f"mail.credential: no credential {rule.credential!r}; set it with "
                f"'herder credential set {rule.credential} --username <login>'",
                details={"field": "mail.credential"},
            )
        if not any(value.scope.kind is ScopeKind.GLOBAL for value in credential.values):
            raise NotFound(
                f"mail.credential: credential {rule.credential!r} has no global value, which a mail trigger "
                f"logs in with; set one with 'herder credential set {rule.credential} --username <login>'",
                details={"field": "mail.credential"},
            )
        if rule.bucket is not None:
            buckets = await asker.request(BucketListRequest())
            if not any(bucket.name == rule.bucket for bucket in buckets.buckets):
                raise NotFound(
                    f"mail.bucket: no bucket {rule.bucket!r}; 'herder storage buckets' lists them, "
                    f"'herder storage bucket-create {rule.bucket}' makes it",
                    details={"field": "mail.bucket"},
                )

    async def install(self, trigger: MailTrigger) -> None:
        """Watch the mailbox of `trigger` when it is an enabled mail trigger (again, if its rule or job
        changed); let go of it otherwise."""
        async with self._lock:
            rule = trigger.mail
            held = self._watches.get(trigger.id)
            if rule is None or not trigger.enabled:
                if held is not None:
                    await self._let_go(held)
                return
            if held is not None:
                if held.rule == rule and held.trigger.job == trigger.job:
                    held.trigger = trigger
                    return
                await self._let_go(held)
            watch = self._watch(trigger, rule)
            self._watches[trigger.id] = watch
            self.tasks.periodic(watch.task, partial(self._poll, watch), rule.poll_s, start_now=True)
            watch.log.info("mail.watching", every_s=rule.poll_s)

    async def uninstall(self, trigger_id: str) -> None:
        """Stop watching a trigger's mailbox (it was removed or disabled); unknown ids are ignored."""
        async with self._lock:
            held = self._watches.get(trigger_id)
            if held is not None:
                await self._let_go(held)

    async def sync(self, triggers: Iterable[MailTrigger]) -> None:
        """Watch exactly these mail triggers (every enabled one, as the database holds them)."""
        seen: set[str] = set()
        for trigger in triggers:
            seen.add(trigger.id)
            await self.install(trigger)
        for trigger_id in set(self._watches) - seen:
            await self.uninstall(trigger_id)

    async def stop(self) -> None:
        """Stop every poller and hand their leases back, so another replica takes over at once."""
        async with self._lock:
            for held in list(self._watches.values()):
                await self._let_go(held)

    def watched(self) -> dict[str, str | None]:
        """The triggers this replica watches, by name, each with how its last poll failed (None: it did not)."""
        return {watch.trigger.name: watch.last_error for watch in self._watches.values()}

    async def poll_now(self, trigger_id: str) -> int | None:
        """Look in a watched trigger's mailbox now, as its next poll would; how many jobs that started,
        or None when this replica does not watch it or another replica holds its mailbox."""
        watch = self._watches.get(trigger_id)
        return None if watch is None else await self._poll(watch)

    # --- polling ---

    async def _poll(self, watch: _Watch) -> int | None:
        """One poll of one mailbox, by this replica if it holds the mailbox's lease (None if not); how
        many jobs it started. A failure that is the mailbox's or another service's is logged (once, and
        again every REPEAT_LOG_S while it lasts) and the next poll tries again; anything else is a bug,
        for the supervisor to log."""
        async with watch.busy:
            if not await self._hold(watch):
                return None
            try:
                started = await watch.watcher.poll_once()
            except (MailboxError, HerderError) as exc:  # HerderError: the credential gone, the jobs service down
                self._failed(watch, exc.message)
                return 0
        if watch.last_error is not None:
            watch.log.info("mail.poll_recovered", error_was=watch.last_error)
            watch.last_error = None
        if started:
            watch.log.info("mail.polled", jobs_started=started)
        return started

    def _failed(self, watch: _Watch, error: str) -> None:
        now = time.monotonic()
        if error != watch.last_error or now - watch.logged_at >= REPEAT_LOG_S:
            watch.log.warning("mail.poll_failed", error=error)
            watch.logged_at = now
        watch.last_error = error

    def _watch(self, trigger: MailTrigger, rule: MailRule) -> _Watch:
        log = self.log.bind(tenant=trigger.tenant, trigger=trigger.name)
        client = self._client(trigger.tenant)
        watcher = MailboxWatcher(
            trigger_id=trigger.id,
            trigger_name=trigger.name,
            rule=rule,
            base_input=dict(trigger.job.input),
            reveal=partial(self._reveal, client),
            store=partial(self._store, client),
            start_job=partial(self._start_job, client, trigger),
            recent_inputs=partial(self._recent_inputs, client, trigger.name),
            log=self.log.bind(tenant=trigger.tenant),
        )
        return _Watch(trigger=trigger, rule=rule, watcher=watcher, log=log)

    async def _let_go(self, watch: _Watch) -> None:
        await self.tasks.cancel(watch.task)
        self._watches.pop(watch.trigger.id, None)
        await self._release(watch)
        watch.log.info("mail.not_watching")

    # --- the watcher's callables ---

    def _client(self, tenant: str) -> Client:
        """A client asking as the scheduler itself, in `tenant`."""
        client = self._clients.get(tenant)
        if client is None:
            token = self.runtime.tokens.service_token(self.service)
            client = self._clients[tenant] = Client(
                self.runtime.nc, token=token, tenant=tenant, timeout=REQUEST_TIMEOUT_S
            )
        return client

    async def _reveal(self, client: Client, credential: str) -> Login:
        """The credential's global username and secret, sealed to a key made for this one request and
        opened here: the secret stays in this process's memory, never written or logged."""
        revealed = await reveal_credential(client, credential)
        return Login(username=revealed.username, secret=revealed.secret)

    async def _store(self, client: Client, bucket: str, path: str, data: bytes, content_type: str) -> str:
        """Store an attachment at `path` in `bucket` (replacing what is there); the path it has there."""
        handle, name = await asyncio.to_thread(tempfile.mkstemp, prefix="herder-mail-")
        try:
            await asyncio.to_thread(_write, handle, data)
            stored = await storage.upload(client, bucket, path, name, content_type=content_type)
        finally:
            await asyncio.to_thread(_remove, name)
        return stored.path

    async def _start_job(self, client: Client, trigger: MailTrigger, given: dict[str, Any], key: str) -> str:
        """Start a job of `trigger` with `given` as its input under `key`, and record the fire (the job,
        or why it was refused for good); the job's id."""
        base = trigger.job_start().model_dump(exclude={"request_id"})
        try:
            request = JobStart.model_validate({**base, "input": given})
        except ValidationError as exc:
            refusal = codec.invalid("job", exc)
            await self._record(trigger, job_id=None, skipped=refusal.message)
            raise refusal from None
        try:
            job = await client.request(request, idempotency_key=key)
        except FINAL_REFUSALS as exc:
            await self._record(trigger, job_id=None, skipped=exc.message)
            raise
        await self._record(trigger, job_id=job.id, skipped=None)
        return job.id

    async def _recent_inputs(self, client: Client, trigger_name: str) -> list[dict[str, Any]]:
        """The inputs of the trigger's last jobs (the mails they were given), newest first."""
        listed = await client.request(JobListRequest(trigger=trigger_name, limit=RECOVERY_JOBS))
        return [job.input for job in listed.jobs]

    async def _record(self, trigger: MailTrigger, *, job_id: str | None, skipped: str | None) -> None:
        """Write the fire of a mail (its job, or why it has none) into the trigger's history."""
        now = utcnow()
        fire = FireRow(
            id=new_id(),
            tenant=trigger.tenant,
            trigger_id=trigger.id,
            trigger_name=trigger.name,
            scheduled_at=None,
            cause="mail",
            claimed_by=self.instance_id,
            claimed_at=now,
            fired_at=now,
            job_id=job_id,
            skipped=skipped,
        )
        engine = self.runtime.engine
        if engine is None:
            raise RuntimeError("the scheduler runs with a database; this runtime has none")
        try:
            async with engine.begin() as connection:
                await self.repo.add_fire(connection, fire)
                await self.repo.finish(connection, [fire])
                if job_id is not None:
                    await self.repo.count_runs(connection, [trigger.id])
        except Exception as exc:  # the job exists all the same: only its line in the history is missing
            self.log.warning("trigger.mail_fire_unsaved", trigger=trigger.name, job_id=job_id, error=repr(exc))

    # --- leases ---

    async def _bucket(self) -> KeyValue:
        if self._leases is None:
            self._leases = await bus.ensure_bucket(self.runtime.js, MAIL_LEASES_BUCKET, self.runtime.jetstream)
        return self._leases

    async def _hold(self, watch: _Watch) -> bool:
        """Take or renew this replica's lease on the watch's mailbox; whether it holds it now."""
        lease_s = max(LEASE_POLLS * watch.rule.poll_s, MIN_LEASE_S)
        now = time.time()  # the wall clock: replicas on other machines read the same lease
        claim = json.dumps({"holder": self.instance_id, "until": now + lease_s}).encode()
        try:
            leases = await self._bucket()
            try:
                entry = await leases.get(watch.lease_key)
            except nats.js.errors.KeyNotFoundError:
                await leases.create(watch.lease_key, claim)
                return True
            holder, until = _lease(entry.value)
            if holder != self.instance_id and until > now:
                return False
            await leases.update(watch.lease_key, claim, last=entry.revision)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            return False  # another replica took it at the same moment
        except (nats.errors.Error, TimeoutError) as exc:
            self._failed(watch, f"the mailbox lease cannot be read ({type(exc).__name__}: {exc})")
            return False

    async def _release(self, watch: _Watch) -> None:
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            leases = await self._bucket()
            entry = await leases.get(watch.lease_key)
            if _lease(entry.value)[0] == self.instance_id:
                await leases.delete(watch.lease_key, last=entry.revision)


def _lease(value: bytes | None) -> tuple[str | None, float]:
    """Who holds a lease and until when (seconds since the epoch); nobody, for one unreadable."""
    try:
        held = json.loads(value or b"{}")
        return str(held["holder"]), float(held["until"])
    except (ValueError, KeyError, TypeError):
        return None, 0.0


def _write(handle: int, data: bytes) -> None:
    with os.fdopen(handle, "wb") as out:
        out.write(data)


def _remove(name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name)


__all__ = ["LEASE_POLLS", "MIN_LEASE_S", "MailTrigger", "MailTriggers"]
