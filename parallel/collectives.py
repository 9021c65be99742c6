"""Collectives the trainer needs around the step: sharing a replica's micro-batches with its
tensor/pipeline ranks, the global loss normalizer, step statistics, the tensor-parallel-aware
gradient norm, and gathering full weights for checkpoints and tests.

Process groups are always passed in; nothing here looks one up by itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from data_pipeline.masking import MaskedBatch
from pretrain.objective import LossNormalizer


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def broadcast_batch(batch: MaskedBatch | None, shape: tuple[int, int, int], src: int, group,
                    device: torch.device) -> MaskedBatch:
    """The source rank's micro-batch on every rank of ``group`` (one packed broadcast plus ``t``).

    ``shape`` = (sequences, sequence length, pre-anchor states), known to every rank from the config.
    """
    if _world(group) == 1:
        return batch
    b, l, states = shape
    rows = 5 + states  # ids, maskable, anchor, padding, segments, states...
    packed = torch.empty(rows, b, l, dtype=torch.int64, device=device)
    extra = torch.empty(3, b, dtype=torch.float64, device=device)  # t, sample index, epoch
    if batch is not None:
        padding = batch.key_padding_mask if batch.key_padding_mask is not None else torch.ones_like(batch.maskable)
        segments = batch.segment_ids if batch.segment_ids is not None else torch.zeros_like(batch.input_ids)
        epoch = batch.epoch if batch.epoch is not None else torch.zeros_like(batch.sample_index)
        packed.copy_(torch.stack([batch.input_ids, batch.maskable.long(), batch.anchor_mask.long(), padding.long(),
                                  segments.long(), *batch.pre_anchor_masks.long()]))
        extra.copy_(torch.stack([batch.t.double(), batch.sample_index.double(), epoch.double()]))
        skipped = torch.tensor([batch.num_skipped], dtype=torch.int64, device=device)
    else:
        skipped = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(packed, src=src, group=group)
    dist.broadcast(extra, src=src, group=group)
    dist.broadcast(skipped, src=src, group=group)
    if batch is not None:
        return batch
    padding = packed[3].bool()
    return MaskedBatch(
        input_ids=packed[0].clone(), maskable=packed[1].bool(), t=extra[0].clone(), anchor_mask=packed[2].bool(),
        pre_anchor_masks=packed[5:].bool(), sample_index=extra[1].long(),
        key_padding_mask=None if bool(padding.all()) else padding, segment_ids=packed[4].int(),
        epoch=extra[2].long(), num_skipped=int(skipped.item()),
    )


def global_normalizer(micro_batches: list[MaskedBatch], data_parallel_group, device) -> LossNormalizer:
    """Maskable tokens and sequences of the whole global batch (all micro-batches, all data ranks)."""
    local = LossNormalizer.of([mb.maskable for mb in micro_batches]).to(device)
    if _world(data_parallel_group) == 1:
        return local
    counts = torch.stack([local.num_maskable, local.num_sequences])
    dist.all_reduce(counts, group=data_parallel_group)
    return LossNormalizer(counts[0], counts[1])


def sum_over(values: torch.Tensor, group) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(values, group=group)
    return values


def is_tensor_parallel(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


@torch.no_grad()
def grad_norm_and_clip(params: list[torch.nn.Parameter], max_norm: float, tensor_group, pipeline_group) -> float:
    """Global gradient norm over a model split by tensor and pipeline parallelism, then clipping.

    Tensor-parallel shards are summed over the tensor group; replicated parameters (norms) count
    once; pipeline stages add up over the pipeline group.
    """
    grads = [p.grad for p in params if p.grad is not None]
    sharded = sum((g.double().pow(2).sum() for p, g in zip(params, grads) if is_tensor_parallel(p)),
                  torch.zeros((), dtype=torch.float64, device=grads[0].device))
    replicated = sum((g.double().pow(2).sum() for p, g in zip(params, grads) if not is_tensor_parallel(p)),
                     torch.zeros((), dtype=torch.float64, device=grads[0].device))
    sum_over(sharded, tensor_group)
    total = sum_over(sharded + replicated, pipeline_group)
    norm = float(total.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale)
    return norm


@torch.no_grad()
def gather_full_state(model: torch.nn.Module, tensor_group, pipeline_group) -> dict[str, torch.Tensor]:
    """Every base weight at full size on every rank (tests and single-file checkpoints).

    Tensor-parallel shards are concatenated along their ``partition_dim``; pipeline stages
    contribute the layers they hold (their names already carry global layer indices).
    """
    state = {}
    for name, param in model.named_parameters():
        value = param.detach()
        if is_tensor_parallel(param) and _world(tensor_group) > 1:
            parts = [torch.empty_like(value) for _ in range(_world(tensor_group))]
            dist.all_gather(parts, value.contiguous(), group=tensor_group)
            value = torch.cat(parts, dim=param.partition_dim)
        state[name] = value.cpu().clone()
    if _world(pipeline_group) > 1:
        gathered = [None] * _world(pipeline_group)
        dist.all_gather_object(gathered, state, group=pipeline_group)
        state = {}
        for part in gathered:
            for name, value in part.items():
                state.setdefault(name, value)  # tied/replicated entries appear once
    return state
