"""Data parallelism with DeepSpeed ZeRO (stages 0-3) around the bi-level step.

DeepSpeed wraps ``BilevelModule``, whose forward is the whole fused step: the inner loop's
``torch.autograd.grad`` calls happen inside that forward on the fast weights only, and the
engine sees one returned tensor, the outer loss, whose ``engine.backward`` is the only
backward it hooks. So the data-parallel traffic of a step is the outer gradient reduction of
plain MDLM and nothing else (DESIGN.md sections 5 and 6).

Loss scaling: every micro-batch's loss is already its share of the *global* batch loss, so
DeepSpeed's division by the accumulation steps is turned off and its averaging over data
ranks is undone by scaling the loss by the data-parallel size.
"""

from __future__ import annotations

import logging
import os

import torch

from parallel.collectives import gather_full_state, sum_over
from parallel.engine import StepStats, add_result, begin_step
from pretrain.megatron_imports import parallel_state
from pretrain.optim import build_optimizer


class MegatronMPU:
    """The Megatron-LM ``mpu`` interface DeepSpeed expects, over megatron-core's parallel_state."""

    def get_model_parallel_world_size(self):
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_data_parallel_world_size(self):
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_rank(self):
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()

    # newer DeepSpeed releases ask for these names too
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_group = get_model_parallel_group


class BilevelModule(torch.nn.Module):
    """The model plus its bi-level step as one module: ``forward(batch, normalizer, step)`` -> loss."""

    def __init__(self, model: torch.nn.Module, step_fn, seed: int, autocast):
        super().__init__()
        self.model = model
        self.step_fn = step_fn
        self.seed = seed
        self.autocast = autocast
        self.last_result = None
        self.record_fast_weights = False  # tests read the inner loop's fast weights

    def forward(self, batch, normalizer, step: int) -> torch.Tensor:
        with self.autocast():
            self.last_result = self.step_fn(batch, normalizer, step=step, seed=self.seed,
                                            record_fast_weights=self.record_fast_weights)
        return self.last_result.loss


def deepspeed_config(cfg, data_parallel_size: int) -> dict:
    accumulation = cfg.train.global_batch_size // (cfg.train.micro_batch_size * data_parallel_size)
    zero = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage == 3:
        # Gather every parameter for each use: the step calls the same layers in several passes.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0})
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.train.global_batch_size,
        "zero_optimization": zero,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    def __init__(self, model, step_fn, cfg, topology, autocast):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if topology.device.type == "cuda" else "cpu")
        os.environ.setdefault("LOCAL_RANK", str(topology.local_rank))  # DeepSpeed insists, even alone
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        import deepspeed

        self.cfg = cfg
        self.topology = topology
        self.module = BilevelModule(model, step_fn, cfg.train.seed, autocast)
        optimizer = build_optimizer(model, cfg.optim)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.module, optimizer=optimizer, config=deepspeed_config(cfg, topology.data_parallel_size),
            mpu=MegatronMPU(), dist_init_required=False,
        )

    @property
    def model(self):
        return self.module.model

    def train_step(self, micro_batches, step: int, lr: float) -> StepStats:
        topology = self.topology
        normalizer, stats = begin_step(micro_batches, self.optimizer, lr, self.cfg, topology)
        for micro_batch in micro_batches:
            loss = self.engine(micro_batch, normalizer, step)
            self.engine.backward(loss * topology.data_parallel_size, scale_wrt_gas=False)
            self.engine.step()
            add_result(stats, self.module.last_result)
        sum_over(stats, topology.data_parallel_group)
        grad_norm = self.engine.get_global_grad_norm()
        return StepStats.from_sums(stats, normalizer, self.cfg.memory.enabled,
                                   float(grad_norm) if grad_norm is not None else float("nan"))

    def full_state(self) -> dict[str, torch.Tensor]:
        if self.cfg.parallel.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                return gather_full_state(self.model, self.topology.tensor_parallel_group, None)
        return gather_full_state(self.model, self.topology.tensor_parallel_group, None)

    def save_optimizer(self, folder) -> None:
        self.engine.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load_optimizer(self, folder) -> None:
        self.engine.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)
