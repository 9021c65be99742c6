"""Training a run: set up (layout check, process groups, run-directory lock, data, model, engine,
checkpoint), hand over to the loop (``pretrain.train.loop``), summarise.

Layouts: the engine (``pretrain.train.factory``) decides how a step runs (one replica, DeepSpeed data
parallelism, or pipeline stages); tensor parallelism lives in the model's layers. Each model
replica reads its data on one rank and broadcasts it to the rest of the replica
(``pretrain.train.data_feed``); rank 0 alone writes metrics, the progress bar and wandb, and holds the
run directory's lock. Checkpoints are sharded and resume at any layout (``parallel.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from common.errors import UsageError
from data_pipeline.mixture import proportions
from parallel.checkpoint.checkpointer import TRAIN_PART, Checkpointer
from parallel.topology import Topology, initialize_topology, launched_world_size
from pretrain.config import ConfigError, RunConfig
from pretrain.hf.importer import check_data_tokenizer, load_hf_weights, resolve_init_from
from pretrain.model.routing import ROUTING_PART
from pretrain.model.transformer import count_parameters, full_parameter_count
from pretrain.train.cpu_memory import keep_freed_memory
from pretrain.train.data_feed import STREAMING_WORLD, DataFeed, prepare_data, restored_environment
from pretrain.train.factory import build_model, build_training, check_run_layout
from pretrain.train.loop import TrainingLoop
from pretrain.train.metrics import MetricsLogger, NullLogger
from pretrain.train.run_directory import start_over
from pretrain.train.run_lock import RunLock
from pretrain.train.state import TrainState


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
    losses: list[float]  # this attempt's steps only
    resumed_from: Path | None = None
    start_step: int = 0  # the step this attempt started from (0, or the checkpoint's)
    last_eval: dict = field(default_factory=dict)  # the newest held-out losses (``eval_*`` and ``step``)

    @property
    def steps_this_attempt(self) -> int:
        return self.steps_done - self.start_step


def train(cfg: RunConfig, stop_requested: Callable[[], bool] = lambda: False) -> TrainSummary:
    """Train ``cfg`` to ``cfg.train.steps`` (resuming from the newest intact checkpoint), stopping early
    and saving when ``stop_requested()`` turns true on any rank."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    cfg = resolve_init_from(cfg)
    check_run_layout(cfg, launched_world_size())  # the one layout check of a start, before any group exists
    topology: Topology = initialize_topology(
        cfg.train.device, cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size,
        sequence_parallel_size=cfg.parallel.sequence_parallel_size,
        expert_parallel_size=cfg.parallel.expert_parallel_size,
    )
    lock = _lock_run_directory(Path(cfg.train.out_dir), topology)
    try:
        if not cfg.train.resume:
            _on_main(topology, lambda: _start_over(Path(cfg.train.out_dir), cfg.train.overwrite))
        with restored_environment(STREAMING_WORLD):
            return _train(cfg, topology, stop_requested)
    finally:
        lock.release()


def _on_main(topology: Topology, action) -> None:
    """Run ``action`` on rank 0; a usage error it raises is raised on every rank (no rank waits forever)."""
    failure = [None]
    if topology.is_main:
        try:
            action()
        except UsageError as err:
            failure = [err]
    if topology.world_size > 1:
        dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise failure[0]


def _lock_run_directory(out_dir: Path, topology: Topology) -> RunLock:
    """Rank 0 takes the run directory's lock; every rank learns whether it got it."""
    lock = RunLock(out_dir)
    _on_main(topology, lock.acquire)
    return lock


def _start_over(out_dir: Path, overwrite: bool) -> None:
    aside = start_over(out_dir, overwrite)
    if aside is not None:
        print(f"--train.overwrite: the run that was in {out_dir} is now in {aside}", flush=True)


def _train(cfg: RunConfig, topology: Topology, stop_requested: Callable[[], bool]) -> TrainSummary:
    started = time.perf_counter()
    if topology.device.type == "cpu":
        keep_freed_memory()
    out_dir = Path(cfg.train.out_dir)

    # 1. The prepared dataset (raw input is prepared on first use, by rank 0 alone); the model's
    #    mask token comes from its tokenizer unless set.
    sources = prepare_data(cfg, topology)
    if cfg.model.init_from:
        check_data_tokenizer(Path(cfg.model.init_from), sources)
    data_root, manifest = sources[0].root, sources[0].manifest
    tokenizer_file = data_root / manifest["tokenizer"]
    mask_id = cfg.model.mask_token_id if cfg.model.mask_token_id >= 0 else manifest["mask_token_id"]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mask_token_id=mask_id))
    config_record = {**cfg.to_dict(), "tokens": {"mask_token_id": mask_id, "eot_token_id": manifest["eot_token_id"],
                                                  "pad_token_id": manifest["pad_token_id"]},
                     "dataset": {"path": str(data_root), "num_samples": manifest["num_samples"],
                                 "num_tokens": manifest["num_tokens"],
                                 "tokenizer_sha256": sources[0].tokenizer_sha256}}
    if len(sources) > 1:
        config_record["dataset"]["sources"] = [
            {"name": s.name, "path": str(s.root), "num_samples": s.manifest["num_samples"], "proportion": share}
            for s, share in zip(sources, proportions(sources))]
    logger = MetricsLogger(out_dir, cfg.logging, config_record, cfg.train.steps) if topology.is_main else NullLogger()
    # What a checkpoint carries besides the engine's tensors: the trainer's state and the data positions.
    state, feed = TrainState(), DataFeed(cfg, topology, sources)
    checkpointer = Checkpointer(out_dir, topology, config_record, tokenizer_file, cfg.checkpoint.keep,
                                cfg.checkpoint.asynchronous, cfg.checkpoint.verify_hashes, log=logger.write,
                                layout={**topology.layout, "zero_stage": cfg.parallel.zero_stage})
    checkpointer.register(TRAIN_PART, state)
    checkpointer.register("data", feed)
    with logger:
        # 2. Where the run starts: the newest intact checkpoint (whatever layout saved it), else the
        #    weights of --model.init_from, else the seed.
        checkpoint = checkpointer.newest_good() if cfg.train.resume else None
        if checkpoint is not None:
            _check_resumable(checkpoint, config_record)

        # 3. This rank's part of the model, the step, and the engine that runs it on this layout.
        model = build_model(cfg, topology)
        local_parameters = count_parameters(model)  # before an engine partitions them
        if checkpoint is None and cfg.model.init_from:
            load_hf_weights(model, Path(cfg.model.init_from), cfg.model, topology.tensor_parallel_size,
                            topology.tensor_parallel_rank)
        engine = build_training(cfg, topology, mask_id, model).engine
        if cfg.model.moe_num_experts:
            checkpointer.register(ROUTING_PART, model.routing)  # the expert biases
        if checkpoint is not None:
            checkpointer.load(checkpoint, engine)  # weights, optimizer, ``state`` and the data positions
        if state.step >= cfg.train.steps:
            raise ConfigError(
                f"--train.steps {cfg.train.steps}: {out_dir} already holds a checkpoint at step {state.step}; "
                "raise --train.steps to continue, or use a new --train.out_dir"
            )
        logger.start(state.step)

        # 4. This replica's micro-batches, masked in loader workers on its reading rank.
        feed.start()
        logger.write(
            f"model: {full_parameter_count(cfg.model) / 1e6:.2f}M parameters ({local_parameters / 1e6:.2f}M on "
            f"this rank), memory {'on' if cfg.memory.enabled else 'off'}; layout: {topology.world_size} ranks = "
            f"tensor {topology.tensor_parallel_size}"
            + (f" x sequence {topology.sequence_parallel_size}" if topology.sequence_parallel_size > 1 else "")
            + f" x pipeline {topology.pipeline_parallel_size} x data "
            f"{topology.data_parallel_size} (ZeRO {cfg.parallel.zero_stage}); data: {manifest['num_samples']} "
            f"samples of {cfg.model.seq_len} tokens ({cfg.data.format}) in {data_root}"
            + (f" and {len(sources) - 1} more source(s)" if len(sources) > 1 else "")
            + (f"; resumed from {checkpoint} at step {state.step}" if checkpoint else "")
            + (f"; weights from {cfg.model.init_from}" if checkpoint is None and cfg.model.init_from else "")
        )

        # 5. The loop.
        loop = TrainingLoop(cfg, topology, engine, feed, checkpointer, logger, state, checkpoint, sources)
        loop.run(stop_requested)

    timed = loop.step_seconds[1:] or loop.step_seconds
    losses = [x for x in loop.losses if math.isfinite(x)] or loop.losses  # a skipped step's loss may be nan
    head, tail = losses[:10], losses[-10:]
    return TrainSummary(
        out_dir=out_dir, steps_done=loop.completed, first_loss=losses[0], last_loss=losses[-1],
        first_losses_mean=sum(head) / len(head), last_losses_mean=sum(tail) / len(tail),
        tokens_per_s=loop.tokens_per_step * len(timed) / sum(timed), seconds=time.perf_counter() - started,
        num_parameters=full_parameter_count(cfg.model), checkpoint=loop.saved, metrics_file=out_dir / "metrics.jsonl",
        wandb_dir=logger.wandb_dir, stopped_early=loop.stopped_early, losses=loop.losses, resumed_from=checkpoint,
        start_step=loop.start_step, last_eval=loop.last_eval,
    )


def _check_resumable(checkpoint: Path, config_record: dict) -> None:
    """The checkpoint's model, memory and diffusion settings are this run's (a setting the checkpoint's version
    did not have counts as its default), and its data used the same vocabulary."""
    saved = json.loads((checkpoint / "config.json").read_text())
    defaults = RunConfig().to_dict()
    for section in ("model", "memory", "diffusion"):
        current = config_record.get(section, {})
        recorded = {**defaults.get(section, {}), **saved.get(section, {})}
        differing = sorted(k for k in set(current) | set(recorded) if current.get(k) != recorded.get(k))
        if differing:
            raise ConfigError(
                f"{checkpoint} was trained with a different [{section}] config ({', '.join(differing[:6])}); "
                f"resume with the same --{section}.* options, or start over with --train.resume false "
                "--train.overwrite true, or use a new --train.out_dir")
    old_vocabulary = saved.get("dataset", {}).get("tokenizer_sha256")
    new_vocabulary = config_record.get("dataset", {}).get("tokenizer_sha256")
    if old_vocabulary and new_vocabulary and old_vocabulary != new_vocabulary:
        raise ConfigError(f"{checkpoint} was trained on data tokenized with another vocabulary than "
                          f"{config_record['dataset']['path']}; resume on data prepared with the run's tokenizer")


