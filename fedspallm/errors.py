"""User-facing errors: one clear line, non-zero exit, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unusable environment. The CLI prints ``error: <message>`` and exits 2."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)
