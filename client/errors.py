"""Errors that stop herder from starting as configured."""

from __future__ import annotations


class SetupError(Exception):
    """herder cannot start as configured; the message names the cause and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
