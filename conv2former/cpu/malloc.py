"""Host memory that stays with the process: glibc's malloc told to reuse freed memory instead of returning it.

A CPU training step allocates and frees the same activation buffers every step. By default glibc's malloc serves each
large buffer (over its mmap threshold, at most 32 MiB) with a fresh ``mmap`` and gives it back to the kernel on
``free``, and trims the heap top when more than a threshold is free. The next step then touches the same sizes again
as new pages: ConvNeXt-T and Conv2Former-T at batch 8, 224 px took 50,000-100,000 page faults per step (each a kernel
entry and a zeroed 4 KiB page), 7-10% of the step (docs/performance.md, "Host memory").
``keep_freed_memory`` sets ``M_MMAP_MAX`` to 0 (every allocation comes from the heap) and ``M_TRIM_THRESHOLD`` to -1
(the heap is never trimmed), so after the first step every buffer is reused memory: what tcmalloc or jemalloc give
PyTorch's CPU training through ``LD_PRELOAD``, done in the process and without another library.

The cost is that the process keeps its peak heap until it exits (resident memory stays at the peak of a step instead
of falling between steps), and that it applies to the whole process, workers forked later included. It is glibc only:
elsewhere (musl, macOS) nothing is changed and ``keep_freed_memory`` returns False.
"""

import ctypes
import ctypes.util
import platform
from typing import Optional

__all__ = ["keep_freed_memory", "freed_memory_kept"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4

_kept = False


def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Make this process's malloc keep freed memory for reuse (see the module docstring). True if it now does.

    Idempotent; it cannot be undone within the process (mallopt's defaults adapt to the history of the process and
    are not restored by setting values).
    """
    global _kept
    if _kept:
        return True
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; -1 for M_TRIM_THRESHOLD is glibc's documented "never trim"
    _kept = bool(libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1)
    return _kept


def freed_memory_kept() -> bool:
    """Whether ``keep_freed_memory`` took effect in this process."""
    return _kept
