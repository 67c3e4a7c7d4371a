"""When a trigger fires: cron with seconds, daylight-saving changes both ways, windows, calendars,
the Nth working day, validity, and what a scheduler that was away makes of missed fires."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from herder.protocol.messages import IDEMPOTENCY_KEY_PATTERN
from herder.services.scheduler import fires
from herder.services.scheduler.fires import Misfire, OffDays, Rules, Window

BERLIN = ZoneInfo("Europe/Berlin")
NONE = Rules()


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local(zone: ZoneInfo, moments: list[datetime]) -> list[str]:
    return [moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z") for moment in moments]


def test_a_six_field_cron_counts_seconds() -> None:
    schedule = fires.cron_schedule("*/20 * * * * *")
    times = fires.next_times(schedule, utc(2026, 5, 1, 10, 0, 0), 3, rules=NONE)
    assert times == [utc(2026, 5, 1, 10, 0, 20), utc(2026, 5, 1, 10, 0, 40), utc(2026, 5, 1, 10, 1, 0)]


def test_a_time_the_clock_skips_fires_once_just_after_the_change() -> None:
    schedule = fires.cron_schedule("30 2 * * *", "Europe/Berlin")
    times = fires.next_times(schedule, utc(2026, 3, 28, 12), 3, rules=NONE)
    # 29 March 2026: 02:00 CET becomes 03:00 CEST; 02:30 does not exist that day.
    assert local(BERLIN, times) == [
        "2026-03-29 03:00:00 CEST",
        "2026-03-30 02:30:00 CEST",
        "2026-03-31 02:30:00 CEST",
    ]


def test_a_time_the_clock_repeats_fires_once() -> None:
    schedule = fires.cron_schedule("30 2 * * *", "Europe/Berlin")
    times = fires.next_times(schedule, utc(2026, 10, 24, 12), 2, rules=NONE)
    # 25 October 2026: 03:00 CEST becomes 02:00 CET; 02:30 happens twice, and fires once.
    assert local(BERLIN, times) == ["2026-10-25 02:30:00 CEST", "2026-10-26 02:30:00 CET"]


def test_an_hourly_schedule_over_both_changes_never_fires_twice_at_one_instant() -> None:
    schedule = fires.cron_schedule("0 * * * *", "Europe/Berlin")
    for start in (utc(2026, 3, 28, 12), utc(2026, 10, 24, 12)):
        times = fires.next_times(schedule, start, 48, rules=NONE)
        assert times == sorted(set(times))
        assert all(later - earlier >= timedelta(minutes=59) for earlier, later in itertools.pairwise(times))


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("61 * * * *", "bad minute"),
        ("* 25 * * *", "bad hour"),
        ("* * *", "has 3 fields"),
        ("0 0 * * * * *", "has 7 fields"),
        ("0 0 31 2 *", "bad day-of-month"),
    ],
)
def test_a_bad_cron_is_refused_naming_why(expression: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        fires.cron_schedule(expression)


def test_a_bad_time_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="not an IANA time zone"):
        fires.cron_schedule("0 9 * * *", "Mars/Olympus_Mons")


def test_a_window_across_midnight_keeps_the_night_hours() -> None:
    schedule = fires.cron_schedule("0 * * * *")
    rules = Rules(window=Window.parse("22:00-02:00"))
    times = fires.next_times(schedule, utc(2026, 5, 1, 12), 5, rules=rules)
    assert [moment.hour for moment in times] == [22, 23, 0, 1, 22]


@pytest.mark.parametrize("text", ["22:00", "25:00-01:00", "10:61-11:00", "ten to eleven"])
def test_a_bad_window_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="window"):
        Window.parse(text)


def test_a_fire_on_a_day_off_is_skipped_or_moved_to_the_next_working_day() -> None:
    schedule = fires.cron_schedule("0 9 * * *")
    christmas = frozenset({date(2026, 12, 25)})
    after = utc(2026, 12, 24, 12)
    skipped = fires.next_times(schedule, after, 2, rules=Rules(off_days=christmas))
    assert skipped == [utc(2026, 12, 26, 9), utc(2026, 12, 27, 9)]
    moved = fires.next_times(schedule, after, 4, rules=Rules(off_days=christmas, on_off_day=OffDays.MOVE))
    # Friday 25th moves past the weekend to Monday 28th; the weekend's own fires stand.
    assert moved == [utc(2026, 12, 26, 9), utc(2026, 12, 27, 9), utc(2026, 12, 28, 9), utc(2026, 12, 29, 9)]


def test_the_nth_working_day_counts_weekends_and_the_calendar() -> None:
    first = fires.working_day_schedule(1, "08:30", "UTC")
    new_year = frozenset({date(2026, 1, 1)})
    assert fires.next_times(first, utc(2025, 12, 31), 2, rules=Rules(off_days=new_year)) == [
        utc(2026, 1, 2, 8, 30),  # the 1st is a holiday; the 2nd a Friday
        utc(2026, 2, 2, 8, 30),  # February starts on a Sunday
    ]
    third = fires.working_day_schedule(3, "17:00", "UTC")
    assert fires.next_times(third, utc(2026, 2, 1), 1, rules=NONE) == [utc(2026, 2, 4, 17)]
    with pytest.raises(ValueError, match="at most 23"):
        fires.working_day_schedule(24, "08:00")


def test_a_trigger_fires_only_while_it_is_valid() -> None:
    schedule = fires.cron_schedule("0 12 * * *")
    rules = Rules(valid_from=utc(2026, 6, 3), valid_until=utc(2026, 6, 5, 12))
    assert fires.next_times(schedule, utc(2026, 6, 1), 10, rules=rules) == [
        utc(2026, 6, 3, 12),
        utc(2026, 6, 4, 12),
        utc(2026, 6, 5, 12),
    ]


def test_missed_fires_are_skipped_or_fired_once() -> None:
    schedule = fires.cron_schedule("* * * * *")
    grace = timedelta(seconds=30)

    def due(last: datetime, now: datetime, misfire: Misfire) -> list[datetime]:
        return fires.due(schedule, last_considered=last, now=now, rules=NONE, misfire=misfire, grace=grace)

    away = (utc(2026, 5, 1, 10), utc(2026, 5, 1, 10, 10, 20))
    assert due(*away, Misfire.SKIP) == [utc(2026, 5, 1, 10, 10)]
    assert due(*away, Misfire.FIRE_ONCE) == [
        utc(2026, 5, 1, 10, 9),  # standing for the nine missed
        utc(2026, 5, 1, 10, 10),
    ]
    assert due(utc(2026, 5, 1, 10, 10), utc(2026, 5, 1, 10, 10, 20), Misfire.SKIP) == []


def test_fire_keys_are_idempotency_keys_and_name_the_second() -> None:
    key = fires.fire_key("0123456789abcdef0123456789abcdef", datetime(2026, 5, 1, 12, 0, 5, tzinfo=BERLIN))
    assert key == "fire:0123456789abcdef01234567:20260501T100005"
    assert re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key)


def test_runs_per_month_count_in_the_triggers_time_zone() -> None:
    schedule = fires.cron_schedule("0 0 1 * *", "Europe/Berlin")
    (first,) = fires.next_times(schedule, utc(2026, 5, 15), 1, rules=NONE)
    assert first == utc(2026, 5, 31, 22)  # midnight of 1 June in Berlin
    assert fires.month_key(first, schedule) == "2026-06"
    assert time(0, 0) == first.astimezone(BERLIN).time()
