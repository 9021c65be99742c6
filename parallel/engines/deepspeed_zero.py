"""Data parallelism with DeepSpeed ZeRO (stages 0-3) around the bi-level step.

DeepSpeed wraps ``BilevelModule``, whose forward is the whole fused step: the inner loop's
``torch.autograd.grad`` calls happen inside that forward on the fast weights only, and the
engine sees one returned tensor, the outer loss, whose ``engine.backward`` is the only
backward it hooks. So the data-parallel traffic of a step is the outer gradient reduction of
plain MDLM and nothing else (docs/DESIGN.md sections 5 and 8).

Loss scaling: every micro-batch's loss is already its share of the *global* batch loss, so
DeepSpeed's division by the accumulation steps is turned off and its averaging over data
ranks is undone by scaling the loss by the data-parallel size.

Sequence parallelism: its ranks hold the same weights and each computes its tokens' share of a
micro-batch's loss, so DeepSpeed is told that the data-parallel group is data x sequence parallel
(``Topology.gradient_group``): gradients are summed, and ZeRO shards its state, over all of them.
"""

from __future__ import annotations

import logging
import os

import torch

from parallel.checkpoint.sharded_state import ParameterState
from parallel.collectives import grad_norm_and_clip
from parallel.engines.base import EngineBase, add_output
from parallel.engines.contract import EngineOptions, EvalFunction, StepFunction
from parallel.engines.outer_optimizer import adam_parameter_state, load_adam_parameter_state, set_learning_rate
from parallel.engines.step_guard import StepGuard
from parallel.experts import expert_group_name, split_over_experts
from parallel.megatron import parallel_state


class MegatronMPU:
    """The Megatron-LM ``mpu`` interface DeepSpeed expects, over megatron-core's parallel_state."""

    def get_model_parallel_world_size(self):
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    # The ranks that reduce gradients together: data x sequence (context) parallel.
    def get_data_parallel_world_size(self):
        return parallel_state.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_rank(self):
        return parallel_state.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

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


def _prepare_expert_parallel(module: torch.nn.Module, optimizer: torch.optim.Optimizer, topology):
    """What DeepSpeed needs to reduce expert-parallel experts (parameters marked ``allreduce`` false) over their
    expert-data-parallel group, and nothing else over the data group:

    - megatron's expert and expert-data groups registered under DeepSpeed's name for them (its own group builder
      would put tensor-parallel ranks into the expert-data group, and ours split each expert's width);
    - a parameter-free ``deepspeed.moe.layer.MoE`` in the module, the only sign of experts DeepSpeed looks for;
    - the optimizer's parameter groups split into expert and other groups (DeepSpeed does this only for the
      optimizers it builds itself).

    Returns the optimizer to give DeepSpeed (the same one, its groups split)."""
    import deepspeed.utils.groups as groups
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    size = topology.expert_parallel_size
    name = expert_group_name(size)
    num_experts = sum(p.shape[0] for p in module.parameters() if split_over_experts(p))
    for table, ranks, group in ((groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                                 topology.expert_parallel_group),
                                (groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
                                 topology.expert_data_parallel_group)):
        table[name] = group
        ranks[name] = torch.distributed.get_process_group_ranks(group)

    class ExpertsSign(MoE):
        def __init__(self):
            torch.nn.Module.__init__(self)  # no experts of its own: ours live in the model
            self.ep_size, self.expert_group_name = size, name
            self.num_experts = num_experts

        def set_deepspeed_parallelism(self, *args, **kwargs):  # the groups are registered above
            pass

    module.experts_sign = ExpertsSign()
    named = [{**group, "name": f"group_{i}"} for i, group in enumerate(optimizer.param_groups)]
    optimizer.param_groups[:] = split_params_into_different_moe_groups_for_optimizer(named)  # no state yet
    return optimizer


def deepspeed_config(options: EngineOptions, data_parallel_size: int, cuda: bool = False,
                     sequence_parallel_size: int = 1) -> dict:
    """``data_parallel_size``: replicas that read different samples; DeepSpeed's data-parallel group also holds
    the sequence-parallel ranks, so its batch size counts them (it checks micro x accumulation x group)."""
    accumulation = options.global_batch_size // (options.micro_batch_size * data_parallel_size)
    zero = {"stage": options.zero_stage}
    if cuda and options.zero_stage > 0:
        # Reduce gradients on a side stream while the backward goes on, into contiguous buffers.
        zero.update({"overlap_comm": True, "contiguous_gradients": True})
    if options.zero_stage == 3:
        # Gather every parameter for each use: the step calls the same layers in several passes.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0})
    return {
        "train_micro_batch_size_per_gpu": options.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": options.global_batch_size * sequence_parallel_size,
        "zero_optimization": zero,
        # Without ZeRO, DeepSpeed clips but keeps no norm: the engine measures and clips in one pass itself.
        "gradient_clipping": options.grad_clip if options.zero_stage > 0 else 0.0,
        # DeepSpeed's own bf16 mode stays off: it would hold the module in bf16. Every engine keeps fp32
        # parameters (the masters), fp32 optimizer state and fp32 gradients, and computes under bf16
        # autocast (the step's own context), so gradients are also reduced in fp32.
        "bf16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(EngineBase):
    """DeepSpeed owns the optimizer (given here unwrapped), the gradient reduction and the clipping."""

    def __init__(self, model, step_fn: StepFunction, optimizer: torch.optim.Optimizer, options: EngineOptions,
                 topology, evaluator: EvalFunction | None = None, guard: StepGuard | None = None):
        super().__init__(model, options, topology, step_fn.num_inner_steps, evaluator, guard)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if topology.device.type == "cuda" else "cpu")
        os.environ.setdefault("LOCAL_RANK", str(topology.local_rank))  # DeepSpeed insists, even alone
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        import deepspeed

        self._norm = None  # the gradient norm measured here (ZeRO 0), when DeepSpeed keeps none
        self.module = BilevelModule(model, step_fn)
        self.expert_group = None
        if topology.expert_parallel_size > 1:
            optimizer = _prepare_expert_parallel(self.module, optimizer, topology)
            self.expert_group = topology.expert_parallel_group
        self.engine, self.deepspeed_optimizer, _, _ = deepspeed.initialize(
            model=self.module, optimizer=optimizer,
            config=deepspeed_config(options, topology.data_parallel_size, topology.device.type == "cuda",
                                    topology.sequence_parallel_size),
            mpu=MegatronMPU(), dist_init_required=False,
        )

    def set_learning_rate(self, lr: float) -> None:
        set_learning_rate(self.deepspeed_optimizer, lr)

    def forward_backward(self, micro_batches, normalizer, step, sums) -> None:
        # Each loss is already its share of the global batch: undo DeepSpeed's averaging over data (and
        # sequence) ranks.
        for micro_batch in micro_batches:
            loss = self.engine(micro_batch, normalizer, step)
            self.engine.backward(loss * self.topology.gradient_group_size, scale_wrt_gas=False)
            # Before the step: the step guard reads the loss.
            add_output(sums, self.module.last_output, self.options)
            if self.options.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                # The gradients are reduced by now: their norm, and the clipping DeepSpeed is not asked to do.
                self._norm = grad_norm_and_clip(list(self.model.parameters()), self.options.grad_clip,
                                                self.topology.tensor_parallel_group, None, self.expert_group)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only

    def apply_gradients(self) -> torch.Tensor:
        grad_norm = self.engine.get_global_grad_norm()  # DeepSpeed keeps it as a float or a tensor
        if grad_norm is None:
            grad_norm = self._norm if self._norm is not None else float("nan")
        self._norm = None
        return torch.as_tensor(grad_norm, dtype=torch.float64)

    # -- checkpoints: per parameter, whatever the ZeRO stage -----------------------------------------
    def parameter_states(self, values: bool = True) -> dict[str, ParameterState]:
        """Each parameter's tensor-parallel shard of weight and AdamW state, whole on every data rank.

        Under ZeRO the state is split over the data ranks; DeepSpeed's ``safe_get_full_*`` gathers one
        parameter at a time (a collective: every rank walks the parameters in the same order).
        ``values=False``: zeros of the right shapes, without communication (a template to load into)."""
        if self.options.zero_stage == 0:
            optimizer = self.deepspeed_optimizer
            return {name: adam_parameter_state(optimizer, p) for name, p in self.model.named_parameters()}
        if not values:
            return {name: ParameterState(*(torch.zeros(tuple(getattr(p, "ds_shape", p.shape)), dtype=torch.float32,
                                                       device=self.topology.device) for _ in range(3)),
                                         torch.zeros((), dtype=torch.float32))
                    for name, p in self.model.named_parameters()}
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        step = self._adam_step()
        self._ensure_optimizer_state()
        states = {}
        for name, param in self.model.named_parameters():
            weight = safe_get_full_fp32_param(param)
            moments = [safe_get_full_optimizer_state(param, key) for key in ("exp_avg", "exp_avg_sq")]
            moments = [m if m is not None else torch.zeros_like(weight) for m in moments]
            states[name] = ParameterState(weight, moments[0], moments[1], step.clone())
        return states

    def load_parameter_states(self, states: dict[str, ParameterState]) -> None:
        if self.options.zero_stage == 0:
            for name, param in self.model.named_parameters():
                load_adam_parameter_state(self.deepspeed_optimizer, param, states[name])
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        zero = self.deepspeed_optimizer
        base = zero.optimizer  # torch AdamW over ZeRO's flat fp32 partitions
        self._ensure_optimizer_state()
        step = None
        for name, param in self.model.named_parameters():
            state = states[name]
            safe_set_full_fp32_param(param, state.weight)
            safe_set_full_optimizer_state(param, state.exp_avg, "exp_avg")
            safe_set_full_optimizer_state(param, state.exp_avg_sq, "exp_avg_sq")
            step = state.step
        # The masters are set; copy them into the module's own weights.
        if hasattr(zero, "update_lp_params"):  # ZeRO 1 and 2
            zero.update_lp_params()
        else:  # ZeRO 3 (a private DeepSpeed method: re-copy each group's partitions)
            for index in range(len(zero.fp16_groups)):
                zero._reassign_or_swap_out_partitioned_parameters(index)
        for flat in self._flat_partitions():
            base.state[flat]["step"] = step.detach().to(torch.float32).clone()

    def _ensure_optimizer_state(self) -> None:
        """Adam state for every flat partition (zeros before the first step, exactly what AdamW would
        start from), and each parameter's ZeRO 1/2 fragment pointed at its slice of it.

        DeepSpeed links the fragments once, right after the first group's first step, when later groups
        have no state yet: their fragments stay empty and ``safe_get_full_optimizer_state`` fails on them."""
        zero = self.deepspeed_optimizer
        base = zero.optimizer
        for flat in self._flat_partitions():
            if not base.state.get(flat):
                base.state[flat] = {"step": torch.zeros((), dtype=torch.float32),
                                    "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        if not hasattr(zero, "single_partition_of_fp32_groups"):
            return  # ZeRO 3 reads its partitions directly
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        for index in range(len(zero.optimizer.param_groups)):
            flat = zero.single_partition_of_fp32_groups[index]
            if zero.optimizer.state.get(flat):
                lazy_init_hp_params_optimizer_state(zero.bit16_groups[index], flat, zero.optimizer.state)

    def _flat_partitions(self) -> list[torch.Tensor]:
        """This rank's fp32 partitions, one per parameter group: what ZeRO's inner AdamW steps."""
        zero = self.deepspeed_optimizer
        if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO 1 and 2
            return list(zero.single_partition_of_fp32_groups)
        return list(zero.fp32_partitioned_groups_flat)  # ZeRO 3 (its param groups hold them only while stepping)

    def _adam_step(self) -> torch.Tensor:
        steps = [s["step"] for s in self.deepspeed_optimizer.optimizer.state.values() if "step" in s]
        return torch.as_tensor(steps[0] if steps else 0.0, dtype=torch.float32).reshape(())
