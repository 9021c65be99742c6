"""Turn SIGTERM / SIGUSR1 (Slurm's and torchrun's ways of asking a job to stop) into a flag.

The trainer checks the flag after each optimizer step, saves a checkpoint and returns, so a
preempted job resumes where it stopped. A second signal falls back to the default action.
"""

from __future__ import annotations

import contextlib
import signal


class StopFlag:
    def __init__(self):
        self.signal_name: str | None = None

    def __call__(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGUSR1)):
    flag = StopFlag()
    previous = {}

    def handler(signum, frame):
        flag.signal_name = signal.Signals(signum).name
        signal.signal(signum, previous.get(signum, signal.SIG_DFL))

    for sig in signals:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
