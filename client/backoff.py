"""How long to wait before trying again: one pure function every retrying loop shares.

Modelled on dramatiq's `compute_backoff`: exponential growth from a base, a cap, and jitter, so
that a fleet of robots and services reconnecting after the same outage does not retry in lockstep.
"""

from __future__ import annotations

import random


def backoff(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    factor: float = 2.0,
    jitter: float = 0.5,
    rng: random.Random | None = None,
) -> float:
    """The pause, in seconds, before retry number `attempt` (1 for the first retry).

    The ceiling is `base_s * factor ** (attempt - 1)`, capped at `max_s`. Jitter takes a random
    share of the ceiling away: the pause is uniform in `[ceiling * (1 - jitter), ceiling]`. So
    `jitter=0.5` (the default) is "equal jitter" (half fixed, half random, as dramatiq does),
    `jitter=1.0` is "full jitter" (anywhere from 0 to the ceiling), and `jitter=0.0` none at all.

    Pure: the only randomness comes from `rng` (the `random` module's shared generator when None),
    so a seeded `rng` gives the same pauses every time. An `attempt` below 1 is refused with
    `ValueError`, as are a negative `base_s`, a `max_s` below `base_s`, a `factor` below 1 and a
    `jitter` outside [0, 1].
    """
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more (the first retry is attempt 1), not {attempt}")
    if base_s < 0 or max_s < base_s:
        raise ValueError(f"need 0 <= base_s <= max_s, not base_s={base_s}, max_s={max_s}")
    if factor < 1:
        raise ValueError(f"factor must be 1 or more, not {factor}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be between 0 and 1, not {jitter}")
    try:
        ceiling = min(base_s * factor ** (attempt - 1), max_s)
    except OverflowError:  # a loop that has failed for days: the cap has long been reached
        ceiling = max_s
    if jitter == 0.0:
        return ceiling
    draw = rng.random() if rng is not None else random.random()
    return ceiling * (1.0 - jitter * draw)
