"""Processes that do not outlive their launcher.

torchrun starts each rank in its own process session, so killing ``memdlm-pretrain --nproc-per-node``
or the torchrun agent used to leave the ranks training (and writing checkpoints) on their own. Linux's
``PR_SET_PDEATHSIG`` has the kernel send a signal to a process when its parent dies; ranks ask for
SIGKILL (their launcher is gone, so nobody could coordinate a save), the torchrun agent started by
``--nproc-per-node`` for SIGTERM (it then stops its ranks the usual way). Elsewhere than Linux this is
a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits; False where unsupported.

    If the parent is already gone (this process was re-parented before the call), exit at once."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), sig)
    return True


def started_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ
