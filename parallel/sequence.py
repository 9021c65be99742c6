"""Sequence parallelism (DeepSpeed-Ulysses' scheme): each of S ranks holds a contiguous chunk of every
sequence's tokens; attention trades tokens for heads by one all-to-all (then a rank holds whole
sequences for 1/S of the heads) and back by another. Everything else in a layer is per token and runs on
the chunk as it is.

The exchange is written here rather than taken from ``deepspeed.sequence.layer.DistributedAttention``:
that module exchanges queries, keys and values in three all-to-alls, while the fused projection's
packed ``[kv head, (queries, key, value), head_dim]`` layout lets one all-to-all carry all three (each
rank receives whole key/value groups with their queries).

Process groups are passed in; nothing here looks one up by itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.collectives import gather_along, group_size


def padded_length(length: int, size: int) -> int:
    """``length`` rounded up to a multiple of the sequence-parallel size."""
    return -(-length // size) * size


def chunk_bounds(length: int, size: int, rank: int) -> tuple[int, int]:
    """The token positions ``[start, end)`` rank ``rank`` of ``size`` holds of a (padded) ``length``."""
    if length % size:
        raise ValueError(f"sequence length {length} is not a multiple of the sequence-parallel size {size}")
    chunk = length // size
    return rank * chunk, (rank + 1) * chunk


def _exchange(x: torch.Tensor, group, split_dim: int, join_dim: int) -> torch.Tensor:
    """Split ``x`` into S parts along ``split_dim``, send part j to rank j, and join what arrives along
    ``join_dim`` in rank order."""
    size = dist.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=split_dim)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=join_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, split_dim: int, join_dim: int):
        ctx.group, ctx.split_dim, ctx.join_dim = group, split_dim, join_dim
        return _exchange(x, group, split_dim, join_dim)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group, ctx.join_dim, ctx.split_dim), None, None, None


def tokens_to_heads(x: torch.Tensor, group, head_dim: int = 2) -> torch.Tensor:
    """``[b, l/S, heads, ...]`` (this rank's tokens, all its heads) -> ``[b, l, heads/S, ...]`` (every token,
    this rank's share of the heads); differentiable (its backward is the reverse exchange)."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, head_dim, 1)


def heads_to_tokens(x: torch.Tensor, group, head_dim: int = 2) -> torch.Tensor:
    """The inverse of ``tokens_to_heads``: ``[b, l, heads/S, ...]`` -> ``[b, l/S, heads, ...]``."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, 1, head_dim)


def gather_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's chunk ``[b, l/S, ...]`` of every sequence -> the whole sequences ``[b, l, ...]``."""
    return gather_along(x, group, 1)


@torch.no_grad()
def sum_over_sequence(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Each tensor summed over the sequence-parallel ranks, in one all-reduce of their concatenation (the
    inner loop's gradients: each rank's are those of its tokens' share of a sequence's loss)."""
    if group_size(group) == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
