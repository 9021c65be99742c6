"""The optimizer of the base weights, by composition: a torch AdamW with the learning rate set per step, the
gradient clipped on the norm of the whole model, and (under pipeline stages) the data-parallel all-reduce
of the gradients; and each parameter's AdamW state as ``ParameterState`` for checkpoints."""

from __future__ import annotations

from typing import Callable

import torch

from parallel.checkpoint.sharded_state import ParameterState
from parallel.collectives import grad_norm_and_clip, group_size, sum_over
from parallel.experts import split_over_experts


class OuterOptimizer:
    """A torch optimizer over this rank's base weights, with the learning rate set per step and the
    gradient clipped on the norm of the whole model (tensor shards and pipeline stages counted once).

    ``reduce_group``: sum the gradients over it first (plain data parallelism under pipeline stages).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float, tensor_group, pipeline_group=None,
                 reduce_group=None, norm_listener: Callable[[torch.Tensor], None] | None = None,
                 expert_group=None, expert_reduce_group=None):
        self.optimizer = optimizer
        self.max_norm = max_norm
        self.tensor_group = tensor_group
        self.pipeline_group = pipeline_group
        self.reduce_group = reduce_group
        # Experts split over an expert-parallel group: their gradients are summed over the ranks that hold the
        # same experts (``expert_reduce_group``), their squares over ``expert_group`` for the norm.
        self.expert_group, self.expert_reduce_group = expert_group, expert_reduce_group
        self.norm_listener = norm_listener  # told the global gradient norm before each step (the step guard)

    def set_learning_rate(self, lr: float) -> None:
        set_learning_rate(self.optimizer, lr)

    def apply(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Reduce, clip, step and zero the gradients of ``params``; returns the gradient norm before clipping."""
        params = [p for p in params if p.grad is not None]
        if self.reduce_group is not None:
            experts = [p for p in params if split_over_experts(p)]
            all_reduce_gradients([p for p in params if not split_over_experts(p)], self.reduce_group)
            all_reduce_gradients(experts, self.expert_reduce_group if experts else None)
        grad_norm = grad_norm_and_clip(params, self.max_norm, self.tensor_group, self.pipeline_group,
                                       self.expert_group)
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
