"""Build a run's parts from its config and topology: the model (this rank's part), the fast-weight
plan, the bi-level step and the engine that runs it on the layout. The trainer, the tests and the
benchmarks all assemble them here, so there is one way to do it.

Engine choice: pipeline stages -> ``PipelineEngine`` (plain data parallelism across replicas);
data parallelism or any ZeRO stage -> ``DeepSpeedEngine``; otherwise ``LocalEngine``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import torch

from parallel.deepspeed_engine import DeepSpeedEngine
from parallel.engine import Engine, EngineOptions, OuterOptimizer
from parallel.layout import LayoutError, check_batch_split, check_tensor_split, check_world, stage_layers
from parallel.local_engine import LocalEngine
from parallel.pipeline import PipelineEngine
from parallel.step_guard import StepGuard
from pretrain.bilevel import BilevelStep
from pretrain.config import ConfigError, RunConfig
from pretrain.evaluation import Evaluator
from pretrain.fast_weights import FastWeightPlan, adapted_layers, build_fast_weight_plan
from pretrain.model import DiffusionTransformer
from pretrain.optim import build_optimizer
from pretrain.pipeline_stage import BilevelStage


@dataclass
class TrainingParts:
    model: DiffusionTransformer  # this rank's part of the model
    plan: FastWeightPlan | None  # the fast-weight sites; None with memory off
    step: BilevelStep
    engine: Engine


def check_run_layout(cfg: RunConfig, world_size: int) -> None:
    """Refuse, with the sizes that would work, what a world size cannot run; callable before any rank starts."""
    tensor, pipeline = cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size
    model = cfg.model
    check_world(world_size, tensor, pipeline, model.num_layers)
    sizes = {"model.num_heads": model.num_heads, "model.ffn_hidden_size": model.ffn_hidden_size,
             "model.vocab_size": model.vocab_size}
    if model.num_kv_heads:
        sizes["model.num_kv_heads"] = model.num_kv_heads
    check_tensor_split(tensor, sizes)
    data = world_size // (tensor * pipeline)
    check_batch_split(cfg.train.global_batch_size, cfg.train.micro_batch_size, data, pipeline)
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
    """The context every stage of the step runs under: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_model(cfg: RunConfig, topology) -> DiffusionTransformer:
    """This rank's stage of the model (all of it without pipeline stages), initialised from the seed."""
    layers = stage_layers(cfg.model.num_layers, topology.pipeline_parallel_size, topology.pipeline_parallel_rank)
    return DiffusionTransformer(cfg.model, seed=cfg.train.seed, layers=layers).to(topology.device)


def build_step(cfg: RunConfig, model: DiffusionTransformer, topology, mask_token_id: int) -> BilevelStep:
    plan = build_fast_weight_plan(cfg.model, cfg.memory, topology.tensor_parallel_size,
                                  topology.tensor_parallel_rank, topology.tensor_parallel_group)
    return BilevelStep(model, plan, cfg.memory, cfg.diffusion, mask_token_id, seed=cfg.train.seed,
                       within_documents=cfg.data.document_attention,
                       autocast=autocast_factory(cfg.train.precision, topology.device),
                       recompute=cfg.train.recompute)


def engine_options(cfg: RunConfig) -> EngineOptions:
    return EngineOptions(
        global_batch_size=cfg.train.global_batch_size, micro_batch_size=cfg.train.micro_batch_size,
        grad_clip=cfg.optim.grad_clip, statistics_size=1 + cfg.memory.num_inner_steps, seed=cfg.train.seed,
        zero_stage=cfg.parallel.zero_stage, pipeline_schedule=cfg.parallel.pipeline_schedule,
        seq_len=cfg.model.seq_len, hidden_size=cfg.model.hidden_size,
    )


def build_adapter(cfg: RunConfig, model: DiffusionTransformer, step: BilevelStep) -> BilevelStep:
    """The step inference-time adaptation runs (evaluation): the run's memory settings with uniform inner
    weights, on the same model and fast-weight sites."""
    memory = dataclasses.replace(cfg.memory, enabled=True, inner_loss_weight="uniform")
    return BilevelStep(model, step.sites, memory, cfg.diffusion, step.mask_token_id, seed=cfg.eval.seed,
                       within_documents=step.within_documents, autocast=step.autocast)


def build_engine(cfg: RunConfig, model: DiffusionTransformer, step: BilevelStep, topology) -> Engine:
    options = engine_options(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    adapter = build_adapter(cfg, model, step)
    if topology.pipeline_parallel_size > 1:
        outer = OuterOptimizer(optimizer, cfg.optim.grad_clip, topology.tensor_parallel_group,
                               topology.pipeline_parallel_group, reduce_group=topology.data_parallel_group)
        engine = PipelineEngine(model, BilevelStage(step, adapter), outer, options, topology)
    elif topology.data_parallel_size > 1 or cfg.parallel.zero_stage > 0:
        engine = DeepSpeedEngine(model, step, optimizer, options, topology)
    else:
        outer = OuterOptimizer(optimizer, cfg.optim.grad_clip, topology.tensor_parallel_group)
        engine = LocalEngine(model, step, outer, options, topology)
    engine.evaluator = Evaluator(adapter)
    if cfg.guard.skip_bad_steps:
        engine.guard = StepGuard(topology.control_group, topology.world_size, topology.tensor_parallel_rank == 0,
                                 cfg.guard.spike_zscore, cfg.guard.spike_window)
        engine.guard.wrap(optimizer)
        if engine.optimizer is not None:  # an OuterOptimizer already computes the global norm
            engine.optimizer.norm_listener = engine.guard.note_norm
    return engine


def build_training(cfg: RunConfig, topology, mask_token_id: int, model: DiffusionTransformer | None = None,
                   allow_cpu_bf16: bool = False) -> TrainingParts:
    """Model (``model``, if given: already built and loaded), plan, step and engine for ``cfg`` on ``topology``.

    Weights must be in the model before this call: some engines (ZeRO 3) partition them."""
    check_run_layout(cfg, topology.world_size)
    if cfg.train.precision == "bf16" and topology.device.type == "cpu" and not allow_cpu_bf16:
        raise ConfigError(
            "--train.precision bf16 needs a GPU: megatron-core's linear layers restore autocast in their "
            "backward for CUDA only, so a CPU backward would mix bf16 and fp32; use --train.precision fp32 on CPU"
        )
    if model is None:
        model = build_model(cfg, topology)
    step = build_step(cfg, model, topology, mask_token_id)
    engine = build_engine(cfg, model, step, topology)
    return TrainingParts(model, step.plan, step, engine)
