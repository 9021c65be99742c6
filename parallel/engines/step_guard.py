"""Bad steps never reach the weights: one decision per step, taken by every rank together, right before the
optimizer would change anything.

The guard wraps the ``step`` of the torch optimizer that each engine finally calls (directly, or from
inside DeepSpeed's ZeRO wrapper, which may call it once per parameter group: the decision is taken once
per training step and reused). Each rank contributes whether its loss share and the gradients are
finite (by the global gradient norm the local and pipeline engines already compute, or else by a norm of
the gradients its optimizer holds), and its share of the global loss; one all-reduce on the CPU control group
gives every rank the same verdict. A rejected step does not call the optimizer: weights, AdamW moments
and step count are untouched, and the caller does not advance its learning-rate schedule.

DeepSpeed's ZeRO 1-3 optimizers skip a step with a non-finite global gradient norm by themselves (their
norm is reduced over the data ranks, so all ranks skip together) and then never call the wrapped step;
``finish`` reports such a step as rejected without a collective.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Verdict:
    accepted: bool
    reason: str = ""  # why a step was rejected
    loss: float = float("nan")  # the global loss as the guard saw it (nan when DeepSpeed decided)


class StepGuard:
    """``begin(sums)`` before a step (``sums[0]``: this rank's loss share as the engine accumulates it),
    ``finish()`` after it. ``counts_loss``: whether this rank's share is part of the global loss (one
    tensor-parallel rank of each replica; pipeline stages without the head hold 0)."""

    def __init__(self, group, world_size: int, counts_loss: bool, spike_zscore: float = 0.0, window: int = 100,
                 *, min_history: int):
        self.group, self.world_size, self.counts_loss = group, world_size, counts_loss
        self.spike_zscore = spike_zscore
        self.min_history = min_history  # accepted losses seen before the spike test judges
        self.history: deque[float] = deque(maxlen=window)
        self.sums: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None  # the global gradient norm, when the engine computed one
        self.verdict: Verdict | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def wrap(self, optimizer: torch.optim.Optimizer) -> None:
        """Route ``optimizer.step`` through the guard (an instance attribute: the class is untouched)."""
        real_step = optimizer.step
        self.optimizer = optimizer

        def guarded_step(*args, **kwargs):
            if self.verdict is None:
                self.verdict = self._decide()
            if self.verdict.accepted:
                return real_step(*args, **kwargs)
            return None

        optimizer.step = guarded_step

    def begin(self, sums: torch.Tensor) -> None:
        self.sums, self.norm, self.verdict = sums, None, None

    def note_norm(self, norm: torch.Tensor) -> None:
        """The step's global gradient norm (over tensor and pipeline ranks, after the data-parallel
        reduction): non-finite exactly when some gradient is, so the gradients need no pass of their own."""
        self.norm = norm

    def finish(self) -> Verdict:
        verdict = self.verdict or Verdict(False, "non-finite gradient norm (DeepSpeed skipped the update)")
        if verdict.accepted and math.isfinite(verdict.loss):
            self.history.append(verdict.loss)
        self.sums = None
        return verdict

    # -- the decision ----------------------------------------------------------------------------
    def _local_health(self) -> torch.Tensor:
        """[gradients or loss non-finite here, this rank's share of the global loss] (float64, on the CPU)."""
        loss = self.sums[0] if self.sums is not None else torch.zeros((), dtype=torch.float64)
        finite = torch.isfinite(loss)
        if self.norm is not None:
            finite = finite & torch.isfinite(self.norm.to(loss.device))
        else:  # DeepSpeed: the gradients (or this rank's partition of them) the optimizer is about to use
            grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                finite = finite & torch.isfinite(torch.stack([n.to(loss.device, torch.float64) for n in norms]).sum())
        share = loss if self.counts_loss else torch.zeros_like(loss)
        return torch.stack([(~finite).double(), torch.nan_to_num(share.double(), nan=0.0, posinf=0.0)]).cpu()

    def _decide(self) -> Verdict:
        values = self._local_health()
        if self.world_size > 1:
            dist.all_reduce(values, group=self.group)
        bad, loss = values.tolist()  # on the host already: the step's one device read was the .cpu() above
        bad = bad > 0
        if bad:
            return Verdict(False, "non-finite loss or gradient", float("nan"))
        if self.spike_zscore > 0 and len(self.history) >= self.min_history:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (len(self.history) - 1))
            if std > 0 and (loss - mean) / std > self.spike_zscore:
                return Verdict(False, f"loss spike: {loss:.4f} is {(loss - mean) / std:.1f} standard deviations "
                                      f"above the mean {mean:.4f} of the last {len(self.history)} steps", loss)
        return Verdict(True, "", loss)
