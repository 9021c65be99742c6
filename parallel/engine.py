"""The engine contract: how one optimizer step runs on a layout, and what the trainer may call.

An engine receives the model and the step as objects (``StepFunction``; the pipeline engine a
``pipeline.StageStep``) and never reads their internals. The trainer sees only ``Engine``:
``train_step``, ``model``, and the checkpoint hooks ``parameter_states`` / ``load_parameter_states``
(per parameter: weight, AdamW moments and step, the same for every engine; ``sharded_state``).

``EngineBase.train_step`` is the one template every engine follows:

1. the global loss normalizer (counts of the whole global batch) and the learning rate;
2. ``forward_backward``: the layout-specific part, which accumulates the micro-batches' outer
   gradients and adds their losses into a statistics vector ``[loss, inner loss sums...]``;
3. ``apply_gradients``: clip on the global norm, optimizer step, zero the gradients;
4. the statistics summed over the ranks that hold parts of them.

The engines: ``LocalEngine`` (local_engine.py, one replica, optionally tensor-parallel),
``DeepSpeedEngine`` (deepspeed_engine.py, data parallelism with ZeRO 0-3) and
``PipelineEngine`` (pipeline.py, stages on torch.distributed.pipelining);
``pretrain.factory.build_engine`` picks one for a layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from data_pipeline.masking import MaskedBatch
from parallel.collectives import LossNormalizer, global_normalizer, grad_norm_and_clip, group_size, sum_over
from parallel.sharded_state import ParameterState


# -- what engines are given -------------------------------------------------------------------
class StepOutput(Protocol):
    loss: torch.Tensor  # the micro-batch's share of the global-batch loss, attached to the base weights
    inner_loss_sums: list[torch.Tensor]  # per inner step: sum over sequences of their inner loss (detached)


class EvalFunction(Protocol):
    """A validation micro-batch's ``[loss, adapted loss]`` shares (``pretrain.evaluation.Evaluator``)."""

    def __call__(self, batch: MaskedBatch, normalizer: LossNormalizer, prompt: MaskedBatch | None) -> torch.Tensor: ...


class StepFunction(Protocol):
    """One micro-batch's loss (the bi-level step of ``pretrain.bilevel``); the engine runs the backward."""

    num_inner_steps: int  # inner steps it reports (0 with memory off)

    def __call__(self, batch: MaskedBatch, normalizer: LossNormalizer, step: int) -> StepOutput: ...


@dataclass(frozen=True)
class EngineOptions:
    """What an engine needs to know of the run (built from the run config by ``pretrain.factory``)."""

    global_batch_size: int
    micro_batch_size: int
    grad_clip: float  # global-norm clip of the outer gradient; 0 = off
    statistics_size: int  # 1 + the configured inner steps, whether memory is on or off (same bytes either way)
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

    def host(self) -> "HostStats":
        values = torch.cat([self.loss.reshape(1).double(), self.grad_norm.reshape(1).double().to(self.loss.device),
                            self.inner_losses.double()]).tolist()
        return HostStats(values[0], values[2:], values[1])


@dataclass
class HostStats:
    loss: float
    inner_losses: list[float]
    grad_norm: float


# -- what the trainer may call ----------------------------------------------------------------
class Engine(Protocol):
    model: torch.nn.Module  # this rank's part of the model

    def train_step(self, micro_batches: Sequence[MaskedBatch], step: int, lr: float) -> StepStats: ...

    def parameter_states(self, values: bool = True) -> dict[str, ParameterState]:
        """This rank's part of every parameter's training state, by logical name (collective under ZeRO);
        ``values=False`` may skip reading the values (a template for a load)."""

    def load_parameter_states(self, states: dict[str, ParameterState]) -> None:
        """Set weights and optimizer state from ``states`` (shaped as ``parameter_states`` gives them)."""

    def evaluate(self, batches: Sequence[MaskedBatch], prompts: Sequence[MaskedBatch] | None) -> torch.Tensor:
        """Held-out ``[loss, adapted loss]`` of this data rank's validation micro-batches, summed over the
        data ranks (collective); each loss divided by the maskable tokens of all ranks' batches."""


# -- the optimizer, by composition ----------------------------------------------------------------
class OuterOptimizer:
    """A torch optimizer over this rank's base weights, with the learning rate set per step and the
    gradient clipped on the norm of the whole model (tensor shards and pipeline stages counted once).

    ``reduce_group``: sum the gradients over it first (plain data parallelism under pipeline stages).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float, tensor_group, pipeline_group=None,
                 reduce_group=None):
        self.optimizer = optimizer
        self.max_norm = max_norm
        self.tensor_group = tensor_group
        self.pipeline_group = pipeline_group
        self.reduce_group = reduce_group
        self.norm_listener = None  # told the global gradient norm before each step (the step guard)

    def set_learning_rate(self, lr: float) -> None:
        set_learning_rate(self.optimizer, lr)

    def apply(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Reduce, clip, step and zero the gradients of ``params``; returns the gradient norm before clipping."""
        params = [p for p in params if p.grad is not None]
        if self.reduce_group is not None:
            all_reduce_gradients(params, self.reduce_group)
        grad_norm = grad_norm_and_clip(params, self.max_norm, self.tensor_group, self.pipeline_group)
        if self.norm_listener is not None:
            self.norm_listener(grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def parameter_state(self, param: torch.nn.Parameter) -> ParameterState:
        return adam_parameter_state(self.optimizer, param)

    def load_parameter_state(self, param: torch.nn.Parameter, state: ParameterState) -> None:
        load_adam_parameter_state(self.optimizer, param, state)


def adam_parameter_state(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> ParameterState:
    """A parameter of a torch AdamW: its weight (shared with it) and its state (zeros before the first step)."""
    state = optimizer.state.get(param, {})
    zeros = torch.zeros_like(param, memory_format=torch.contiguous_format)
    return ParameterState(param.detach(), state.get("exp_avg", zeros), state.get("exp_avg_sq", zeros.clone()),
                          state.get("step", torch.zeros((), dtype=torch.float32)))


def load_adam_parameter_state(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter,
                              state: ParameterState) -> None:
    with torch.no_grad():
        if state.weight.data_ptr() != param.data_ptr():
            param.copy_(state.weight)
    optimizer.state[param] = {"step": state.step.detach().to(torch.float32).clone(),
                              "exp_avg": state.exp_avg.to(param.dtype).contiguous(),
                              "exp_avg_sq": state.exp_avg_sq.to(param.dtype).contiguous()}


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def all_reduce_gradients(params: list[torch.nn.Parameter], group) -> None:
    """Sum the gradients over ``group`` in one flat all-reduce (the losses are global-batch shares)."""
    if group_size(group) == 1:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    sum_over(flat, group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# -- the template ------------------------------------------------------------------------------
class EngineBase:
    """The shared ``train_step``; subclasses supply ``forward_backward`` and ``apply_gradients``."""

    def __init__(self, model: torch.nn.Module, options: EngineOptions, topology, num_inner_steps: int):
        self.model = model
        self.options = options
        self.topology = topology
        self.num_inner_steps = num_inner_steps
        self.optimizer: OuterOptimizer | None = None  # set by the engines that use one
        self.evaluator: EvalFunction | None = None  # set by whoever builds the engine (evaluation only)
        self.guard = None  # a ``parallel.step_guard.StepGuard`` around the optimizer's step, when asked for
        # Statistics live on the ranks that computed them; these groups add them up (in order).
        self.statistics_groups = [topology.data_parallel_group]

    def train_step(self, micro_batches: Sequence[MaskedBatch], step: int, lr: float) -> StepStats:
        topology = self.topology
        normalizer = global_normalizer(list(micro_batches), topology.data_parallel_group, topology.device)
        self.set_learning_rate(lr)
        sums = torch.zeros(self.options.statistics_size, dtype=torch.float64, device=topology.device)
        if self.guard is not None:
            self.guard.begin(sums)
        self.forward_backward(micro_batches, normalizer, step, sums)
        grad_norm = self.apply_gradients()
        for group in self.statistics_groups:
            sum_over(sums, group)
        return StepStats(sums[0], sums[1:1 + self.num_inner_steps] / normalizer.num_sequences, grad_norm)

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


def add_output(sums: torch.Tensor, output: StepOutput) -> None:
    """Add one micro-batch's loss and inner loss sums into ``sums``."""
    sums[0] += output.loss.detach().double()
    if output.inner_loss_sums:
        sums[1:1 + len(output.inner_loss_sums)] += torch.stack(output.inner_loss_sums).double()
