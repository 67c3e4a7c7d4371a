"""The shared backoff: growth, cap, jitter within its documented bounds, and what it refuses."""

from __future__ import annotations

import random

import pytest

from herder.client.backoff import backoff

BASE_S = 0.5
MAX_S = 30.0


def test_without_jitter_the_first_retry_waits_the_base_and_each_next_one_the_factor_more() -> None:
    pauses = [backoff(attempt, base_s=BASE_S, max_s=MAX_S, jitter=0.0) for attempt in range(1, 7)]
    assert pauses == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert [backoff(n, base_s=1.0, max_s=MAX_S, factor=3.0, jitter=0.0) for n in (1, 2, 3)] == [1.0, 3.0, 9.0]


@pytest.mark.parametrize("attempt", [7, 8, 50, 1_000, 100_000])
def test_the_pause_is_capped_even_after_an_attempt_count_that_would_overflow(attempt: int) -> None:
    assert backoff(attempt, base_s=BASE_S, max_s=MAX_S, jitter=0.0) == MAX_S
    assert MAX_S / 2 <= backoff(attempt, base_s=BASE_S, max_s=MAX_S, rng=random.Random(attempt)) <= MAX_S


@pytest.mark.parametrize(("jitter", "attempt"), [(0.5, 1), (0.5, 4), (1.0, 3), (0.25, 10), (0.5, 7)])
def test_jitter_spreads_pauses_within_the_documented_bounds(jitter: float, attempt: int) -> None:
    rng = random.Random(1234)
    ceiling = min(BASE_S * 2.0 ** (attempt - 1), MAX_S)
    pauses = [backoff(attempt, base_s=BASE_S, max_s=MAX_S, jitter=jitter, rng=rng) for _ in range(500)]
    assert all(ceiling * (1 - jitter) <= pause <= ceiling for pause in pauses)
    assert len(set(pauses)) > 450  # a fleet does not retry in lockstep
    # The spread covers the whole band, not one corner of it.
    assert min(pauses) < ceiling * (1 - jitter) + ceiling * jitter * 0.1
    assert max(pauses) > ceiling - ceiling * jitter * 0.1


def test_pauses_are_a_pure_function_of_the_generator() -> None:
    def series(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [backoff(attempt, base_s=BASE_S, max_s=MAX_S, rng=rng) for attempt in range(1, 20)]

    assert series(7) == series(7)
    assert series(7) != series(8)


@pytest.mark.parametrize("attempt", [0, -1, -100])
def test_an_attempt_below_one_is_refused(attempt: int) -> None:
    with pytest.raises(ValueError, match="attempt must be 1 or more"):
        backoff(attempt, base_s=BASE_S, max_s=MAX_S)


@pytest.mark.parametrize(
    "settings",
    [
        {"base_s": -1.0, "max_s": MAX_S},
        {"base_s": 10.0, "max_s": 5.0},
        {"base_s": BASE_S, "max_s": MAX_S, "factor": 0.5},
        {"base_s": BASE_S, "max_s": MAX_S, "jitter": 1.5},
        {"base_s": BASE_S, "max_s": MAX_S, "jitter": -0.1},
    ],
)
def test_settings_that_make_no_sense_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        backoff(1, **settings)  # type: ignore[arg-type]
