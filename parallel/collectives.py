"""Collectives the trainer and the engines need around the step: sharing a replica's micro-batches
with its tensor/pipeline ranks, the global loss normalizer, step statistics and the
tensor-parallel-aware gradient norm.

Process groups are always passed in; nothing here looks one up by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from data_pipeline.masking import MaskedBatch
from parallel.experts import split_over_experts


def group_size(group) -> int:
    """Ranks in ``group``; ``None`` stands for no group (this rank alone)."""
    return 1 if group is None else dist.get_world_size(group)


def broadcast_batch(batch: MaskedBatch | None, shape: tuple, src: int, group,
                    device: torch.device) -> MaskedBatch:
    """The source rank's micro-batch on every rank of ``group`` (two broadcasts of its packed form).

    ``shape`` = (sequences, sequence length, inner states, whether the batch carries separate inner masks),
    known to every rank from the config.
    """
    if group_size(group) == 1:
        return batch
    int_shape, float_shape = MaskedBatch.packed_shapes(*shape)
    if batch is not None:
        ints, floats = (t.to(device) for t in batch.pack())
    else:
        ints = torch.empty(int_shape, dtype=torch.int64, device=device)
        floats = torch.empty(float_shape, dtype=torch.float64, device=device)
    dist.broadcast(ints, src=src, group=group)
    dist.broadcast(floats, src=src, group=group)
    return batch if batch is not None else MaskedBatch.unpack(ints, floats, num_states=shape[2])


@dataclass
class LossNormalizer:
    """Counts over the whole global batch (all micro-batches, all data-parallel ranks) that the
    losses are divided by, so cutting the batch into micro-batches or ranks changes nothing."""

    num_maskable: torch.Tensor  # 0-d float64: maskable tokens
    num_sequences: torch.Tensor  # 0-d float64: sequences
    # A mixture's sources: ``[2, S]`` float64, each source's maskable tokens and sequences (None: one source).
    by_source: torch.Tensor | None = None

    @staticmethod
    def of(maskable_masks: list[torch.Tensor], source_ids: list[torch.Tensor] | None = None,
           num_sources: int = 1) -> "LossNormalizer":
        """The counts of these micro-batches, on their device (no host round trip); per source when
        ``num_sources`` > 1 (``source_ids``: each micro-batch's ``[b]`` source of every sequence)."""
        device = maskable_masks[0].device
        num_maskable = torch.stack([m.sum(dtype=torch.float64) for m in maskable_masks]).sum()
        num_sequences = torch.full((), float(sum(m.shape[0] for m in maskable_masks)), dtype=torch.float64,
                                   device=device)
        by_source = None
        if num_sources > 1:
            by_source = torch.zeros(2, num_sources, dtype=torch.float64, device=device)
            for mask, sources in zip(maskable_masks, source_ids):
                sources = sources.to(device)
                by_source[0].index_add_(0, sources, mask.sum(dim=1, dtype=torch.float64))
                by_source[1].index_add_(0, sources, torch.ones_like(sources, dtype=torch.float64))
        return LossNormalizer(num_maskable, num_sequences, by_source)

    def to(self, device) -> "LossNormalizer":
        return LossNormalizer(self.num_maskable.to(device), self.num_sequences.to(device),
                              self.by_source.to(device) if self.by_source is not None else None)

    def source_factors(self, normalization: str) -> torch.Tensor:
        """``[S]``: what turns a source's share of the loss (its sequences' terms, divided by the whole batch's
        count) into that source's own loss (divided by its own count), as if its sequences were the batch:
        ``Z / Z_s``, with ``Z`` the maskable tokens (``token`` normalisation) or the sequences. NaN for a
        source absent from the batch."""
        counts = self.by_source[0] if normalization == "token" else self.by_source[1]
        total = self.num_maskable if normalization == "token" else self.num_sequences
        return torch.where(counts > 0, total / counts.clamp_min(1), torch.full_like(counts, float("nan")))


def global_normalizer(micro_batches: list[MaskedBatch], data_parallel_group, device,
                      num_sources: int = 1) -> LossNormalizer:
    """Maskable tokens and sequences of the whole global batch (all micro-batches, all data ranks), and of
    each source of a mixture (``num_sources`` > 1)."""
    sources = [mb.source_ids if mb.source_ids is not None else torch.zeros(mb.num_sequences, dtype=torch.long)
               for mb in micro_batches] if num_sources > 1 else None
    local = LossNormalizer.of([mb.maskable for mb in micro_batches], sources, num_sources).to(device)
    if group_size(data_parallel_group) == 1:
        return local
    counts = torch.stack([local.num_maskable, local.num_sequences])
    if local.by_source is not None:
        counts = torch.cat([counts, local.by_source.reshape(-1)])
    dist.all_reduce(counts, group=data_parallel_group)
    return LossNormalizer(counts[0], counts[1], counts[2:].reshape(2, -1) if local.by_source is not None else None)


def sum_over(values: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(values, group=group)
    return values


def is_tensor_parallel(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


@torch.no_grad()
def grad_norm_and_clip(params: list[torch.nn.Parameter], max_norm: float, tensor_group,
                       pipeline_group, expert_group=None) -> torch.Tensor:
    """Global gradient norm over a model split by tensor, pipeline and expert parallelism (a 0-d float64 tensor
    on the gradients' device), then clipping to ``max_norm`` (0: off).

    Tensor-parallel shards are summed over the tensor group; replicated parameters (norms) count
    once; experts split over the expert group (``expert_parallel_size``) add up over it; pipeline stages add up
    over the pipeline group. The clip multiplies by ``min(1, max_norm / (norm + 1e-6))`` on the device: no host
    branch, no synchronisation.
    """
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    zero = torch.zeros((), dtype=torch.float64, device=grads[0].device)

    def squares(keep) -> torch.Tensor:
        return sum((g.double().pow(2).sum() for p, g in zip(params, grads) if keep(p)), zero)

    experts = squares(split_over_experts)
    sharded = squares(lambda p: is_tensor_parallel(p) and not split_over_experts(p))
    replicated = squares(lambda p: not is_tensor_parallel(p))
    sum_over(experts, tensor_group)
    sum_over(experts, expert_group)
    sum_over(sharded, tensor_group)
    total = sum_over(sharded + replicated + experts, pipeline_group)
    norm = total.sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(grads[0].dtype)  # exactly 1 under the clip
        torch._foreach_mul_(grads, scale)
    return norm


class _Gather(torch.autograd.Function):
    """All-gather along one dimension; the backward keeps this rank's slice (megatron's own gather allocates on
    a CUDA device, so it cannot run on the CPU)."""

    @staticmethod
    def forward(ctx, x, group, dim: int):
        ctx.rank, ctx.width, ctx.dim = dist.get_rank(group), x.shape[dim], dim
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.rank * ctx.width, ctx.width).contiguous(), None, None


def gather_along(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """``x`` split over ``group`` along ``dim`` (in rank order), whole on every rank (with its gradient's slice)."""
    if group_size(group) == 1:
        return x
    return _Gather.apply(x, group, dim)


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` split over ``group`` along its last dimension (a tensor-parallel shard), whole on every rank."""
    return gather_along(x, group, x.dim() - 1)
