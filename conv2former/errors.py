"""User-facing errors: one clear line that says what was wrong and how to fix it, never a traceback.

``UserError`` is a mistake the user fixes (exit code 2). ``RunFault`` is a fault of a running job that the user
answers (exit code 3 and up, one per kind, listed in docs/training.md "When things go wrong"): the run has already
saved what could be saved and the message says what to do next.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_CHECKPOINT_FAILED = 4
EXIT_RANK_FAILED = 5
EXIT_DATA_FAULT = 6


class UserError(Exception):
    """A mistake the user can fix (bad path, unknown variant, class-count mismatch). Printed as one line."""


class RunFault(Exception):
    """A fault of a running job; ``exit_code`` tells a scheduler (and the user) which kind."""

    exit_code = 1
    status = "failed"


class Diverged(RunFault):
    """A non-finite loss or gradient norm (``guard.max_bad_steps`` in a row), or non-finite weights at a save:
    nothing was saved from them. ``status`` names the step where it happened."""

    exit_code = EXIT_DIVERGED
    status = "diverged"

    def __init__(self, line: str, status: str) -> None:
        super().__init__(line)
        self.status = status


class CheckpointFault(RunFault):
    """A checkpoint could not be written (disk full, quota, I/O error)."""

    exit_code = EXIT_CHECKPOINT_FAILED
    status = "checkpoint save failed"


class RankFault(RunFault):
    """Another rank died or hung: a collective failed or timed out."""

    exit_code = EXIT_RANK_FAILED
    status = "a rank failed"


class DataFault(RunFault):
    """A shard became unreadable during an epoch."""

    exit_code = EXIT_DATA_FAULT
    status = "unreadable shard"


def exit_on_user_error(main: F) -> F:
    """Wrap a command-line entry point: a ``UserError`` (or ``RunFault``) becomes ``error: <message>`` on stderr and
    its exit code."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except RunFault as err:
            if str(err):  # an empty message: another rank printed the line
                print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(err.exit_code) from None

    return wrapper  # type: ignore[return-value]
