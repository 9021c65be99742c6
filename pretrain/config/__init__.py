"""Typed configuration: one dataclass per component, a help string per field.

Every field can be overridden on the command line as ``--section.field value``
(see ``launch/config_cli.py``); the fields' help strings are what ``--help`` prints.
Checks live in ``__post_init__`` and raise ``ConfigError`` naming the field and the fix.

One module per group of sections (``fields``: how a field is declared and checked); ``RunConfig`` joins them
and checks what spans sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pretrain.config.data import DataConfig
from pretrain.config.fields import ConfigError, check
from pretrain.config.memory import DiffusionConfig, MemoryConfig, adapted_layers
from pretrain.config.model import ModelConfig
from pretrain.config.parallelism import ParallelConfig
from pretrain.config.training import (
    SPIKE_MIN_HISTORY,
    CheckpointConfig,
    EvalConfig,
    GuardConfig,
    LoggingConfig,
    OptimizerConfig,
    TrainConfig,
    computes_in_bf16,
)

__all__ = ["SECTIONS", "SPIKE_MIN_HISTORY", "CheckpointConfig", "ConfigError", "DataConfig", "DiffusionConfig",
           "EvalConfig", "GuardConfig", "LoggingConfig", "MemoryConfig", "ModelConfig", "OptimizerConfig",
           "ParallelConfig", "RunConfig", "TrainConfig", "adapted_layers", "computes_in_bf16"]


@dataclass
class RunConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        model, memory = self.model, self.memory
        check(not (model.moe_num_experts and self.train.compile), "train.compile",
               "a mixture-of-experts model's routed experts see different token counts every step, which a compiled "
               "block would recompile for; use --train.compile false with --model.moe_num_experts")
        check(not (model.moe_aux_loss_coeff and self.parallel.pipeline_parallel_size > 1), "model.moe_aux_loss_coeff",
               "the balancing loss is added to the outer loss, which only the last pipeline stage computes; with "
               "pipeline stages balance by expert bias instead (--model.moe_expert_bias true "
               "--model.moe_aux_loss_coeff 0)")
        mlp_sites = [m for m in memory.target_module_list if m in ("gate", "up", "down")]
        layers = adapted_layers(model.num_layers, memory.layer_fraction)
        moe = [layer for layer in layers if model.is_moe_layer(layer)] if memory.enabled and mlp_sites else []
        if moe and memory.moe_targets == "shared":
            check(bool(model.moe_shared_ffn_hidden_size), "memory.moe_targets",
                  f"fast weights on the shared expert of layers {moe}, mixture-of-experts layers without one: use "
                  "--memory.moe_targets routed (or routed,shared), or give the model a shared expert "
                  "(--model.moe_shared_ffn_hidden_size), or keep those layers dense (--model.moe_first_dense_layers)")
        if moe and "routed" in memory.moe_target_set:
            check(memory.adapter == "lora", "memory.adapter",
                  "fast weights on routed experts are low-rank only (a dense delta per sequence and expert is too "
                  "large); use --memory.adapter lora or --memory.moe_targets shared")
            check(memory.inner_dropout == 0, "memory.inner_dropout",
                  "dropout on routed experts' fast-weight inputs is not built; use --memory.inner_dropout 0 or "
                  "--memory.moe_targets shared")
            check(not (self.parallel.expert_parallel_size > 1 and self.parallel.sequence_parallel_size > 1),
                  "memory.moe_targets", "fast weights on routed experts with both expert and sequence parallelism "
                  "are not built (an expert's rank would hold chunks of one sequence as two); use "
                  "--memory.moe_targets shared, or one of the two")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        unknown_sections = set(values) - set(SECTIONS)
        if unknown_sections:
            raise ConfigError(f"unknown config section(s) {sorted(unknown_sections)}; known: {', '.join(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            section_values = dict(values.get(name, {}))
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = sorted(set(section_values) - known)
            if unknown:
                raise ConfigError(f"unknown field(s) {', '.join(name + '.' + u for u in unknown)}")
            sections[name] = section_cls(**section_values)
        return cls(**sections)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}
