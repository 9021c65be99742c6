"""Turn SIGTERM / SIGUSR1 (Slurm's and torchrun's ways of asking a job to stop) into a flag.

The trainer checks the flag after each optimizer step (all ranks agree on it in the step's control
all-reduce), saves a checkpoint and returns, so a preempted job resumes where it stopped. Later signals
are only recorded: torchrun's agent may forward one signal twice, and a second signal must not kill a
rank in the middle of the checkpoint it is writing (SIGKILL or Ctrl-C still end a run at once).
"""

from __future__ import annotations

import contextlib
import signal


class StopFlag:
    def __init__(self):
        self.signal_name: str | None = None
        self.count = 0

    def __call__(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGUSR1)):
    flag = StopFlag()
    previous = {}

    def handler(signum, frame):
        flag.signal_name = flag.signal_name or signal.Signals(signum).name
        flag.count += 1

    for sig in signals:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
