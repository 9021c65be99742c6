"""Build a run's parts from its config and topology: the model (this rank's part), the bi-level step (with
its fast-weight plan) and the engine that runs it on the layout, with the held-out evaluation and the
bad-step guard. The trainer, the tests and the benchmarks all assemble them here, so there is one way.

Engine choice: pipeline stages -> ``PipelineEngine`` (plain data parallelism across replicas);
data or sequence parallelism or any ZeRO stage -> ``DeepSpeedEngine``; otherwise ``LocalEngine``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch

from parallel.engines.contract import Engine, EngineOptions
from parallel.engines.deepspeed_zero import DeepSpeedEngine
from parallel.engines.local import LocalEngine
from parallel.engines.outer_optimizer import OuterOptimizer
from parallel.engines.pipeline import PipelineEngine
from parallel.engines.step_guard import StepGuard
from parallel.layout import (
    LayoutError,
    check_batch_split,
    check_sequence_split,
    check_tensor_split,
    check_world,
    divisors,
    stage_layers,
)
from pretrain.config import SPIKE_MIN_HISTORY, ConfigError, RunConfig, computes_in_bf16
from pretrain.eval.heldout import Evaluator
from pretrain.memdlm.bilevel import BilevelStep
from pretrain.memdlm.pipeline_stage import BilevelStage
from pretrain.model.fast_weights import adapted_layers, build_fast_weight_plan
from pretrain.model.float8 import Float8Matmul, fp8_shape_problem, fp8_unsupported_reason
from pretrain.model.transformer import DiffusionTransformer
from pretrain.train.optim import build_optimizer


@dataclass
class TrainingParts:
    model: DiffusionTransformer  # this rank's part of the model
    bilevel: BilevelStep  # the step (its ``plan``: where fast weights go)
    engine: Engine


def check_run_layout(cfg: RunConfig, world_size: int) -> None:
    """Refuse, with the sizes that would work, what a world size cannot run; callable before any rank starts."""
    tensor, pipeline = cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size
    sequence = cfg.parallel.sequence_parallel_size

    def fits(t: int, p: int) -> bool:
        try:
            _check_split(cfg, world_size, t, p)
            return True
        except LayoutError:
            return False

    check_world(world_size, tensor, pipeline, cfg.model.num_layers, fits, sequence)
    _check_split(cfg, world_size, tensor, pipeline)
    check_sequence_parallel(cfg)
    check_expert_parallel(cfg, world_size // (tensor * pipeline))


def check_expert_parallel(cfg: RunConfig, replicas: int) -> None:
    """Expert parallelism splits the experts over ranks out of the ``replicas`` (data x sequence) ranks."""
    experts = cfg.parallel.expert_parallel_size
    if experts == 1:
        return
    if not cfg.model.moe_num_experts:
        raise LayoutError(f"--parallel.expert_parallel_size {experts}: the model has no routed experts "
                          "(--model.moe_num_experts 0); use --parallel.expert_parallel_size 1")
    if cfg.model.moe_num_experts % experts or replicas % experts:
        sizes = [d for d in divisors(math.gcd(cfg.model.moe_num_experts, replicas))]
        raise LayoutError(
            f"--parallel.expert_parallel_size {experts} must divide --model.moe_num_experts "
            f"{cfg.model.moe_num_experts} and the {replicas} data x sequence ranks; sizes that do: "
            f"{', '.join(map(str, sizes))}")


def check_sequence_parallel(cfg: RunConfig) -> None:
    """What sequence parallelism cannot be combined with (yet), each refused with what would work."""
    sequence = cfg.parallel.sequence_parallel_size
    if sequence == 1:
        return
    model = cfg.model
    check_sequence_split(sequence, cfg.parallel.tensor_parallel_size, model.key_value_heads, model.num_heads)
    if cfg.parallel.pipeline_parallel_size > 1:
        raise LayoutError(
            f"--parallel.sequence_parallel_size {sequence} with --parallel.pipeline_parallel_size "
            f"{cfg.parallel.pipeline_parallel_size}: the pipeline's stages exchange whole activations, not "
            "sequence chunks; use --parallel.pipeline_parallel_size 1 (tensor, sequence and data parallelism "
            "with ZeRO compose)")
    if cfg.train.compile:
        raise LayoutError(
            f"--train.compile true with --parallel.sequence_parallel_size {sequence}: the attention's all-to-all "
            "is not traced into the compiled blocks yet; use --train.compile false")


def _check_split(cfg: RunConfig, world_size: int, tensor: int, pipeline: int) -> None:
    """The model and batch on ``tensor`` x ``pipeline`` (x the configured sequence size, dividing
    ``world_size``)."""
    model = cfg.model
    sequence = cfg.parallel.sequence_parallel_size
    check_world(world_size, tensor, pipeline, model.num_layers, sequence=sequence)
    sizes = {"model.num_heads": model.num_heads, "model.ffn_hidden_size": model.ffn_hidden_size,
             "model.vocab_size": model.vocab_size}
    if model.num_kv_heads:
        sizes["model.num_kv_heads"] = model.num_kv_heads
    if model.moe_num_experts:
        sizes["model.moe_ffn_hidden_size"] = model.expert_ffn_hidden_size
        if model.moe_shared_ffn_hidden_size:
            sizes["model.moe_shared_ffn_hidden_size"] = model.moe_shared_ffn_hidden_size
    check_tensor_split(tensor, sizes)
    data = world_size // (tensor * pipeline * sequence)
    check_batch_split(cfg.train.global_batch_size, cfg.train.micro_batch_size, data, pipeline)
    if pipeline > 1 and model.tie_embeddings:
        raise LayoutError(
            "--model.tie_embeddings true holds one matrix for the embedding (first pipeline stage) and the head "
            f"(last stage), which {pipeline} stages cannot share: import the model with `memdlm-import-hf "
            "--untie-embeddings`, or pass --model.tie_embeddings false, or --parallel.pipeline_parallel_size 1")
    if pipeline > 1 and cfg.memory.enabled:
        first_adapted = adapted_layers(model.num_layers, cfg.memory.layer_fraction).start
        last_stage = stage_layers(model.num_layers, pipeline, pipeline - 1)
        if first_adapted < last_stage.start:
            raise LayoutError(
                f"--memory.layer_fraction {cfg.memory.layer_fraction} puts fast weights on layers "
                f"[{first_adapted}, {model.num_layers}) but the last of {pipeline} pipeline stages holds "
                f"[{last_stage.start}, {model.num_layers}); fast weights must sit on the last stage: lower "
                "--memory.layer_fraction or use fewer pipeline stages"
            )


def autocast_factory(precision: str, device: torch.device):
    """The context every stage of the step runs under: bf16 autocast (also fp8's, for all but its fp8
    matmuls), or nothing for fp32."""
    if computes_in_bf16(precision):
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def check_precision(cfg: RunConfig, device: torch.device, allow_cpu_autocast: bool = False) -> None:
    """Refuse a precision this device cannot train in. ``allow_cpu_autocast`` (tests): bf16 on the CPU, and fp8
    with its casts real and its matmuls emulated."""
    precision = cfg.train.precision
    emulated = device.type == "cpu" and allow_cpu_autocast
    if precision == "bf16" and device.type == "cpu" and not emulated:
        raise ConfigError(
            "--train.precision bf16 needs a GPU: megatron-core's linear layers restore autocast in their "
            "backward for CUDA only, so a CPU backward would mix bf16 and fp32; use --train.precision fp32 on CPU"
        )
    if precision != "fp8":
        return
    if cfg.parallel.zero_stage == 3:
        raise ConfigError(
            "--train.precision fp8 with --parallel.zero_stage 3 is refused: torchao keeps each gathered weight "
            "until the backward, so ZeRO 3 would save no memory on the fp8 projections; use ZeRO 1 or 2")
    reason = None if emulated else (fp8_unsupported_reason(device) or fp8_shape_problem(
        cfg.model, cfg.parallel.tensor_parallel_size, cfg.parallel.sequence_parallel_size))
    if reason:
        raise ConfigError(reason)


def build_model(cfg: RunConfig, topology, allow_cpu_autocast: bool = False) -> DiffusionTransformer:
    """This rank's stage of the model (all of it without pipeline stages), initialised from the seed. Under
    ``--train.precision fp8`` the projections of the layers without fast weights matmul in fp8."""
    check_precision(cfg, topology.device, allow_cpu_autocast)
    layers = stage_layers(cfg.model.num_layers, topology.pipeline_parallel_size, topology.pipeline_parallel_rank)
    model = DiffusionTransformer(cfg.model, seed=cfg.train.seed, layers=layers).to(topology.device)
    if cfg.train.precision == "fp8":
        exempt = adapted_layers(cfg.model.num_layers, cfg.memory.layer_fraction) if cfg.memory.enabled else range(0)
        model.use_float8(Float8Matmul(emulate=topology.device.type != "cuda"), exempt)
    if cfg.train.compile:
        model.compile_blocks()
    return model


def build_bilevel_step(cfg: RunConfig, model: DiffusionTransformer, topology, mask_token_id: int) -> BilevelStep:
    """The bi-level step of ``cfg`` on ``model`` (memory off: plain MDLM through the same code)."""
    plan = build_fast_weight_plan(cfg.model, cfg.memory, topology.tensor_parallel_size,
                                  topology.tensor_parallel_rank, topology.tensor_parallel_group)
    return BilevelStep(model, plan, cfg.memory, cfg.diffusion, mask_token_id, seed=cfg.train.seed,
                       within_documents=cfg.data.document_attention,
                       autocast=autocast_factory(cfg.train.precision, topology.device),
                       recompute=cfg.train.recompute)


def engine_options(cfg: RunConfig) -> EngineOptions:
    return EngineOptions(
        global_batch_size=cfg.train.global_batch_size, micro_batch_size=cfg.train.micro_batch_size,
        grad_clip=cfg.optim.grad_clip, statistics_size=1 + cfg.memory.inner_steps_per_step, seed=cfg.train.seed,
        zero_stage=cfg.parallel.zero_stage, pipeline_schedule=cfg.parallel.pipeline_schedule,
        seq_len=cfg.model.seq_len, hidden_size=cfg.model.hidden_size, num_sources=cfg.data.num_sources,
    )


def build_step_guard(cfg: RunConfig, topology) -> StepGuard | None:
    """The bad-step guard of ``--guard.*`` (``None`` when skipping bad steps is off)."""
    if not cfg.guard.skip_bad_steps:
        return None
    return StepGuard(topology.control_group, topology.world_size, topology.tensor_parallel_rank == 0,
                     cfg.guard.spike_zscore, cfg.guard.spike_window, min_history=SPIKE_MIN_HISTORY)


def build_engine(cfg: RunConfig, model: DiffusionTransformer, bilevel: BilevelStep, topology) -> Engine:
    """The engine of the layout, with its optimizer, held-out evaluation and bad-step guard built in."""
    options = engine_options(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    adaptation = bilevel.for_adaptation(cfg.eval.seed)
    guard = build_step_guard(cfg, topology)
    listener = None
    if guard is not None:
        guard.wrap(optimizer)  # every engine ends in this optimizer's step (DeepSpeed's ZeRO wrapper too)
        listener = guard.note_norm  # an OuterOptimizer already computes the global norm
    if topology.pipeline_parallel_size > 1:
        experts = topology.expert_parallel_size > 1
        outer = OuterOptimizer(optimizer, cfg.optim.grad_clip, topology.tensor_parallel_group,
                               topology.pipeline_parallel_group, reduce_group=topology.data_parallel_group,
                               norm_listener=listener,
                               expert_group=topology.expert_parallel_group if experts else None,
                               expert_reduce_group=topology.expert_data_parallel_group if experts else None)
        return PipelineEngine(model, BilevelStage(bilevel, adaptation), outer, options, topology, guard=guard)
    evaluator = Evaluator(adaptation)
    if topology.data_parallel_size > 1 or topology.sequence_parallel_size > 1 or cfg.parallel.zero_stage > 0:
        return DeepSpeedEngine(model, bilevel, optimizer, options, topology, evaluator, guard)
    outer = OuterOptimizer(optimizer, cfg.optim.grad_clip, topology.tensor_parallel_group, norm_listener=listener)
    return LocalEngine(model, bilevel, outer, options, topology, evaluator, guard)


def build_training(cfg: RunConfig, topology, mask_token_id: int, model: DiffusionTransformer | None = None,
                   allow_cpu_autocast: bool = False) -> TrainingParts:
    """Model (``model``, if given: already built and loaded), step and engine for ``cfg`` on ``topology``.

    The layout must have been checked (``check_run_layout``, once per start: the trainer does it before
    the process groups exist). Weights must be in the model before this call: some engines (ZeRO 3)
    partition them."""
    if model is None:
        model = build_model(cfg, topology, allow_cpu_autocast)  # (checks the precision)
    else:
        check_precision(cfg, topology.device, allow_cpu_autocast)
    bilevel = build_bilevel_step(cfg, model, topology, mask_token_id)
    engine = build_engine(cfg, model, bilevel, topology)
    return TrainingParts(model, bilevel, engine)
