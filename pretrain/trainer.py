"""The training loop: load -> step -> optimizer -> log -> checkpoint, each one call."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from data_pipeline.loader import ReaderOptions, open_batches
from data_pipeline.readers import MaskingSpec
from data_pipeline.source import resolve_dataset
from parallel.topology import Topology, initialize_topology
from pretrain.bilevel import BilevelStep
from pretrain.checkpoint import latest_checkpoint, load_model_weights, load_trainer_state, save_checkpoint
from pretrain.config import ConfigError, RunConfig
from pretrain.cpu_memory import keep_freed_memory
from pretrain.fast_weights import build_fast_weight_plan
from pretrain.metrics import MetricsLogger
from pretrain.model import DiffusionTransformer, count_parameters
from pretrain.objective import LossNormalizer
from pretrain.optim import build_optimizer, learning_rate, set_learning_rate


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


def _autocast(cfg: RunConfig, device: torch.device):
    if cfg.train.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: RunConfig, stop_requested: Callable[[], bool] = lambda: False) -> TrainSummary:
    started = time.perf_counter()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    topology: Topology = initialize_topology(cfg.train.device)
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

    # 2. Model, fast-weight plan, step, optimizer.
    torch.manual_seed(cfg.train.seed)
    model = DiffusionTransformer(cfg.model).to(device)
    plan = build_fast_weight_plan(
        cfg.model, cfg.memory, topology.tensor_parallel_size, topology.tensor_parallel_rank,
        topology.tensor_parallel_group,
    )
    step_fn = BilevelStep(model, plan, cfg.memory, cfg.diffusion, mask_id, cfg.data.document_attention)
    optimizer = build_optimizer(model, cfg.optim)

    # 3. Resume from the latest checkpoint of this out_dir.
    start_step = 0
    data_state = None
    checkpoint = latest_checkpoint(out_dir) if cfg.train.resume else None
    if checkpoint is not None:
        _check_resumable(checkpoint, config_record)
        load_model_weights(model, checkpoint)
        state = load_trainer_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        data_state = state.get("data")
        torch.set_rng_state(state["torch_rng"])
    if start_step >= cfg.train.steps:
        raise ConfigError(
            f"--train.steps {cfg.train.steps}: {out_dir} already holds a checkpoint at step {start_step}; "
            "raise --train.steps to continue, or use a new --train.out_dir"
        )

    # 4. Micro-batches of this rank, masked in loader workers; the stream is fixed by the seed.
    accumulation = cfg.train.global_batch_size // cfg.train.micro_batch_size
    spec = MaskingSpec(cfg.train.seed, cfg.memory.num_inner_steps, cfg.memory.pre_anchor_scale, cfg.diffusion.eps,
                       cfg.model.seq_len, cfg.model.vocab_size)
    reader = ReaderOptions(
        data_format=cfg.data.format, num_workers=cfg.data.num_workers, shuffle=cfg.data.shuffle,
        num_canonical_nodes=cfg.data.num_canonical_nodes, shuffle_block_size=cfg.data.shuffle_block_size,
        verify_hashes=cfg.data.verify_hashes, max_skipped_samples=cfg.data.max_skipped_samples,
        pin_memory=device.type == "cuda",
    )
    data = open_batches(data_root, manifest, spec, cfg.train.micro_batch_size, reader,
                        topology.data_parallel_rank, topology.data_parallel_size, data_state)
    batches = iter(data)

    logger = MetricsLogger(out_dir, cfg.logging, config_record, cfg.train.steps, start_step)
    logger.write(
        f"model: {count_parameters(model) / 1e6:.2f}M parameters, memory {'on' if cfg.memory.enabled else 'off'}; "
        f"data: {manifest['num_samples']} samples of {cfg.model.seq_len} tokens ({cfg.data.format}) in {data_root}"
        + (f"; resumed from {checkpoint}" if checkpoint else "")
    )
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
    losses, step_seconds = [], []
    saved = checkpoint
    completed = start_step
    stopped_early = False

    skipped_samples = 0

    def save(at_step: int) -> Path:
        return save_checkpoint(
            out_dir, at_step, model, optimizer, config_record, tokenizer_file,
            {"step": at_step, "torch_rng": torch.get_rng_state(), "data": data.state_dict()},
        )

    try:
        for step in range(start_step, cfg.train.steps):
            tick = time.perf_counter()
            micro_batches = [next(batches).to(device, non_blocking=True) for _ in range(accumulation)]
            record = _optimizer_step(cfg, step, micro_batches, model, step_fn, optimizer, device)
            completed = step + 1
            skipped_samples += sum(mb.num_skipped for mb in micro_batches)
            if cfg.data.format == "webdataset":
                record["skipped_samples"] = skipped_samples
            seconds = time.perf_counter() - tick
            record["tokens_per_s"] = tokens_per_step / seconds
            record["step_seconds"] = seconds
            logger.log(record)
            losses.append(record["loss"])
            step_seconds.append(seconds)
            if cfg.train.checkpoint_every and completed % cfg.train.checkpoint_every == 0:
                saved = save(completed)
            if stop_requested() and completed < cfg.train.steps:
                logger.write(f"stop requested: saving a checkpoint at step {completed} and exiting")
                stopped_early = True
                break
        if saved is None or saved.name != f"step_{completed:06d}":
            saved = save(completed)
    except BaseException:
        # Nothing lost on failure: keep what the completed steps trained.
        if completed > start_step and (saved is None or saved.name != f"step_{completed:06d}"):
            saved = save(completed)
            logger.write(f"interrupted: saved a checkpoint at step {completed} in {saved}")
        logger.close()
        raise
    logger.close()

    timed = step_seconds[1:] or step_seconds
    head, tail = losses[:10], losses[-10:]
    return TrainSummary(
        out_dir=out_dir,
        steps_done=completed,
        first_loss=losses[0],
        last_loss=losses[-1],
        first_losses_mean=sum(head) / len(head),
        last_losses_mean=sum(tail) / len(tail),
        tokens_per_s=tokens_per_step * len(timed) / sum(timed),
        seconds=time.perf_counter() - started,
        num_parameters=count_parameters(model),
        checkpoint=saved,
        metrics_file=logger.path,
        wandb_dir=logger.wandb_dir,
        stopped_early=stopped_early,
    )


def _optimizer_step(cfg, step, micro_batches, model, step_fn, optimizer, device) -> dict:
    """Forward/backward over the micro-batches of one global batch, then one AdamW update."""
    normalizer = LossNormalizer.of([mb.maskable for mb in micro_batches]).to(device)
    lr = learning_rate(step, cfg.train.steps, cfg.optim)
    set_learning_rate(optimizer, lr)
    loss = torch.zeros((), device=device, dtype=torch.float64)
    inner = torch.zeros(cfg.memory.num_inner_steps if cfg.memory.enabled else 0, device=device, dtype=torch.float64)
    for micro_batch in micro_batches:
        with _autocast(cfg, device):
            result = step_fn(micro_batch, normalizer, step=step, seed=cfg.train.seed)
        result.loss.backward()
        loss += result.loss.detach()
        if result.inner_loss_sums:
            inner += torch.stack(result.inner_loss_sums).to(torch.float64)
    if cfg.optim.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    inner_means = (inner / normalizer.num_sequences).tolist()
    return {
        "step": step + 1,
        "loss": float(loss),
        "inner_losses": inner_means,
        "lr": lr,
        "grad_norm": float(grad_norm),
        "masked_fraction": float(sum(mb.anchor_mask.sum() for mb in micro_batches) / normalizer.num_maskable),
    }


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
