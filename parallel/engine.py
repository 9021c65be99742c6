"""Training engines: how one optimizer step runs on a layout. The trainer picks one:

- ``LocalEngine``: one model replica (optionally split by tensor parallelism), no data
  parallelism: backward per micro-batch, tensor-parallel-aware clipping, AdamW;
- ``DeepSpeedEngine`` (deepspeed_engine.py): data parallelism, ZeRO 0-3, with or without TP;
- ``PipelineEngine`` (pipeline.py): pipeline stages on torch.distributed.pipelining.

Each returns the same ``StepStats`` (global-batch loss, inner losses, gradient norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from parallel.collectives import gather_full_state, global_normalizer, grad_norm_and_clip, sum_over
from pretrain.optim import build_optimizer, set_learning_rate


@dataclass
class StepStats:
    loss: float
    inner_losses: list[float]
    grad_norm: float

    @staticmethod
    def from_sums(sums: torch.Tensor, normalizer, memory_enabled: bool, grad_norm: float) -> "StepStats":
        """``sums`` = [global loss, inner loss sums...] over the global batch (already all-reduced)."""
        inner = (sums[1:] / normalizer.num_sequences).tolist() if memory_enabled else []
        return StepStats(float(sums[0]), inner, grad_norm)


def begin_step(micro_batches, optimizer, lr: float, cfg, topology):
    """What every engine does first: the global normaliser, the learning rate, and the statistics
    vector [loss, inner loss sums...] (fixed size, so the same bytes cross ranks with memory on or off)."""
    normalizer = global_normalizer(micro_batches, topology.data_parallel_group, topology.device)
    set_learning_rate(optimizer, lr)
    stats = torch.zeros(1 + cfg.memory.num_inner_steps, dtype=torch.float64, device=topology.device)
    return normalizer, stats


def add_result(stats: torch.Tensor, result) -> None:
    stats[0] += result.loss.detach().double()
    if result.inner_loss_sums:
        stats[1:1 + len(result.inner_loss_sums)] += torch.stack(result.inner_loss_sums).double()


class LocalEngine:
    def __init__(self, model, step_fn, cfg, topology, autocast):
        self.model = model
        self.step_fn = step_fn
        self.cfg = cfg
        self.topology = topology
        self.autocast = autocast
        self.optimizer = build_optimizer(model, cfg.optim)

    def train_step(self, micro_batches, step: int, lr: float) -> StepStats:
        topology = self.topology
        normalizer, stats = begin_step(micro_batches, self.optimizer, lr, self.cfg, topology)
        for micro_batch in micro_batches:
            with self.autocast():
                result = self.step_fn(micro_batch, normalizer, step=step, seed=self.cfg.train.seed)
            result.loss.backward()
            add_result(stats, result)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = grad_norm_and_clip(params, self.cfg.optim.grad_clip, topology.tensor_parallel_group, None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sum_over(stats, topology.data_parallel_group)
        return StepStats.from_sums(stats, normalizer, self.cfg.memory.enabled, grad_norm)

    def full_state(self) -> dict[str, torch.Tensor]:
        return gather_full_state(self.model, self.topology.tensor_parallel_group, None)

    def save_optimizer(self, folder: Path) -> None:
        torch.save(self.optimizer.state_dict(), Path(folder) / f"optimizer_rank{self.topology.rank:05d}.pt")

    def load_optimizer(self, folder: Path) -> None:
        state = torch.load(Path(folder) / f"optimizer_rank{self.topology.rank:05d}.pt", map_location="cpu",
                           weights_only=False)
        self.optimizer.load_state_dict(state)


def build_engine(model, step_fn, cfg, topology, autocast):
    if topology.pipeline_parallel_size > 1:
        from parallel.pipeline import PipelineEngine

        return PipelineEngine(model, step_fn, cfg, topology, autocast)
    if topology.data_parallel_size > 1 or cfg.parallel.zero_stage > 0:
        from parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, step_fn, cfg, topology, autocast)
    return LocalEngine(model, step_fn, cfg, topology, autocast)
