"""How a stage's process ends: ``exit_process(code)`` instead of ``sys.exit(code)`` in the launchers' ``__main__``.

A process that has loaded torch, DeepSpeed, timm, DALI and TensorBoard spends about 2 s (2-core CPU, measured by
benchmarks/fixed_cost.py) in the interpreter's finalization after its work is done: every module torn down, every
object freed one by one. Nothing of that is needed once the outputs are written, and every rank of every run pays
it. So: the ``atexit`` handlers run as usual (logging flushes, multiprocessing stops its workers, coverage saves,
temporary folders go), stdout and stderr are flushed, and the process ends with ``os._exit``. Where a non-daemon
thread still runs (work the program would have waited for), it exits the usual way instead.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn, Optional


def exit_process(code: Optional[int]) -> NoReturn:
    """End this process with ``code`` (None: 0), skipping the interpreter's finalization (see the module docstring)."""
    code = int(code or 0)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    # (atexit has no public "run the handlers now"; _run_exitfuncs is what the interpreter itself calls)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # (closed, or a pipe whose reader is gone)
            pass
    os._exit(code)
