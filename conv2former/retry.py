"""The one retry helper: an action retried with exponential backoff while its error is transient (the remote output's
uploads and downloads, the shard cache's fetches), and the one-line report of an action that failed
(``attempt``: checkpoint writes, uploads). Hand-written in a few lines: the maintained retry libraries (tenacity,
backoff) would be a dependency for one loop."""

from __future__ import annotations

import time
from typing import Callable, Optional, Tuple, Type, TypeVar

T = TypeVar("T")


def is_transient(err: BaseException) -> bool:
    """An I/O error worth another try: not a missing object and not a refusal."""
    return isinstance(err, OSError) and not isinstance(err, (FileNotFoundError, PermissionError))


def retried(
    action: Callable[[], T], retries: int = 4, backoff: float = 0.5,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:  # fmt: skip
    """``action()``, tried up to ``retries + 1`` times, ``backoff * 2**n`` seconds apart, while its error is
    ``transient``; the last error (or the first that is not transient) is raised."""
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - classified by ``transient``
            if attempt == retries or not transient(err):
                raise
        time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")  # (the loop returns or raises)


def first_line(err: BaseException) -> str:
    """``OSError: <the first line of its message>`` (at most 200 characters)."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def attempt(
    action: Callable[[], object], errors: Tuple[Type[BaseException], ...] = (OSError, RuntimeError),
    describe: Callable[[BaseException], str] = first_line,
) -> Optional[str]:  # fmt: skip
    """Run ``action``; None, or what went wrong in one line (``describe``) when it raised one of ``errors``."""
    try:
        action()
        return None
    except errors as err:
        return describe(err)
