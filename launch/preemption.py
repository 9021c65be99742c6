"""Turn SIGTERM, SIGUSR1 (Slurm's and torchrun's ways of asking a job to stop) and Ctrl-C (SIGINT) into a
flag.

The trainer checks the flag after each optimizer step (all ranks agree on it in the step's control
all-reduce), saves a checkpoint of the last completed step and returns, so a stopped run resumes where it
stopped, whatever ``--checkpoint.every`` is. Later SIGTERM/SIGUSR1 are only counted: torchrun's agent may
forward one signal twice, and a second signal must not kill a rank in the middle of the checkpoint it is
writing. A second Ctrl-C is a user who does not want to wait: it raises ``KeyboardInterrupt`` at once; a
save it cuts short stays in its staging folder, so the previous checkpoint is untouched.
"""

from __future__ import annotations

import contextlib
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    def __init__(self):
        self.signal_name: str | None = None
        self.count = 0

    def __call__(self) -> bool:
        return self.signal_name is not None

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (SIGINT) rather than by a scheduler."""
        return self.signal_name == "SIGINT"


@contextlib.contextmanager
def stop_on_signals(signals=STOP_SIGNALS, announce: bool = True, second_interrupt_aborts: bool = True):
    """``announce``: say on stderr, once, what the first Ctrl-C does (rank 0 only).
    ``second_interrupt_aborts``: false for ranks under torchrun, whose agent forwards signals (it may send
    one twice) and ends its ranks itself after its shutdown timeout."""
    flag = StopFlag()
    previous = {}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        flag.count += 1
        if flag.signal_name is None:
            flag.signal_name = name
            if name == "SIGINT" and announce:
                print("\ninterrupt: finishing this step, then saving a checkpoint and exiting (Ctrl-C again stops "
                      "at once; the previous checkpoint stays intact)", file=sys.stderr, flush=True)
        elif name == "SIGINT" and flag.signal_name == "SIGINT" and second_interrupt_aborts:
            raise KeyboardInterrupt

    for sig in signals:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
