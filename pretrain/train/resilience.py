"""What a long run on a shared cluster needs besides the step: the bad-step policy, the hang watchdog and
the run's state markers for the batch script.

- ``BadSteps``: counts the steps the step guard (``parallel.engines.step_guard``) rejected; ``max_in_row`` rejected
  steps in a row ask for a rollback to the newest good checkpoint (the data goes on: the batches are
  consumed), more than ``budget`` in all end the run with ``TrainingStopped``.
- ``Watchdog``: ``faulthandler.dump_traceback_later``, re-armed whenever the loop makes progress; when it
  fires, every thread's stack goes to stderr and the process exits with status 1 (each rank has its
  own, so a rank stuck in a collective and the rank it waits for both report).
- Markers in the run directory: ``DONE`` once the last step's checkpoint is written (a job requeued or
  signalled after that must not train again), ``REQUEUE`` when the run stopped early on a signal (the
  batch script requeues the job; torchrun's agent itself exits 0 in that case).
"""

from __future__ import annotations

import faulthandler
import json
import sys
import time
from pathlib import Path

from pretrain.train.state import TrainState

DONE, REQUEUE = "DONE", "REQUEUE"
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on a signal with a checkpoint saved; run again to resume


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. the bad-step budget is spent); the message says why and what to do."""


class BadSteps:
    """The bad-step policy over a ``TrainState``, which owns the count of skipped updates (it is
    checkpointed); the run of rejections in a row is this object's own (it starts at 0 after a resume)."""

    def __init__(self, max_in_row: int, budget: int, state: TrainState):
        self.max_in_row, self.budget, self.state = max_in_row, budget, state
        self.in_row = 0

    @property
    def total(self) -> int:
        return self.state.bad_steps

    def accepted(self) -> None:
        self.in_row = 0

    def rejected(self, step: int, reason: str) -> bool:
        """Count a rejected step; True when it is time to roll back."""
        self.in_row += 1
        self.state.bad_steps += 1
        if self.total > self.budget:
            raise TrainingStopped(
                f"step {step}: {self.total} steps skipped in all (latest: {reason}), more than --guard.max_bad_steps "
                f"{self.budget}; the newest good checkpoint is intact: lower the learning rate or inspect the data "
                "around this step, then rerun to resume")
        return self.in_row >= self.max_in_row


class Watchdog:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def progress(self) -> None:
        if self.timeout_s > 0:
            faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=sys.stderr)

    def stop(self) -> None:
        if self.timeout_s > 0:
            faulthandler.cancel_dump_traceback_later()


def clear_markers(out_dir: Path) -> None:
    for name in (DONE, REQUEUE):
        (out_dir / name).unlink(missing_ok=True)


def write_marker(out_dir: Path, name: str, step: int, **extra) -> None:
    path = out_dir / name
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}) + "\n")
    temporary.replace(path)
