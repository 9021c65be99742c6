"""The training loop: load -> step -> log -> checkpoint, each one call.

Layouts: the engine (``pretrain.factory``) decides how a step runs (one replica, DeepSpeed data
parallelism, or pipeline stages); tensor parallelism lives in the model's layers. Each model
replica reads its data on one rank and broadcasts it to the rest of the replica
(``pretrain.training_data``); rank 0 alone writes metrics, the progress bar and wandb, and holds the
run directory's lock. Checkpoints are sharded and resume at any layout (``pretrain.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from parallel.topology import Topology, initialize_topology
from pretrain.checkpoint import Checkpointer
from pretrain.config import ConfigError, RunConfig
from pretrain.cpu_memory import keep_freed_memory
from pretrain.factory import build_model, build_training, check_run_layout
from pretrain.flops import executed_flops, model_flops_per_token, peak_flops
from pretrain.hf_import import load_hf_weights, resolve_init_from
from pretrain.metrics import MetricsLogger, NullLogger
from pretrain.model import count_parameters, full_parameter_count
from pretrain.optim import learning_rate
from pretrain.resilience import DONE, REQUEUE, BadSteps, TrainingStopped, Watchdog, clear_markers, write_marker
from pretrain.run_lock import RunDirectoryBusy, RunLock
from pretrain.evaluation import bits
from pretrain.training_data import (
    STREAMING_WORLD,
    ReplicaBatches,
    Validation,
    data_state_for,
    prepare_data,
    restored_environment,
)


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
    resumed_from: Path | None = None


def train(cfg: RunConfig, stop_requested: Callable[[], bool] = lambda: False) -> TrainSummary:
    """Train ``cfg`` to ``cfg.train.steps`` (resuming from the newest intact checkpoint), stopping early
    and saving when ``stop_requested()`` turns true on any rank."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    cfg = resolve_init_from(cfg)
    topology: Topology = initialize_topology(
        cfg.train.device, cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size, cfg.model.num_layers
    )
    check_run_layout(cfg, topology.world_size)
    lock = _lock_run_directory(Path(cfg.train.out_dir), topology)
    try:
        with restored_environment(STREAMING_WORLD):
            return _train(cfg, topology, stop_requested)
    finally:
        lock.release()


def _lock_run_directory(out_dir: Path, topology: Topology) -> RunLock:
    """Rank 0 takes the run directory's lock; every rank learns whether it got it."""
    lock, failure = RunLock(out_dir), [None]
    if topology.is_main:
        try:
            lock.acquire()
        except RunDirectoryBusy as err:
            failure = [err]
    if topology.world_size > 1:
        dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise failure[0]
    return lock


def _train(cfg: RunConfig, topology: Topology, stop_requested: Callable[[], bool]) -> TrainSummary:
    started = time.perf_counter()
    if topology.device.type == "cpu":
        keep_freed_memory()
    out_dir = Path(cfg.train.out_dir)

    # 1. The prepared dataset (raw input is prepared on first use, by rank 0 alone); the model's
    #    mask token comes from its tokenizer unless set.
    data_root, manifest = prepare_data(cfg, topology)
    tokenizer_file = data_root / manifest["tokenizer"]
    mask_id = cfg.model.mask_token_id if cfg.model.mask_token_id >= 0 else manifest["mask_token_id"]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mask_token_id=mask_id))
    config_record = {**cfg.to_dict(), "tokens": {"mask_token_id": mask_id, "eot_token_id": manifest["eot_token_id"],
                                                  "pad_token_id": manifest["pad_token_id"]},
                     "dataset": {"path": str(data_root), "num_samples": manifest["num_samples"],
                                 "num_tokens": manifest["num_tokens"]}}
    logger = MetricsLogger(out_dir, cfg.logging, config_record, cfg.train.steps) if topology.is_main else NullLogger()
    checkpointer = Checkpointer(out_dir, topology, config_record, tokenizer_file, cfg.checkpoint.keep,
                                cfg.checkpoint.asynchronous, cfg.checkpoint.verify_hashes, log=logger.write)
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
        start_step, data_state, state = 0, None, {}
        if checkpoint is not None:
            state = checkpointer.load(checkpoint, engine)
            start_step = state["step"]
            data_state = data_state_for(state["data"], cfg.data.format, topology.data_parallel_rank)
        if start_step >= cfg.train.steps:
            raise ConfigError(
                f"--train.steps {cfg.train.steps}: {out_dir} already holds a checkpoint at step {start_step}; "
                "raise --train.steps to continue, or use a new --train.out_dir"
            )
        logger.start(start_step)

        # 4. This replica's micro-batches, masked in loader workers on its reading rank.
        batches = ReplicaBatches(cfg, topology, data_root, manifest, data_state)
        logger.write(
            f"model: {full_parameter_count(cfg.model) / 1e6:.2f}M parameters ({local_parameters / 1e6:.2f}M on "
            f"this rank), memory {'on' if cfg.memory.enabled else 'off'}; layout: {topology.world_size} ranks = "
            f"tensor {topology.tensor_parallel_size} x pipeline {topology.pipeline_parallel_size} x data "
            f"{topology.data_parallel_size} (ZeRO {cfg.parallel.zero_stage}); data: {manifest['num_samples']} "
            f"samples of {cfg.model.seq_len} tokens ({cfg.data.format}) in {data_root}"
            + (f"; resumed from {checkpoint} at step {start_step}" if checkpoint else "")
            + (f"; weights from {cfg.model.init_from}" if checkpoint is None and cfg.model.init_from else "")
        )

        # 5. The loop.
        loop = _Loop(cfg, topology, engine, batches, checkpointer, logger, start_step, checkpoint, data_root, manifest,
                     state)
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
    )


class _Loop:
    """The optimizer steps of one run, with their logging and checkpoints."""

    def __init__(self, cfg: RunConfig, topology: Topology, engine, batches: ReplicaBatches,
                 checkpointer: Checkpointer, logger, start_step: int, checkpoint: Path | None, data_root: Path,
                 manifest: dict, trainer_state: dict | None = None):
        self.cfg, self.topology, self.engine, self.batches = cfg, topology, engine, batches
        self.data_root, self.manifest, self.validation = data_root, manifest, None
        self.checkpointer, self.logger = checkpointer, logger
        self.start_step = self.completed = start_step
        self.saved = checkpoint
        self.stopped_early = False
        trainer_state = trainer_state or {}
        # Applied updates: the learning-rate schedule's position (a skipped step does not advance it).
        self.updates = trainer_state.get("updates", start_step)
        self.bad_steps = BadSteps(cfg.guard.max_bad_steps_in_row, cfg.guard.max_bad_steps,
                                  trainer_state.get("bad_steps", 0))
        self.watchdog = Watchdog(cfg.guard.step_timeout_s)
        self.eval_every = cfg.eval.every if manifest.get("validation") else 0
        if cfg.eval.every and not self.eval_every:
            logger.write(f"held-out evaluation is off: {data_root} has no validation split (prepare the data with "
                         "memdlm-prepare-data --val-fraction F, or set --data.val_fraction for raw input)")
        self.losses, self.step_seconds, self.skipped_samples = [], [], 0
        self.pending, self.flushed_at = [], time.perf_counter()
        self.accumulation = cfg.train.global_batch_size // (cfg.train.micro_batch_size * topology.data_parallel_size)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
        self.model_flops = self.tokens_per_step * model_flops_per_token(cfg.model)
        if cfg.logging.peak_tflops > 0:
            self.peak, source = cfg.logging.peak_tflops * 1e12, "--logging.peak_tflops"
        else:
            self.peak, source = peak_flops(topology.device, cfg.train.precision == "bf16")
        logger.write(f"MFU is measured against {self.peak / 1e12:.1f} TFLOP/s per rank ({source})")

    def run(self, stop_requested: Callable[[], bool]) -> None:
        cfg, checkpointer, out_dir = self.cfg, self.checkpointer, Path(self.cfg.train.out_dir)
        if self.topology.is_main:
            clear_markers(out_dir)
        self.watchdog.progress()
        try:
            for step in range(self.start_step, cfg.train.steps):
                stop = self.step(step, stop_requested)
                self.watchdog.progress()
                if cfg.checkpoint.asynchronous:
                    self.saved = checkpointer.poll() or self.saved
                if cfg.checkpoint.every and self.completed % cfg.checkpoint.every == 0:
                    self.save()
                    self.watchdog.progress()
                if stop and self.completed < cfg.train.steps:
                    self.logger.write(f"stop requested: saving a checkpoint at step {self.completed} and exiting")
                    self.stopped_early = True
                    break
            self.flush()
            self.save_if_new()
            self.watchdog.stop()
            if self.topology.is_main:
                if self.stopped_early:
                    write_marker(out_dir, REQUEUE, self.completed)
                else:
                    write_marker(out_dir, DONE, self.completed, checkpoint=self.saved.name if self.saved else None)
        except KeyboardInterrupt:
            self.flush()
            # Nothing lost: keep what the completed steps trained (single process; with several
            # ranks the others may be gone, so only a signal-driven stop saves collectively).
            if self.topology.world_size == 1 and self.completed > self.start_step:
                self.save_if_new()
                self.logger.write(f"interrupted: saved a checkpoint at step {self.completed} in {self.saved}")
            raise

    def step(self, step: int, stop_requested: Callable[[], bool]) -> bool:
        """One optimizer step; its statistics stay on the device until the next ``flush``. Returns whether
        any rank was asked to stop."""
        cfg = self.cfg
        micro_batches = [self.batches.next() for _ in range(self.accumulation)]
        if self.completed + 1 < cfg.train.steps:
            self.batches.prefetch()  # the next step's first micro-batch travels while this step runs
        lr = learning_rate(self.updates, cfg.train.steps, cfg.optim)
        stats = self.engine.train_step(micro_batches, step, lr)
        self.completed = step + 1
        verdict = self.engine.guard.finish() if self.engine.guard is not None else None
        self.skipped_samples += sum(mb.num_skipped for mb in micro_batches)
        # Executed FLOPs from the masked row counts the loader reported (each replica once).
        flops = sum(executed_flops(cfg.model, cfg.memory, cfg.train.micro_batch_size, mb.row_counts,
                                   cfg.train.recompute) for mb in micro_batches) if self.topology.reads_data else 0.0
        stop, flops = _control(stop_requested(), flops, self.topology)
        extra = self.judge(verdict)
        if self.eval_every and (self.completed % self.eval_every == 0 or self.completed == cfg.train.steps):
            extra.update(self.evaluate())
        self.pending.append((self.completed, stats, lr, self.skipped_samples, flops, extra))
        if len(self.pending) >= self.cfg.logging.every:
            self.flush()
        return stop

    def flush(self) -> None:
        """Read the pending steps' statistics (one host synchronisation) and log a line for each."""
        if not self.pending:
            return
        now = time.perf_counter()
        seconds = (now - self.flushed_at) / len(self.pending)
        self.flushed_at = now
        for completed, stats, lr, skipped, flops, extra in self.pending:
            values = stats.host()
            capacity = seconds * self.peak * self.topology.world_size
            record = {"step": completed, "loss": values.loss, "inner_losses": values.inner_losses,
                      "lr": lr, "grad_norm": values.grad_norm,
                      "tokens_per_s": self.tokens_per_step / seconds, "step_seconds": seconds,
                      "flops": flops, "mfu_total": flops / capacity, "mfu_model": self.model_flops / capacity}
            if self.cfg.data.format == "webdataset":
                record["skipped_samples"] = skipped
            record.update(extra)
            self.logger.log(record)
            self.losses.append(values.loss)
            self.step_seconds.append(seconds)
        self.pending = []

    def judge(self, verdict) -> dict:
        """Count an applied update, or a skipped one (and roll back after too many in a row)."""
        if verdict is None or verdict.accepted:
            self.updates += 1
            self.bad_steps.accepted()
            return {}
        self.logger.write(f"step {self.completed}: update skipped on every rank ({verdict.reason}); weights, "
                          "optimizer state and learning-rate schedule unchanged")
        roll_back = self.bad_steps.rejected(self.completed, verdict.reason)
        record = {"skipped_update": verdict.reason, "bad_steps": self.bad_steps.total}
        if roll_back:
            record["rolled_back_to"] = self.roll_back()
        return record

    def roll_back(self) -> str:
        """Weights, optimizer state and schedule position of the newest good checkpoint; the data goes on."""
        self.saved = self.checkpointer.wait() or self.saved
        folder = self.checkpointer.newest_good()
        if folder is None:
            raise TrainingStopped(
                f"step {self.completed}: {self.bad_steps.in_row} updates in a row were skipped and there is no "
                "checkpoint to return to; save more often (--checkpoint.every) or lower the learning rate")
        state = self.checkpointer.load(folder, self.engine)
        self.updates = state.get("updates", state["step"])
        self.bad_steps.accepted()
        self.logger.write(f"step {self.completed}: {self.cfg.guard.max_bad_steps_in_row} skipped updates in a row: "
                          f"rolled back to {folder.name}; training goes on with the next data")
        return folder.name

    def evaluate(self) -> dict:
        """The held-out losses (``eval_*`` keys), with the evaluation's time kept out of the step time."""
        started = time.perf_counter()
        if self.validation is None:
            self.validation = Validation(self.cfg, self.topology, self.data_root, self.manifest)
        values = self.engine.evaluate(self.validation.batches, self.validation.prompts).tolist()
        self.flushed_at += time.perf_counter() - started
        record = {"eval_loss": values[0], "eval_bits_per_token": bits(values[0])}
        if self.validation.prompts is not None:
            record.update(eval_adapted_loss=values[1], eval_adapted_bits_per_token=bits(values[1]))
        return record

    def save(self) -> None:
        self.flush()
        report = self.checkpointer.save(self.completed, self.engine, {
            "data": self.batches.states(), "updates": self.updates, "bad_steps": self.bad_steps.total, "layout": {**self.topology.layout, "zero_stage": self.cfg.parallel.zero_stage}})
        if report.pending:
            self.logger.write(f"checkpoint at step {self.completed}: state copied in {report.seconds:.2f} s, "
                              "writing in the background")
        elif report.folder is not None:
            self.logger.write(f"checkpoint {report.folder.name} saved in {report.seconds:.2f} s")
            self.saved = report.folder

    def save_if_new(self) -> None:
        """Finish a pending save; save the last completed step unless that is what was saved."""
        self.saved = self.checkpointer.wait() or self.saved
        if self.saved is None or self.saved.name != f"step_{self.completed:06d}":
            self.save()
            self.saved = self.checkpointer.wait() or self.saved


def _control(stop: bool, flops: float, topology: Topology) -> tuple[bool, float]:
    """The step's one control message: whether any rank was asked to stop (a signal may reach only some
    ranks), and the executed FLOPs summed over the replicas. A small all-reduce on the CPU (gloo)
    control group, so it never waits on a GPU."""
    if topology.world_size == 1:
        return stop, flops
    values = torch.tensor([1.0 if stop else 0.0, flops], dtype=torch.float64)
    dist.all_reduce(values, group=topology.control_group)
    return bool(values[0] > 0), float(values[1])


def _check_resumable(checkpoint: Path, config_record: dict) -> None:
    saved = json.loads((checkpoint / "config.json").read_text())
    for section in ("model", "memory", "diffusion"):
        if saved.get(section) != config_record.get(section):
            raise ConfigError(
                f"{checkpoint} was trained with a different [{section}] config; resume with the same "
                f"--{section}.* options, pass --train.resume false to start over, or use a new --train.out_dir"
            )


