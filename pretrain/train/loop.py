"""The optimizer steps of one run: data -> step -> judge -> log -> evaluate -> checkpoint, each one call.

The loop owns no state of its own that outlives it: the trainer's position is a ``TrainState`` and the
data's a ``DataFeed``, both registered with the checkpointer; the engine holds the weights and the
optimizer. A rejected update (the step guard's verdict, in the step's statistics) leaves the weights and
the learning-rate schedule as they were; too many in a row roll back to the newest good checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from data_pipeline.mixture import Source
from parallel.checkpoint.checkpointer import TRAIN_PART, Checkpointer
from parallel.topology import Topology
from pretrain.config import RunConfig, computes_in_bf16
from pretrain.eval.heldout import bits
from pretrain.memdlm.bilevel import uses_memory_at
from pretrain.model.routing import ROUTING_PART
from pretrain.train.data_feed import DataFeed, Validation, has_validation
from pretrain.train.flops import executed_flops, model_flops_per_token, peak_flops
from pretrain.train.optim import learning_rate
from pretrain.train.resilience import DONE, REQUEUE, BadSteps, TrainingStopped, Watchdog, clear_markers, write_marker
from pretrain.train.state import TrainState


class TrainingLoop:
    """The steps from ``state.step`` to ``--train.steps``, with their logging, evaluation and checkpoints."""

    def __init__(self, cfg: RunConfig, topology: Topology, engine, feed: DataFeed, checkpointer: Checkpointer,
                 logger, state: TrainState, checkpoint: Path | None, sources: list[Source]):
        self.cfg, self.topology, self.engine, self.feed = cfg, topology, engine, feed
        self.sources, self.validation = sources, None
        self.source_names = [s.name for s in sources] if len(sources) > 1 else []
        self.checkpointer, self.logger = checkpointer, logger
        self.state = state
        self.start_step = state.step
        self.saved = checkpoint
        self.stopped_early = False
        self.bad_steps = BadSteps(cfg.guard.max_bad_steps_in_row, cfg.guard.max_bad_steps, state)
        self.watchdog = Watchdog(cfg.guard.step_timeout_s)
        self.eval_every = cfg.eval.every if has_validation(sources) else 0
        if cfg.eval.every and not self.eval_every:
            logger.write(f"held-out evaluation is off: {sources[0].root} has no validation split (prepare the data "
                         "with memdlm-prepare-data --val-fraction F, or set --data.val_fraction for raw input)")
        self.losses, self.step_seconds, self.skipped_samples = [], [], 0
        self.last_eval: dict = {}  # the newest held-out record (``eval_*`` keys and its step)
        self.pending, self.flushed_at = [], time.perf_counter()
        self.accumulation = cfg.train.global_batch_size // (cfg.train.micro_batch_size * topology.data_parallel_size)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
        self.model_flops = self.tokens_per_step * model_flops_per_token(cfg.model)
        if cfg.logging.peak_tflops > 0:
            self.peak, source = cfg.logging.peak_tflops * 1e12, "--logging.peak_tflops"
        else:
            self.peak, source = peak_flops(topology.device, computes_in_bf16(cfg.train.precision))
        logger.write(f"MFU is measured against {self.peak / 1e12:.1f} TFLOP/s per rank ({source})")

    @property
    def completed(self) -> int:
        return self.state.step

    def run(self, stop_requested: Callable[[], bool]) -> None:
        cfg, checkpointer, out_dir = self.cfg, self.checkpointer, Path(self.cfg.train.out_dir)
        if self.topology.is_main:
            clear_markers(out_dir)
        self.watchdog.progress()
        try:
            for step in range(self.start_step, cfg.train.steps):
                stop = self.run_step(step, stop_requested)
                self.watchdog.progress()
                if cfg.checkpoint.asynchronous:
                    self.saved = checkpointer.poll() or self.saved
                if cfg.checkpoint.every and self.completed % cfg.checkpoint.every == 0:
                    self.save()
                    self.watchdog.progress()
                if stop and self.completed < cfg.train.steps:
                    self.stopped_early = True
                    self.logger.write(f"stop requested: saving a checkpoint at step {self.completed} and exiting")
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
            # A KeyboardInterrupt while stopping is a second Ctrl-C: stop at once (a save it cut short stays
            # in its staging folder). One without a stop request (``train`` called without the CLI's signal
            # handling) keeps what the completed steps trained; with several ranks the others may be gone,
            # so only a signal-driven stop saves collectively.
            if not self.stopped_early and self.topology.world_size == 1 and self.completed > self.start_step:
                self.save_if_new()
                self.logger.write(f"interrupted: saved a checkpoint at step {self.completed} in {self.saved}")
            raise

    def run_step(self, step: int, stop_requested: Callable[[], bool]) -> bool:
        """One optimizer step; its statistics stay on the device until the next ``flush``. Returns whether
        any rank was asked to stop."""
        cfg = self.cfg
        micro_batches = [self.feed.next() for _ in range(self.accumulation)]
        if self.completed + 1 < cfg.train.steps:
            self.feed.prefetch()  # the next step's first micro-batch travels while this step runs
        lr = learning_rate(self.state.updates, cfg.train.steps, cfg.optim)
        stats = self.engine.train_step(micro_batches, step, lr)
        self.state.step = step + 1
        self.skipped_samples += sum(mb.num_skipped for mb in micro_batches)
        # Executed FLOPs from the masked row counts the loader reported (each replica once).
        memory_step = uses_memory_at(cfg.memory, cfg.train.seed, step)
        flops = sum(executed_flops(cfg.model, cfg.memory, cfg.train.micro_batch_size, mb.row_counts,
                                   cfg.train.recompute, uses_memory=memory_step,
                                   expert_parallel_size=cfg.parallel.expert_parallel_size)
                    for mb in micro_batches) if self.topology.reads_data else 0.0
        counts = self.source_tokens(micro_batches)
        stop, flops, counts = _control(stop_requested(), flops, self.topology, counts)
        extra = self.judge(stats.verdict)
        balance = self.finish_routing(stats.verdict is None or stats.verdict.accepted)
        if balance is not None:
            extra["moe"] = balance  # a device tensor until ``flush`` reads it
        if self.source_names:
            for name, count in zip(self.source_names, counts):
                self.state.tokens_by_source[name] = self.state.tokens_by_source.get(name, 0) + int(count)
            extra["tokens_by_source"] = dict(self.state.tokens_by_source)
        if cfg.memory.enabled and cfg.memory.probability < 1.0:
            extra["memory_step"] = memory_step
        if self.eval_every and (self.completed % self.eval_every == 0 or self.completed == cfg.train.steps):
            extra.update(self.evaluate())
        self.pending.append((self.completed, stats, lr, self.skipped_samples, flops, extra))
        if len(self.pending) >= self.cfg.logging.every:
            self.flush()
        return stop

    def finish_routing(self, applied: bool):
        """The MoE layers' step (``pretrain.model.routing``): routed-token counts summed over the data, sequence
        and pipeline ranks, expert biases moved when the update was applied. ``None`` without MoE layers."""
        routing = getattr(self.engine.model, "routing", None)
        if routing is None or routing.counts.numel() == 0:
            return None
        topology = self.topology
        groups = [topology.data_parallel_group]
        if topology.sequence_parallel_size > 1:
            groups.append(topology.sequence_parallel_group)
        if topology.pipeline_parallel_size > 1:
            groups.append(topology.pipeline_parallel_group)
        return routing.finish_step(groups, applied)

    def source_tokens(self, micro_batches) -> list[float]:
        """A mixture's real tokens per source in this step's micro-batches (counted by the reading ranks)."""
        counts = [0.0] * len(self.source_names)
        if self.source_names and self.topology.reads_data:
            for batch in micro_batches:
                for source, tokens in batch.source_tokens or ():
                    counts[source] += tokens
        return counts

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
            if self.source_names:  # a source absent from the step has no loss (NaN)
                record["loss_by_source"] = {name: value for name, value in zip(self.source_names,
                                                                               values.loss_by_source)
                                            if math.isfinite(value)}
            record.update(extra)
            if "moe" in record:
                record["moe"] = self.engine.model.routing.describe(record["moe"])
            self.logger.log(record)
            self.losses.append(values.loss)
            self.step_seconds.append(seconds)
        self.pending = []

    def judge(self, verdict) -> dict:
        """Count an applied update, or a skipped one (and roll back after too many in a row)."""
        if verdict is None or verdict.accepted:
            self.state.updates += 1
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
        """Weights, optimizer state and schedule position of the newest good checkpoint; the data, the step
        count and the bad-step count go on."""
        self.saved = self.checkpointer.wait() or self.saved
        folder = self.checkpointer.newest_good()
        if folder is None:
            raise TrainingStopped(
                f"step {self.completed}: {self.bad_steps.in_row} updates in a row were skipped and there is no "
                "checkpoint to return to; save more often (--checkpoint.every) or lower the learning rate")
        saved = self.checkpointer.load(folder, self.engine, restore_registered=False)
        self.state.updates = TrainState.from_dict(saved.parts[TRAIN_PART]).updates
        if ROUTING_PART in saved.parts:  # the expert biases belong with the weights they were learnt for
            self.engine.model.routing.load_state_dict(saved.parts[ROUTING_PART])
        self.bad_steps.accepted()
        self.logger.write(f"step {self.completed}: {self.cfg.guard.max_bad_steps_in_row} skipped updates in a row: "
                          f"rolled back to {folder.name}; training goes on with the next data")
        return folder.name

    def evaluate(self) -> dict:
        """The held-out losses (``eval_*`` keys), with the evaluation's time kept out of the step time."""
        started = time.perf_counter()
        if self.validation is None:
            self.validation = Validation(self.cfg, self.topology, self.sources)
        validation = self.validation
        per_source = [self.engine.evaluate(batches, prompts).tolist()
                      for batches, prompts in zip(validation.batches, validation.prompts)]
        self.flushed_at += time.perf_counter() - started
        # One source: its losses. A mixture: the mean over the sources with a validation split, weighted by
        # their shares of the mixture (the mixture's expected held-out loss), and each source's own.
        total = sum(validation.weights)
        values = [sum(w * v[i] for w, v in zip(validation.weights, per_source)) / total for i in range(2)]
        record = {"eval_loss": values[0], "eval_bits_per_token": bits(values[0])}
        adapted = self.cfg.eval.adaptation
        if adapted:
            record.update(eval_adapted_loss=values[1], eval_adapted_bits_per_token=bits(values[1]))
        if self.source_names:
            record["eval_loss_by_source"] = {n: v[0] for n, v in zip(validation.names, per_source)}
            if adapted:
                record["eval_adapted_loss_by_source"] = {n: v[1] for n, v in zip(validation.names, per_source)}
        self.last_eval = {"step": self.completed, **record}
        return record

    def save(self) -> None:
        self.flush()
        report = self.checkpointer.save(self.completed, self.engine)
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


def _control(stop: bool, flops: float, topology: Topology, counts: list[float]) -> tuple[bool, float, list[float]]:
    """The step's one control message: whether any rank was asked to stop (a signal may reach only some
    ranks), and the executed FLOPs and a mixture's tokens per source summed over the replicas. A small
    all-reduce on the CPU (gloo) control group, so it never waits on a GPU."""
    if topology.world_size == 1:
        return stop, flops, counts
    values = torch.tensor([1.0 if stop else 0.0, flops, *counts], dtype=torch.float64)
    dist.all_reduce(values, group=topology.control_group)
    return bool(values[0] > 0), float(values[1]), values[2:].tolist()
