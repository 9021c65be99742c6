"""Keep freed CPU memory inside the process (glibc only).

By default glibc serves large allocations with fresh ``mmap`` pages and unmaps them on free,
so every training step page-faults its activations in again (tens of thousands of faults
per step for a 20M-parameter model). Turning that off makes freed blocks reusable. It only
concerns CPU tensors; CUDA memory has its own caching allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap and never trim it; False if not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2**30) == 1 and ok
    return ok
