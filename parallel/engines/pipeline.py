"""Pipeline parallelism for the bi-level step on ``torch.distributed.pipelining``.

Per optimizer step, with M micro-batches per data-parallel rank (docs/DESIGN.md section 5):

1. Inner sweeps (forward only): for each micro-batch, each state the inner loop steps on before the
   anchor (pmc's pre-anchor states; a distillation teacher's input before its step), the first stage takes
   the ids, every stage runs its layers under ``no_grad`` and sends the activations on; the last stage,
   which holds every fast-weight layer, takes the inner SGD step (or keeps the teacher's outputs)
   locally. The result is kept in one slot per micro-batch.
2. Anchor pass: a 1F1B (or GPipe) schedule over the anchor states. The last stage's forward
   takes the last inner step (its ``torch.autograd.grad`` stays inside that forward) and
   returns the micro-batch's share of the global MDLM loss.
3. Gradients: summed over micro-batches (the schedule's own averaging is off), all-reduced
   over the data-parallel group when there is one (ZeRO 0), clipped on the global norm
   (tensor shards and stages counted once each), then AdamW (``OuterOptimizer``).

What runs on a stage comes from a ``StageStep`` (``pretrain.memdlm.pipeline_stage`` implements it with
the step's own stages). Every stage reads what it needs of a micro-batch (ids, masks) from the
batch that was broadcast to the whole model replica, never from pipeline messages, so only
activations and their gradients travel between stages; the schedule tells each stage's forward
which micro-batch it is running.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from data_pipeline.masking import MaskedBatch
from parallel.collectives import LossNormalizer
from parallel.engines.base import EngineBase
from parallel.engines.contract import EngineOptions
from parallel.engines.outer_optimizer import OuterOptimizer
from parallel.engines.step_guard import StepGuard


class StageStep(Protocol):
    """One pipeline stage's part of the bi-level step. The engine knows a step's inner loop only as a list of
    forward-only sweeps (opaque items) whose last-stage work updates an opaque per-micro-batch state."""

    is_first: bool
    is_last: bool
    num_inner_steps: int  # inner steps a step reports (0 with memory off)
    activation_dtype: torch.dtype

    def sweeps(self, step: int) -> list:
        """The forward-only sweeps of optimizer step ``step`` before the anchor pass, in order ([] without
        memory); the same on every stage."""

    def sweep_input_ids(self, batch: MaskedBatch, sweep) -> torch.Tensor:
        """First stage: the ids a sweep starts from."""

    def anchor_input_ids(self, batch: MaskedBatch) -> torch.Tensor:
        """First stage: the noised ids of the anchor state."""

    def forward(self, x: torch.Tensor, batch: MaskedBatch) -> torch.Tensor:
        """Every stage but the last: this stage's layers on ``x`` (ids on the first stage) -> activations."""

    def initial_state(self, batch: MaskedBatch, step: int) -> Any:
        """Last stage: the micro-batch's inner-loop state before the sweeps (fast weights phi_0, or ``None``)."""

    def sweep_update(self, x, batch: MaskedBatch, sweep, state) -> tuple[int, torch.Tensor] | None:
        """Last stage: a sweep's work on ``state`` -> (statistics slot, inner loss sum) of an inner step."""

    def anchor_loss(self, x, batch: MaskedBatch, normalizer: LossNormalizer, state):
        """Last stage: (objective share, attached; its logged loss; last inner loss sum or ``None``; each
        source's logged loss share ``[S]`` for a mixture, or ``None``)."""

    def adaptation_sweeps(self) -> list:
        """Evaluation: the sweeps of inference-time adaptation on a prompt."""

    def adaptation_input_ids(self, batch: MaskedBatch, sweep) -> torch.Tensor:
        """First stage, evaluation: the ids an adaptation sweep starts from."""

    def adaptation_state(self, batch: MaskedBatch) -> Any:
        """Last stage, evaluation: the adaptation's state before its sweeps (the evaluation's seed)."""

    def adaptation_update(self, x, batch: MaskedBatch, sweep, state) -> None:
        """Last stage, evaluation: an adaptation sweep's work on ``state``."""

    def eval_loss(self, x, batch: MaskedBatch, normalizer: LossNormalizer, state) -> torch.Tensor:
        """Last stage, evaluation: the anchor's loss share with the state's fast weights held constant
        (``None``: none)."""


class _ScheduledStage(nn.Module):
    """What the schedule calls: ``forward(x, index)`` for micro-batch ``index`` of the current step."""

    def __init__(self, engine: "PipelineEngine"):
        super().__init__()
        self.engine = engine
        self.model = engine.model  # registered, so the schedule sees the stage's parameters

    def forward(self, x: torch.Tensor, index: int) -> torch.Tensor:
        engine = self.engine
        batch = engine.micro_batches[index]
        if not engine.stage.is_last:
            return engine.stage.forward(x, batch)
        objective, logged, inner_sum, by_source = engine.stage.anchor_loss(x, batch, engine.normalizer,
                                                                           engine.slots[index])
        engine.sums[0] += logged.detach().double()
        if inner_sum is not None:
            engine.sums[engine.stage.num_inner_steps] += inner_sum.detach().double()
        if by_source is not None:
            engine.sums[engine.options.statistics_size:] += by_source.double()
        return objective.reshape(1)


class PipelineEngine(EngineBase):
    def __init__(self, model, stage: StageStep, optimizer: OuterOptimizer, options: EngineOptions, topology,
                 guard: StepGuard | None = None):
        super().__init__(model, options, topology, stage.num_inner_steps, guard=guard)
        self.stage = stage
        self.optimizer = optimizer
        self.group = topology.pipeline_parallel_group
        # The losses live on the last stage: share them with the whole replica, then the data ranks.
        self.statistics_groups = [self.group, topology.data_parallel_group]
        self.stage_index = topology.pipeline_parallel_rank
        self.num_stages = topology.pipeline_parallel_size
        ranks = dist.get_process_group_ranks(self.group)
        self.previous = ranks[self.stage_index - 1] if self.stage_index > 0 else None
        self.next = ranks[self.stage_index + 1] if self.stage_index < self.num_stages - 1 else None
        self.scheduled = _ScheduledStage(self)
        self.micro_batches, self.slots, self.normalizer, self.sums = [], [], None, None
        self._built = None  # (micro-batch count, schedule)

    def forward_backward(self, micro_batches, normalizer, step, sums) -> None:
        self.micro_batches, self.normalizer, self.sums = list(micro_batches), normalizer, sums
        self.slots = [None] * len(micro_batches)
        self._inner_sweeps(step)
        self._run_schedule()

    # -- inner-loop sweeps (forward-only, before the schedule) ------------------------------------
    def _activation_shape(self, num_sequences: int | None = None):
        return (num_sequences or self.options.micro_batch_size, self.options.seq_len, self.options.hidden_size)

    def _sweep(self, batch, ids, last):
        """A forward-only pass of ``batch`` through the stages, starting from ``ids()`` on the first stage; on
        the last stage, ``last(activations)``'s result (``None`` elsewhere)."""
        stage = self.stage
        if self.previous is None:
            x = ids()
        else:
            x = torch.empty(self._activation_shape(batch.num_sequences), dtype=stage.activation_dtype,
                            device=self.topology.device)
            dist.recv(x, src=self.previous, group=self.group)
        if stage.is_last:
            return last(x)
        dist.send(stage.forward(x, batch).contiguous().to(stage.activation_dtype), dst=self.next, group=self.group)
        return None

    @torch.no_grad()
    def _inner_sweeps(self, step: int) -> None:
        """Forward-only sweeps of the inner loop's states (the last stage takes the inner steps); the last
        stage keeps each micro-batch's state for its anchor pass."""
        stage = self.stage
        sweeps = stage.sweeps(step)
        for index, batch in enumerate(self.micro_batches):
            state = stage.initial_state(batch, step) if stage.is_last else None
            for sweep in sweeps:
                result = self._sweep(batch, lambda: stage.sweep_input_ids(batch, sweep),
                                     lambda x: stage.sweep_update(x, batch, sweep, state))
                if result is not None:
                    slot, inner_sum = result
                    self.sums[1 + slot] += inner_sum.detach().double()
            self.slots[index] = state

    @torch.no_grad()
    def evaluate_micro_batch(self, batch, normalizer, prompt) -> torch.Tensor:
        """Forward-only sweeps: the adaptation's sweeps of ``prompt`` (the last stage updates its fast
        weights), then ``batch``'s anchor twice (without and with them)."""
        stage, sums = self.stage, torch.zeros(2, dtype=torch.float64, device=self.topology.device)
        adapted = None
        if prompt is not None:
            adapted = stage.adaptation_state(prompt) if stage.is_last else None
            for sweep in stage.adaptation_sweeps():
                self._sweep(prompt, lambda: stage.adaptation_input_ids(prompt, sweep),
                            lambda x: stage.adaptation_update(x, prompt, sweep, adapted))
        for slot, state in ((0, None), (1, adapted)):
            if slot == 1 and prompt is None:
                break
            loss = self._sweep(batch, lambda: stage.anchor_input_ids(batch),
                               lambda x: stage.eval_loss(x, batch, normalizer, state))
            if loss is not None:
                sums[slot] = loss.double()
        return sums

    # -- anchor pass ----------------------------------------------------------------------------
    def _schedule(self, num_micro_batches: int):
        """The stage and its schedule, built on first use (shapes and counts are fixed for a run)."""
        if self._built is not None and self._built[0] == num_micro_batches:
            return self._built[1]
        device, dtype = self.topology.device, self.stage.activation_dtype
        b, l, hidden = self._activation_shape()
        if self.previous is None:
            example_in = torch.zeros(b, l, dtype=torch.long, device=device)
        else:
            # requires_grad marks the activations whose gradient this stage sends back.
            example_in = torch.zeros(b, l, hidden, dtype=dtype, device=device, requires_grad=True)
        example_out = (torch.zeros(1, dtype=torch.float32, device=device, requires_grad=True) if self.next is None
                       else torch.zeros(b, l, hidden, dtype=dtype, device=device, requires_grad=True))
        pipeline_stage = PipelineStage(self.scheduled, self.stage_index, self.num_stages, device,
                                       input_args=(example_in,), output_args=(example_out,), group=self.group)
        schedule_cls = Schedule1F1B if self.options.pipeline_schedule == "1f1b" else ScheduleGPipe
        schedule = schedule_cls(pipeline_stage, num_micro_batches, loss_fn=_identity_loss, scale_grads=False)
        self._built = (num_micro_batches, schedule)
        return schedule

    def _run_schedule(self) -> None:
        count = len(self.micro_batches)
        schedule = self._schedule(count)
        indices = [{"index": i} for i in range(count)]
        if self.previous is None:
            inputs = [(self.stage.anchor_input_ids(mb),) for mb in self.micro_batches]
            schedule.step(arg_mbs=inputs, kwarg_mbs=indices)
        elif self.next is None:
            schedule.step(kwarg_mbs=indices, target_mbs=[None] * count)
        else:
            schedule.step(kwarg_mbs=indices)


def _identity_loss(output, target):
    return output.sum()
