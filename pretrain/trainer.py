"""The training loop: load -> step -> log -> checkpoint, each one call.

Layouts: the engine (parallel/engine.py) decides how a step runs (one replica, DeepSpeed data
parallelism, or pipeline stages); tensor parallelism lives in the model's layers. Each model
replica reads its data on one rank (tensor rank 0 of stage 0) and broadcasts it to the rest
of the replica; rank 0 alone writes metrics, the progress bar and wandb.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from data_pipeline.loader import ReaderOptions, open_batches
from data_pipeline.readers import MaskingSpec
from data_pipeline.source import resolve_dataset
from parallel.collectives import broadcast_batch
from parallel.topology import Topology, initialize_topology
from pretrain.checkpoint import latest_checkpoint, load_model_weights, load_trainer_state, save_checkpoint
from pretrain.config import ConfigError, RunConfig
from pretrain.cpu_memory import keep_freed_memory
from pretrain.factory import build_model, build_training, check_run_layout
from pretrain.metrics import MetricsLogger, NullLogger
from pretrain.model import count_parameters, full_parameter_count
from pretrain.optim import learning_rate


@dataclass
class TrainSummary:
    out_dir: Path
    steps_done: int
    first_loss: float
    last_loss: float
    first_losses_mean: float
    last_losses_mean: float
    tokens_per_s: float
    seconds: float
    num_parameters: int
    checkpoint: Path | None
    metrics_file: Path
    wandb_dir: str | None
    stopped_early: bool
    losses: list[float]


def train(cfg: RunConfig, stop_requested: Callable[[], bool] = lambda: False) -> TrainSummary:
    """Train ``cfg`` to ``cfg.train.steps`` (resuming from the latest checkpoint), stopping early and
    saving when ``stop_requested()`` turns true on any rank."""
    with _restored_environment(_STREAMING_WORLD):
        return _train(cfg, stop_requested)


def _train(cfg: RunConfig, stop_requested: Callable[[], bool]) -> TrainSummary:
    started = time.perf_counter()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    topology: Topology = initialize_topology(
        cfg.train.device, cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size, cfg.model.num_layers
    )
    check_run_layout(cfg, topology.world_size)
    device = topology.device
    if device.type == "cpu":
        keep_freed_memory()
    out_dir = Path(cfg.train.out_dir)

    # 1. The prepared dataset (raw input is prepared on first use, by rank 0 alone); the model's
    #    mask token comes from its tokenizer unless set.
    data_root, manifest = _prepare_data(cfg, topology)
    tokenizer_file = data_root / manifest["tokenizer"]
    mask_id = cfg.model.mask_token_id if cfg.model.mask_token_id >= 0 else manifest["mask_token_id"]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mask_token_id=mask_id))
    config_record = {**cfg.to_dict(), "tokens": {"mask_token_id": mask_id, "eot_token_id": manifest["eot_token_id"],
                                                  "pad_token_id": manifest["pad_token_id"]},
                     "dataset": {"path": str(data_root), "num_samples": manifest["num_samples"],
                                 "num_tokens": manifest["num_tokens"]}}

    # 2. This rank's part of the model (initialised from the seed, layout-independent), the
    #    step, and the engine that runs it on this layout.
    model = build_model(cfg, topology)
    local_parameters = count_parameters(model)  # before an engine partitions them
    checkpoint = latest_checkpoint(out_dir) if cfg.train.resume else None
    if checkpoint is not None:
        _check_resumable(checkpoint, config_record)
        load_model_weights(model, checkpoint, topology.tensor_parallel_size, topology.tensor_parallel_rank)
    engine = build_training(cfg, topology, mask_id, model).engine

    # 3. Resume: optimizer state, step, data position.
    start_step, data_state = 0, None
    layout = {"tensor": topology.tensor_parallel_size, "pipeline": topology.pipeline_parallel_size,
              "data": topology.data_parallel_size, "zero_stage": cfg.parallel.zero_stage}
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        if state.get("layout", layout) != layout:
            raise ConfigError(
                f"{checkpoint} holds optimizer state saved with layout {state['layout']}, not {layout}; resume "
                "with the same --parallel.* options and rank count (the weights in model.safetensors load into "
                "any layout: start a new --train.out_dir from them)"
            )
        engine.load_optimizer(checkpoint / "optimizer")
        start_step = state["step"]
        data_state = state["data"].get(topology.data_parallel_rank)
        torch.set_rng_state(state["torch_rng"])
    if start_step >= cfg.train.steps:
        raise ConfigError(
            f"--train.steps {cfg.train.steps}: {out_dir} already holds a checkpoint at step {start_step}; "
            "raise --train.steps to continue, or use a new --train.out_dir"
        )

    # 4. This replica's micro-batches, masked in loader workers on its reading rank.
    micro = cfg.train.micro_batch_size
    accumulation = cfg.train.global_batch_size // (micro * topology.data_parallel_size)
    data = _open_data(cfg, topology, data_root, manifest, data_state)
    batches = iter(data) if data is not None else None
    batch_shape = (micro, cfg.model.seq_len, cfg.memory.num_inner_steps - 1)

    def next_micro_batch():
        local = next(batches).to(device, non_blocking=True) if batches is not None else None
        return broadcast_batch(local, batch_shape, topology.data_source_rank, topology.model_parallel_group, device)

    logger = (MetricsLogger(out_dir, cfg.logging, config_record, cfg.train.steps, start_step)
              if topology.is_main else NullLogger())
    logger.write(
        f"model: {full_parameter_count(cfg.model) / 1e6:.2f}M parameters ({local_parameters / 1e6:.2f}M on this "
        f"rank), memory "
        f"{'on' if cfg.memory.enabled else 'off'}; layout: {topology.world_size} ranks = tensor "
        f"{topology.tensor_parallel_size} x pipeline {topology.pipeline_parallel_size} x data "
        f"{topology.data_parallel_size} (ZeRO {cfg.parallel.zero_stage}); data: {manifest['num_samples']} samples "
        f"of {cfg.model.seq_len} tokens ({cfg.data.format}) in {data_root}"
        + (f"; resumed from {checkpoint} at step {start_step}" if checkpoint else "")
    )
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
    losses, step_seconds = [], []
    saved, completed, stopped_early, skipped_samples = checkpoint, start_step, False, 0

    def save(at_step: int) -> Path:
        data_states = [None] * topology.world_size
        entry = (topology.data_parallel_rank, data.state_dict()) if data is not None else None
        dist.all_gather_object(data_states, entry)
        states = {rank: state for rank, state in filter(None, data_states)}
        return save_checkpoint(out_dir, at_step, engine, topology, config_record, tokenizer_file,
                               {"step": at_step, "torch_rng": torch.get_rng_state(), "data": states,
                                "layout": layout})

    try:
        for step in range(start_step, cfg.train.steps):
            tick = time.perf_counter()
            micro_batches = [next_micro_batch() for _ in range(accumulation)]
            lr = learning_rate(step, cfg.train.steps, cfg.optim)
            stats = engine.train_step(micro_batches, step, lr)
            completed = step + 1
            seconds = time.perf_counter() - tick
            skipped_samples += sum(mb.num_skipped for mb in micro_batches)
            record = {"step": completed, "loss": stats.loss, "inner_losses": stats.inner_losses,
                      "lr": lr, "grad_norm": stats.grad_norm,
                      "tokens_per_s": tokens_per_step / seconds, "step_seconds": seconds}
            if cfg.data.format == "webdataset":
                record["skipped_samples"] = skipped_samples
            logger.log(record)
            losses.append(stats.loss)
            step_seconds.append(seconds)
            if cfg.train.checkpoint_every and completed % cfg.train.checkpoint_every == 0:
                saved = save(completed)
            if _any_rank(stop_requested()) and completed < cfg.train.steps:
                logger.write(f"stop requested: saving a checkpoint at step {completed} and exiting")
                stopped_early = True
                break
        if saved is None or saved.name != f"step_{completed:06d}":
            saved = save(completed)
    except KeyboardInterrupt:
        # Nothing lost: keep what the completed steps trained (single process; with several
        # ranks the others may be gone, so only a signal-driven stop saves collectively).
        if topology.world_size == 1 and completed > start_step and (saved is None or saved.name != f"step_{completed:06d}"):
            saved = save(completed)
            logger.write(f"interrupted: saved a checkpoint at step {completed} in {saved}")
        logger.close()
        raise
    except BaseException:
        logger.close()
        raise
    logger.close()

    timed = step_seconds[1:] or step_seconds
    head, tail = losses[:10], losses[-10:]
    return TrainSummary(
        out_dir=out_dir, steps_done=completed, first_loss=losses[0], last_loss=losses[-1],
        first_losses_mean=sum(head) / len(head), last_losses_mean=sum(tail) / len(tail),
        tokens_per_s=tokens_per_step * len(timed) / sum(timed), seconds=time.perf_counter() - started,
        num_parameters=full_parameter_count(cfg.model), checkpoint=saved, metrics_file=out_dir / "metrics.jsonl",
        wandb_dir=logger.wandb_dir, stopped_early=stopped_early, losses=losses,
    )


def _any_rank(flag: bool) -> bool:
    """Whether any rank saw ``flag`` (a signal may reach only some ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0])
    dist.all_reduce(value)
    return bool(value.item())


def _open_data(cfg: RunConfig, topology: Topology, root: Path, manifest: dict, state):
    if not topology.reads_data:
        return None
    spec = MaskingSpec(cfg.train.seed, cfg.memory.num_inner_steps, cfg.memory.pre_anchor_scale, cfg.diffusion.eps,
                       cfg.model.seq_len, cfg.model.vocab_size)
    reader = ReaderOptions(
        data_format=cfg.data.format, num_workers=cfg.data.num_workers, shuffle=cfg.data.shuffle,
        num_canonical_nodes=cfg.data.num_canonical_nodes, shuffle_block_size=cfg.data.shuffle_block_size,
        verify_hashes=cfg.data.verify_hashes, max_skipped_samples=cfg.data.max_skipped_samples,
        pin_memory=topology.device.type == "cuda",
    )
    _present_data_world_to_streaming(topology)
    readers_only = topology.tensor_parallel_size * topology.pipeline_parallel_size > 1
    return open_batches(root, manifest, spec, cfg.train.micro_batch_size, reader,
                        topology.data_parallel_rank, topology.data_parallel_size, state,
                        barrier_group=topology.data_parallel_group if readers_only else None)


_STREAMING_WORLD = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def _restored_environment(names):
    """Put ``names`` back as they were afterwards (a later run in this process must see its own world)."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _present_data_world_to_streaming(topology: Topology) -> None:
    """mosaicml-streaming takes its world from RANK / WORLD_SIZE / LOCAL_*; only the reading ranks
    (one per model replica) read, so present it the data-parallel world instead."""
    if topology.tensor_parallel_size * topology.pipeline_parallel_size == 1:
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", topology.world_size))
    readers_per_node = max(1, local_world // topology.tensor_parallel_size)
    os.environ.update(
        RANK=str(topology.data_parallel_rank), WORLD_SIZE=str(topology.data_parallel_size),
        LOCAL_RANK=str(topology.data_parallel_rank % readers_per_node),
        LOCAL_WORLD_SIZE=str(min(readers_per_node, topology.data_parallel_size)),
    )


def _check_resumable(checkpoint: Path, config_record: dict) -> None:
    saved = json.loads((checkpoint / "config.json").read_text())
    for section in ("model", "memory", "diffusion"):
        if saved.get(section) != config_record.get(section):
            raise ConfigError(
                f"{checkpoint} was trained with a different [{section}] config; resume with the same "
                f"--{section}.* options, pass --train.resume false to start over, or use a new --train.out_dir"
            )


def _prepare_data(cfg: RunConfig, topology: Topology):
    """Rank 0 prepares raw input if needed while the others wait; then every rank reads the manifest."""
    args = (cfg.data.path, cfg.data.tokenizer, cfg.model.seq_len, cfg.model.vocab_size, cfg.data.cache_dir)
    if topology.world_size > 1:
        failure = None
        if topology.is_main:
            try:
                resolve_dataset(*args, prepare=True, prepare_workers=cfg.data.prepare_workers)
            except Exception as err:  # re-raised after the barrier, so no rank waits forever
                failure = err
        dist.barrier()
        if failure is not None:
            raise failure
    return resolve_dataset(*args, prepare=topology.is_main, prepare_workers=cfg.data.prepare_workers)
