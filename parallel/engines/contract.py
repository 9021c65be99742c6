"""The engine contract: how one optimizer step runs on a layout, and what the trainer may call.

An engine receives the model and the step as objects (``StepFunction``; the pipeline engine a
``pipeline.StageStep``) and never reads their internals. The trainer sees only ``Engine``:
``train_step``, ``model``, and the checkpoint hooks ``parameter_states`` / ``load_parameter_states``
(per parameter: weight, AdamW moments and step, the same for every engine; ``sharded_state``).

``EngineBase.train_step`` (``parallel.engines.base``) is the one template every engine follows:

1. the global loss normalizer (counts of the whole global batch) and the learning rate;
2. ``forward_backward``: the layout-specific part, which accumulates the micro-batches' outer
   gradients and adds their losses into a statistics vector ``[loss, inner loss sums...]``;
3. ``apply_gradients``: clip on the global norm, optimizer step, zero the gradients;
4. the statistics summed over the ranks that hold parts of them.

The engines: ``LocalEngine`` (``local``, one replica, optionally tensor-parallel),
``DeepSpeedEngine`` (``deepspeed_zero``, data parallelism with ZeRO 0-3) and
``PipelineEngine`` (``pipeline``, stages on torch.distributed.pipelining); the optimizer they share is
``parallel.engines.outer_optimizer.OuterOptimizer``;
``pretrain.train.factory.build_engine`` picks one for a layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from data_pipeline.masking import MaskedBatch
from parallel.checkpoint.sharded_state import ParameterState
from parallel.collectives import LossNormalizer
from parallel.engines.step_guard import Verdict


# -- what engines are given -------------------------------------------------------------------
class StepOutput(Protocol):
    loss: torch.Tensor  # the micro-batch's share of the global objective, attached: what is back-propagated
    inner_loss_sums: list[torch.Tensor]  # per inner step: sum over sequences of their inner loss (detached)
    logged_loss: torch.Tensor | None  # the share of the loss to report, when it is not ``loss`` itself
    loss_by_source: torch.Tensor | None  # [S] a mixture's per-source shares of the reported loss, or None


class EvalFunction(Protocol):
    """A validation micro-batch's ``[loss, adapted loss]`` shares (``pretrain.eval.heldout.Evaluator``)."""

    def __call__(self, batch: MaskedBatch, normalizer: LossNormalizer, prompt: MaskedBatch | None) -> torch.Tensor: ...


class StepFunction(Protocol):
    """One micro-batch's loss (the bi-level step of ``pretrain.memdlm.bilevel``); the engine runs the backward."""

    num_inner_steps: int  # inner steps it reports (0 with memory off)

    def __call__(self, batch: MaskedBatch, normalizer: LossNormalizer, step: int) -> StepOutput: ...


@dataclass(frozen=True)
class EngineOptions:
    """What an engine needs to know of the run (built from the run config by ``pretrain.train.factory``)."""

    global_batch_size: int
    micro_batch_size: int
    grad_clip: float  # global-norm clip of the outer gradient; 0 = off
    statistics_size: int  # 1 + the configured inner steps, whether memory is on or off (same bytes either way)
    num_sources: int = 1  # a mixture's sources: each one's loss is reported too (after the statistics above)
    seed: int = 0
    zero_stage: int = 0
    pipeline_schedule: str = "1f1b"
    seq_len: int = 0  # the pipeline's activation shape: [micro_batch_size, seq_len, hidden_size]
    hidden_size: int = 0


@dataclass
class StepStats:
    """One step's statistics, left on the device (reading them is a host synchronisation: the trainer
    does that once per logging interval, ``host()``)."""

    loss: torch.Tensor  # 0-d: the outer MDLM loss of the global batch
    inner_losses: torch.Tensor  # [K]: each inner step's loss, mean over sequences (empty with memory off)
    grad_norm: torch.Tensor  # 0-d: before clipping
    verdict: Verdict | None = None  # the step guard's decision (on the host already), when a guard runs
    loss_by_source: torch.Tensor | None = None  # [S]: each source's own MDLM loss (NaN: absent from the step)

    def host(self) -> "HostStats":
        by_source = self.loss_by_source if self.loss_by_source is not None else self.loss.new_zeros(0)
        values = torch.cat([self.loss.reshape(1).double(), self.grad_norm.reshape(1).double().to(self.loss.device),
                            self.inner_losses.double(), by_source.double()]).tolist()
        inner_end = 2 + len(self.inner_losses)
        return HostStats(values[0], values[2:inner_end], values[1], values[inner_end:])


@dataclass
class HostStats:
    loss: float
    inner_losses: list[float]
    grad_norm: float
    loss_by_source: list[float] = dataclasses.field(default_factory=list)


# -- what the trainer may call ----------------------------------------------------------------
class Engine(Protocol):
    model: torch.nn.Module  # this rank's part of the model

    def train_step(self, micro_batches: Sequence[MaskedBatch], step: int, lr: float) -> StepStats:
        """One optimizer step over the global batch's micro-batches of this rank; whether the update was
        applied is ``StepStats.verdict`` (``None`` without a step guard: always applied)."""

    def parameter_states(self, values: bool = True) -> dict[str, ParameterState]:
        """This rank's part of every parameter's training state, by logical name (collective under ZeRO);
        ``values=False`` may skip reading the values (a template for a load)."""

    def load_parameter_states(self, states: dict[str, ParameterState]) -> None:
        """Set weights and optimizer state from ``states`` (shaped as ``parameter_states`` gives them)."""

    def evaluate(self, batches: Sequence[MaskedBatch], prompts: Sequence[MaskedBatch] | None) -> torch.Tensor:
        """Held-out ``[loss, adapted loss]`` of this data rank's validation micro-batches, summed over the
        data ranks (collective); each loss divided by the maskable tokens of all ranks' batches."""
