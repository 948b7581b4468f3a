"""User-facing errors: one clear line that says what was wrong and how to fix it, never a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A mistake the user can fix (bad path, unknown variant, class-count mismatch). Printed as one line."""


def exit_on_user_error(main: F) -> F:
    """Wrap a command-line entry point: a ``UserError`` becomes ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
