"""Secrets kept out of a job's log: a line that contains one is masked before it leaves the robot.

The channel adds each password it hands to the script; the job's log (`agent.JobLog`) masks every
line and every text field the runner reads from then on, whatever stream it came on.
"""

from __future__ import annotations

from typing import Any

MASK = "***"
# Shorter secrets cannot be masked without mangling the log (every "a" would go); they are noted.
MIN_MASKED_CHARS = 4


class Masks:
    """The secrets of one run, to be masked in its log."""

    def __init__(self) -> None:
        self._secrets: list[str] = []

    def add(self, secret: str) -> bool:
        """Mask `secret` from now on; False (and nothing masked) when it is too short to mask."""
        if len(secret) < MIN_MASKED_CHARS:
            return False
        if secret not in self._secrets:
            # Longest first, so that a secret inside another is not masked half.
            self._secrets.append(secret)
            self._secrets.sort(key=len, reverse=True)
        return True

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def text(self, text: str) -> str:
        """`text` with every stretch any secret covers replaced by MASK (overlapping ones as one)."""
        spans: list[tuple[int, int]] = []
        for secret in self._secrets:
            start = text.find(secret)
            while start >= 0:
                spans.append((start, start + len(secret)))
                start = text.find(secret, start + 1)
        if not spans:
            return text
        spans.sort()
        merged = [spans[0]]
        for start, end in spans[1:]:
            if start < merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        pieces, at = [], 0
        for start, end in merged:
            pieces += [text[at:start], MASK]
            at = end
        pieces.append(text[at:])
        return "".join(pieces)

    def value(self, value: Any) -> Any:
        """`value` with every string in it (keys included) masked; keys that mask alike stay apart."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            masked: dict[Any, Any] = {}
            for key, item in value.items():
                shown = self.text(key) if isinstance(key, str) else key
                while shown in masked:
                    shown = f"{shown}_"
                masked[shown] = self.value(item)
            return masked
        if isinstance(value, list | tuple):
            return [self.value(item) for item in value]
        return value
