"""Checks that a model and batch fit a parallel layout, and which layers a pipeline stage holds."""

from __future__ import annotations

from pretrain.config import ConfigError
from pretrain.fast_weights import adapted_layers


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def stage_layers(cfg, topology) -> range:
    """The layers of this rank's pipeline stage (equal contiguous blocks)."""
    per_stage = cfg.model.num_layers // topology.pipeline_parallel_size
    start = topology.pipeline_parallel_rank * per_stage
    return range(start, start + per_stage)


def check_model_layout(cfg, tp: int, pp: int, dp: int) -> None:
    """Refuse, with the sizes that would work, what a tensor x pipeline x data layout cannot run."""
    model = cfg.model
    for name, size in (("num_heads", model.num_heads), ("ffn_hidden_size", model.ffn_hidden_size),
                       ("vocab_size", model.vocab_size)):
        if size % tp:
            common = [d for d in _divisors(model.num_heads) if model.ffn_hidden_size % d == 0
                      and model.vocab_size % d == 0]
            raise ConfigError(
                f"--parallel.tensor_parallel_size {tp} does not divide --model.{name} {size}; tensor-parallel sizes "
                f"this model allows: {', '.join(map(str, common))}"
            )
    micro, total = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if total % (micro * dp):
        raise ConfigError(
            f"--train.global_batch_size {total} is not a multiple of --train.micro_batch_size {micro} x "
            f"{dp} data-parallel ranks; the global batch is split across ranks and micro-batches, never resized"
        )
    if pp > 1:
        accumulation = total // (micro * dp)
        if accumulation < pp:
            raise ConfigError(
                f"{pp} pipeline stages need at least {pp} micro-batches per rank and step, this layout has "
                f"{accumulation}; lower --train.micro_batch_size or raise --train.global_batch_size"
            )
        if cfg.memory.enabled:
            first_adapted = adapted_layers(model.num_layers, cfg.memory.layer_fraction).start
            last_stage_start = model.num_layers - model.num_layers // pp
            if first_adapted < last_stage_start:
                raise ConfigError(
                    f"--memory.layer_fraction {cfg.memory.layer_fraction} puts fast weights on layers "
                    f"[{first_adapted}, {model.num_layers}) but the last of {pp} pipeline stages holds "
                    f"[{last_stage_start}, {model.num_layers}); fast weights must sit on the last stage: lower "
                    "--memory.layer_fraction or use fewer pipeline stages"
                )


def check_launch(cfg, world_size: int) -> None:
    """Everything that can be checked before any rank starts (used by ``--nproc-per-node``)."""
    from parallel.topology import check_layout

    tp, pp = cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size
    check_layout(world_size, tp, pp, cfg.model.num_layers)
    check_model_layout(cfg, tp, pp, world_size // (tp * pp))
