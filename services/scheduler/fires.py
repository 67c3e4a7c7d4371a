"""When a time trigger fires: pure decisions over a schedule, a clock reading and a trigger's history.

A schedule is a cron expression (five fields, or six with seconds first; parsed and walked by
`cronsim`, which follows Debian's cron across daylight-saving changes: a time the clock skips fires
once just after the change, a time the clock repeats fires once) in an IANA time zone, or the Nth
working day of each month at a time of day. On top of it, a trigger may:

- be valid only from / until a moment;
- fire only within a daily window (`22:00-06:00` crosses midnight);
- skip the non-working days of a calendar, or move such a fire to the next working day, same time;
- be limited to a number of runs in all and per calendar month (in the trigger's time zone).

Every function here is pure: the scheduler service loads the trigger, asks, writes, publishes.
Times come in and go out timezone-aware; fire keys are UTC.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from herder.protocol.scheduler import Misfire, OffDays

# A schedule with no fire within this long is refused: it would never do anything.
HORIZON = timedelta(days=366 * 5)
# How many candidate times a filter may reject in a row before the schedule is deemed to never fire.
MAX_REJECTED = 100_000
_WINDOW = re.compile(r"(\d{2}):(\d{2})-(\d{2}):(\d{2})")
_CRON_FIELDS = ("second", "minute", "hour", "day of month", "month", "day of week")

__all__ = ["Misfire", "OffDays", "Rules", "Schedule", "Window"]


@dataclass(frozen=True)
class Window:
    """A daily window of local time; `start > end` crosses midnight. `start == end` is the whole day."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> Window:
        found = _WINDOW.fullmatch(text.strip())
        if found is None:
            raise ValueError(f"window {text!r} is not HH:MM-HH:MM (like 22:00-06:00)")
        h1, m1, h2, m2 = (int(part) for part in found.groups())
        if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
            raise ValueError(f"window {text!r}: hours go up to 23 and minutes up to 59")
        return cls(time(h1, m1), time(h2, m2))

    def holds(self, moment: time) -> bool:
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end


@dataclass(frozen=True)
class Schedule:
    """When a trigger fires, before its limits: a cron expression, or the Nth working day of the month."""

    zone: ZoneInfo
    cron: str | None = None
    # The Nth working day (1 = first) of every month, at `at` (with `off_days` naming the holidays).
    working_day: int | None = None
    at: time | None = None


@dataclass(frozen=True)
class Rules:
    """What narrows a schedule's fires."""

    valid_from: datetime | None = None
    valid_until: datetime | None = None
    window: Window | None = None
    off_days: frozenset[date] = frozenset()
    on_off_day: OffDays = OffDays.SKIP
    # Saturdays and Sundays count as non-working days for the Nth working day (and for `move`).
    weekends_off: bool = True


def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name`, or `ValueError` saying it is not one."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"time zone {name!r} is not an IANA time zone (like Europe/Moscow or UTC)") from None


def cron_schedule(expression: str, zone_name: str = "UTC") -> Schedule:
    """A cron schedule, checked: `ValueError` naming the field that is wrong, or saying it never fires."""
    tz = zone(zone_name)
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise ValueError(
            f"cron {expression!r} has {len(fields)} fields; give 5 (minute hour day month weekday) or 6 (second first)"
        )
    start = datetime(2000, 1, 1, tzinfo=tz)
    try:
        CronSim(" ".join(fields), start)
    except CronSimError as exc:
        raise ValueError(f"cron {expression!r}: {_cron_problem(exc, fields)}") from None
    schedule = Schedule(zone=tz, cron=" ".join(fields))
    if not next_times(schedule, datetime.now(UTC), 1, rules=Rules(), horizon=HORIZON):
        raise ValueError(f"cron {expression!r} never fires (not within {HORIZON.days // 366} years)")
    return schedule


def _cron_problem(exc: CronSimError, fields: list[str]) -> str:
    text = str(exc)
    if len(fields) == 6:  # cronsim names the fields of the 5-field form; with seconds, say which is which
        for name in _CRON_FIELDS:
            if name.split()[0] in text.lower():
                return f"{text.lower()} (fields: {', '.join(_CRON_FIELDS)})"
    return text.lower()


def working_day_schedule(n: int, at: str, zone_name: str = "UTC") -> Schedule:
    """The Nth working day of every month (1 to 23) at `at` (HH:MM)."""
    if not 1 <= n <= 23:
        raise ValueError(f"working day {n}: a month has at most 23 working days; give 1 to 23")
    try:
        hour, minute = (int(part) for part in at.split(":"))
        moment = time(hour, minute)
    except ValueError:
        raise ValueError(f"time {at!r} is not HH:MM") from None
    return Schedule(zone=zone(zone_name), working_day=n, at=moment)


def is_off(day: date, rules: Rules) -> bool:
    """Whether `day` is a non-working day: in the calendar, or a weekend when weekends are off."""
    return day in rules.off_days or (rules.weekends_off and day.weekday() >= 5)


def _candidates(schedule: Schedule, after: datetime) -> Iterator[datetime]:
    """The schedule's own times after `after` (local, aware), in order, before any rule."""
    local = after.astimezone(schedule.zone)
    if schedule.cron is not None:
        # cronsim starts strictly after its start time, to the second (or minute) of the expression.
        yield from CronSim(schedule.cron, local.replace(microsecond=0))
        return
    assert schedule.working_day is not None and schedule.at is not None
    month = date(local.year, local.month, 1)
    while True:
        day = _nth_working_day(month, schedule.working_day, Rules(off_days=frozenset(), weekends_off=True))
        if day is not None:
            moment = datetime.combine(day, schedule.at, tzinfo=schedule.zone)
            if moment > local:
                yield moment
        month = date(month.year + month.month // 12, month.month % 12 + 1, 1)


def _nth_working_day(month: date, n: int, rules: Rules) -> date | None:
    day, seen = month, 0
    while day.month == month.month:
        if not is_off(day, rules):
            seen += 1
            if seen == n:
                return day
        day += timedelta(days=1)
    return None


def next_times(
    schedule: Schedule, after: datetime, count: int, *, rules: Rules, horizon: timedelta = HORIZON
) -> list[datetime]:
    """The next `count` fire times after `after`, in UTC, in order, with the rules applied (a fire moved
    onto a time that fires anyway fires once); fewer when the schedule ends (valid until) or nothing
    fires within `horizon`."""
    found: list[datetime] = []
    limit = after.astimezone(UTC) + horizon
    if rules.valid_until is not None:
        limit = min(limit, rules.valid_until.astimezone(UTC))
    # Moved fires land later than the candidates that follow them: they wait here until those pass.
    waiting: list[datetime] = []
    rejected = 0

    def take(moment: datetime) -> bool:
        if not found or moment > found[-1]:
            found.append(moment)
        return len(found) >= count

    for original, effective in _candidates_with_rules(schedule, after, rules):
        if original.astimezone(UTC) > limit:
            break
        while waiting and waiting[0] <= original.astimezone(UTC):
            if take(heapq.heappop(waiting)):
                return found
        if effective is None:
            rejected += 1
            if rejected > MAX_REJECTED:
                break
            continue
        rejected = 0
        utc = effective.astimezone(UTC)
        if utc > limit:
            continue
        if utc > original.astimezone(UTC):
            heapq.heappush(waiting, utc)
            continue
        if take(utc):
            return found
    while waiting and len(found) < count:
        take(heapq.heappop(waiting))
    return found


def _candidates_with_rules(
    schedule: Schedule, after: datetime, rules: Rules
) -> Iterator[tuple[datetime, datetime | None]]:
    """Each of the schedule's own times with what the rules make of it: the time it fires at (itself,
    or a later one when moved), or None when a rule rejects it."""
    start = after
    if rules.valid_from is not None and rules.valid_from > start:
        start = rules.valid_from - timedelta(microseconds=1)
    for candidate in _candidates(schedule, start):
        yield candidate, _apply_rules(schedule, candidate, after, rules)


def _apply_rules(schedule: Schedule, candidate: datetime, after: datetime, rules: Rules) -> datetime | None:
    if schedule.working_day is not None:
        # The Nth working day counts the calendar's days off itself.
        day = _nth_working_day(date(candidate.year, candidate.month, 1), schedule.working_day, rules)
        if day is None:
            return None
        assert schedule.at is not None
        candidate = datetime.combine(day, schedule.at, tzinfo=schedule.zone)
        if candidate.astimezone(UTC) <= after.astimezone(UTC):
            return None
    elif rules.off_days and candidate.date() in rules.off_days:
        if rules.on_off_day is OffDays.SKIP:
            return None
        day = candidate.date()
        while is_off(day, rules):
            day += timedelta(days=1)
        candidate = datetime.combine(day, candidate.timetz().replace(tzinfo=None), tzinfo=schedule.zone)
    if rules.window is not None and not rules.window.holds(candidate.timetz().replace(tzinfo=None)):
        return None
    return candidate


def due(
    schedule: Schedule,
    *,
    last_considered: datetime,
    now: datetime,
    rules: Rules,
    misfire: Misfire,
    grace: timedelta,
) -> list[datetime]:
    """The fires to make now: those after `last_considered` up to `now`. Fires older than `grace` were
    missed (no scheduler ran): with `skip` they are dropped; with `fire-once` the newest of them fires
    once, standing for all. Fires within `grace` all fire (a scheduler that is a moment late)."""
    fires: list[datetime] = []
    for moment in _times_between(schedule, last_considered, now, rules):
        fires.append(moment)
    if not fires:
        return []
    recent = [moment for moment in fires if now - moment <= grace]
    missed = [moment for moment in fires if now - moment > grace]
    if missed and misfire is Misfire.FIRE_ONCE:
        return [missed[-1], *recent]
    return recent


def _times_between(schedule: Schedule, after: datetime, until: datetime, rules: Rules) -> Iterable[datetime]:
    moment = after
    while True:
        batch = next_times(schedule, moment, 1000, rules=rules, horizon=until - moment + timedelta(microseconds=1))
        batch = [time_ for time_ in batch if time_ <= until]
        yield from batch
        if len(batch) < 1000:
            return
        moment = batch[-1]


def month_key(moment: datetime, schedule: Schedule) -> str:
    """The calendar month a fire counts in, for `max runs per month` (in the schedule's time zone)."""
    local = moment.astimezone(schedule.zone)
    return f"{local.year:04d}-{local.month:02d}"


def fire_key(trigger_id: str, moment: datetime) -> str:
    """The key that makes one fire one job, whichever scheduler replica makes it: the trigger and the
    fire's UTC time, to the second. It fits the jobs service's idempotency keys."""
    return f"fire:{trigger_id[:24]}:{moment.astimezone(UTC).strftime('%Y%m%dT%H%M%S')}"
