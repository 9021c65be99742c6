"""``EngineBase``: the ``train_step`` template every engine follows (see ``parallel.engines.contract``)."""

from __future__ import annotations

from typing import Sequence

import torch

from data_pipeline.masking import MaskedBatch
from parallel.checkpoint.sharded_state import ParameterState
from parallel.collectives import LossNormalizer, global_normalizer, sum_over
from parallel.engines.contract import EngineOptions, EvalFunction, StepOutput, StepStats
from parallel.engines.outer_optimizer import OuterOptimizer
from parallel.engines.step_guard import StepGuard


class EngineBase:
    """The shared ``train_step``; subclasses supply ``forward_backward`` and ``apply_gradients``."""

    def __init__(self, model: torch.nn.Module, options: EngineOptions, topology, num_inner_steps: int,
                 evaluator: EvalFunction | None = None, guard: StepGuard | None = None):
        self.model = model
        self.options = options
        self.topology = topology
        self.num_inner_steps = num_inner_steps
        self.optimizer: OuterOptimizer | None = None  # set by the engines that use one
        self.evaluator = evaluator  # what ``evaluate`` runs on each validation micro-batch
        # Around the optimizer's step (already wrapped by whoever built it); its verdict goes into StepStats.
        self.guard = guard
        # Statistics live on the ranks that computed them; these groups add them up (in order): the data ranks'
        # micro-batches, and each sequence-parallel rank's share of its sequences.
        self.statistics_groups = [topology.data_parallel_group]
        if topology.sequence_parallel_size > 1:
            self.statistics_groups.append(topology.sequence_parallel_group)

    def train_step(self, micro_batches: Sequence[MaskedBatch], step: int, lr: float) -> StepStats:
        topology = self.topology
        sources = self.options.num_sources
        normalizer = global_normalizer(list(micro_batches), topology.data_parallel_group, topology.device, sources)
        self.set_learning_rate(lr)
        size = self.options.statistics_size + (sources if sources > 1 else 0)
        sums = torch.zeros(size, dtype=torch.float64, device=topology.device)
        if self.guard is not None:
            self.guard.begin(sums)
        self.forward_backward(micro_batches, normalizer, step, sums)
        grad_norm = self.apply_gradients()
        for group in self.statistics_groups:
            sum_over(sums, group)
        verdict = self.guard.finish() if self.guard is not None else None
        return StepStats(sums[0], sums[1:1 + self.num_inner_steps] / normalizer.num_sequences, grad_norm, verdict,
                         sums[self.options.statistics_size:] if sources > 1 else None)

    def evaluate(self, batches, prompts) -> torch.Tensor:
        topology = self.topology
        normalizer = global_normalizer(list(batches), topology.data_parallel_group, topology.device)
        sums = torch.zeros(2, dtype=torch.float64, device=topology.device)
        for batch, prompt in zip(batches, prompts or [None] * len(batches)):
            sums += self.evaluate_micro_batch(batch, normalizer, prompt)
        for group in self.statistics_groups:
            sum_over(sums, group)
        return sums

    def evaluate_micro_batch(self, batch, normalizer, prompt) -> torch.Tensor:
        if self.evaluator is None:
            raise RuntimeError("this engine was built without an evaluator; pass evaluator= to evaluate")
        return self.evaluator(batch, normalizer, prompt)

    # -- what differs by layout -------------------------------------------------------------------
    def forward_backward(self, micro_batches, normalizer: LossNormalizer, step: int, sums: torch.Tensor) -> None:
        raise NotImplementedError

    # An ``OuterOptimizer`` in ``self.optimizer`` serves these; DeepSpeed's engine replaces them.
    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.set_learning_rate(lr)

    def apply_gradients(self) -> torch.Tensor:
        return self.optimizer.apply(list(self.model.parameters()))

    def parameter_states(self, values: bool = True) -> dict[str, ParameterState]:
        return {name: self.optimizer.parameter_state(p) for name, p in self.model.named_parameters()}

    def load_parameter_states(self, states: dict[str, ParameterState]) -> None:
        for name, param in self.model.named_parameters():
            self.optimizer.load_parameter_state(param, states[name])


def add_output(sums: torch.Tensor, output: StepOutput, options: EngineOptions) -> None:
    """Add one micro-batch's loss, inner loss sums and (a mixture's) per-source losses into ``sums``."""
    logged = getattr(output, "logged_loss", None)
    sums[0] += (logged if logged is not None else output.loss).detach().double()
    if output.inner_loss_sums:
        sums[1:1 + len(output.inner_loss_sums)] += torch.stack(output.inner_loss_sums).double()
    by_source = getattr(output, "loss_by_source", None)
    if by_source is not None:
        sums[options.statistics_size:] += by_source.double()
