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

from parallel.engine import EngineBase, EngineOptions, StepFunction, add_output, set_learning_rate
from parallel.megatron import parallel_state


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
    """The model plus its step as one module: ``forward(batch, normalizer, step)`` -> the outer loss.

    The step is a plain object, not a module, so the module's parameters are the model's."""

    def __init__(self, model: torch.nn.Module, step_fn: StepFunction):
        super().__init__()
        self.model = model
        self.step_fn = step_fn
        self.last_output = None

    def forward(self, batch, normalizer, step: int) -> torch.Tensor:
        self.last_output = self.step_fn(batch, normalizer, step)
        return self.last_output.loss


def deepspeed_config(options: EngineOptions, data_parallel_size: int) -> dict:
    accumulation = options.global_batch_size // (options.micro_batch_size * data_parallel_size)
    zero = {"stage": options.zero_stage}
    if options.zero_stage == 3:
        # Gather every parameter for each use: the step calls the same layers in several passes.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0})
    return {
        "train_micro_batch_size_per_gpu": options.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": options.global_batch_size,
        "zero_optimization": zero,
        "gradient_clipping": options.grad_clip,
        "bf16": {"enabled": options.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(EngineBase):
    """DeepSpeed owns the optimizer (given here unwrapped), the gradient reduction and the clipping."""

    def __init__(self, model, step_fn: StepFunction, optimizer: torch.optim.Optimizer, options: EngineOptions,
                 topology):
        super().__init__(model, options, topology, step_fn.num_inner_steps)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if topology.device.type == "cuda" else "cpu")
        os.environ.setdefault("LOCAL_RANK", str(topology.local_rank))  # DeepSpeed insists, even alone
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        import deepspeed

        self.module = BilevelModule(model, step_fn)
        self.engine, self.deepspeed_optimizer, _, _ = deepspeed.initialize(
            model=self.module, optimizer=optimizer, config=deepspeed_config(options, topology.data_parallel_size),
            mpu=MegatronMPU(), dist_init_required=False,
        )

    def set_learning_rate(self, lr: float) -> None:
        set_learning_rate(self.deepspeed_optimizer, lr)

    def forward_backward(self, micro_batches, normalizer, step, sums) -> None:
        # Each loss is already its share of the global batch: undo DeepSpeed's averaging over data ranks.
        for micro_batch in micro_batches:
            loss = self.engine(micro_batch, normalizer, step)
            self.engine.backward(loss * self.topology.data_parallel_size, scale_wrt_gas=False)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            add_output(sums, self.module.last_output)

    def apply_gradients(self) -> float:
        grad_norm = self.engine.get_global_grad_norm()
        return float(grad_norm) if grad_norm is not None else float("nan")

    def gathered_parameters(self):
        if self.options.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.model.parameters()))
        return super().gathered_parameters()

    def save_optimizer(self, folder) -> None:
        self.engine.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load_optimizer(self, folder) -> None:
        self.engine.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)
