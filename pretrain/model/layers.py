"""Building blocks of the bidirectional transformer, on megatron-core tensor-parallel layers.

Activations are ``[b, l, h]``. Every projection can run "frozen": with its weight detached,
so a backward through it computes input gradients only (the inner loop's case, where the
base weights must receive nothing) and megatron takes its frozen-weight linear path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.megatron import (
    ColumnParallelLinear,
    ModelParallelConfig,
    RowParallelLinear,
    reduce_from_tensor_model_parallel_region,
)
from pretrain.model.attention import attend
from pretrain.model.fast_weights import FastWeightSite, apply_fast_weight


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        weight = self.weight.detach() if frozen else self.weight
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


def rotary_tables(seq_len: int, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[seq_len, head_dim]`` in the rotate-half (Llama/HF) convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., d]`` by position; ``cos``/``sin`` broadcast to it (``[l, 1, ..., d]``).

    The tables take ``x``'s dtype (bf16 under autocast: fp32 tables would promote q and k to fp32),
    and ``x`` is made contiguous first, so the elementwise kernels run vectorised rather than strided."""
    x = x.contiguous()
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class ColumnLinear(ColumnParallelLinear):
    """megatron's column-parallel linear returning just the output; ``frozen`` detaches the weight.

    The weight is read inside ``forward`` so engines that gather parameters around a module's
    forward (DeepSpeed ZeRO-3) see it.
    """

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        return super().forward(x, weight=self.weight.detach() if frozen else None)[0]


class RowLinear(RowParallelLinear):
    """megatron's row-parallel linear returning just the output; ``frozen`` detaches the weight."""

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        if not frozen:
            return super().forward(x)[0]
        # RowParallelLinear takes no weight argument; this is its frozen-weight path spelled out.
        partial = torch.matmul(x, self.weight.detach().t())
        return reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)


class ProjectionSet(nn.Module):
    """Named projections of one sub-block and the fast weights that may sit on them."""

    def __init__(self):
        super().__init__()
        self.sites: dict[str, FastWeightSite] = {}
        self.fast_scaling = 1.0

    # Projections that read the sub-block's normed input directly; their base outputs can be
    # computed once and shared between passes that differ only in fast weights.
    entry_projections: tuple[str, ...] = ()

    def base_projection(self, name: str, x: torch.Tensor, frozen: bool) -> torch.Tensor:
        return getattr(self, name)(x, frozen)

    def project(self, name: str, x: torch.Tensor, fast, frozen: bool, shared_base=None) -> torch.Tensor:
        layer = getattr(self, name)
        if shared_base is not None and name in shared_base:
            out = shared_base[name]
        else:
            out = self.base_projection(name, x, frozen)
        site = self.sites.get(name)
        if fast is not None and site is not None:
            tensors = fast.get(site.name)
            if tensors is not None:
                dropout = fast.dropout_mask(site, x.shape, x.device, x.dtype)
                out = apply_fast_weight(x, out, site, tensors, self.fast_scaling, layer.tp_group, dropout)
        return out


class SelfAttention(ProjectionSet):
    """Multi-head (or grouped-query) attention with no causal mask. ``attention_mask`` is ``None``, a boolean
    mask broadcastable to ``[b, heads, l, l]`` (true = may attend: key padding or within-document
    attention) or a FlexAttention block mask (within documents on GPUs); see ``pretrain.model.attention``.

    The fused projection's rows are laid out per key/value head: ``[kv head, (its group of query heads,
    key, value), head_dim]``, so a column split over tensor-parallel ranks keeps whole groups. With as many
    key/value heads as query heads that is ``[head, (q, k, v), head_dim]``. Query head ``i`` uses key/value
    head ``i // group`` (as Llama's ``repeat_kv``).
    """

    def __init__(self, hidden: int, num_heads: int, config: ModelParallelConfig, init_method,
                 tensor_parallel_size: int, num_kv_heads: int = 0):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        self.head_dim = hidden // num_heads
        self.group = num_heads // num_kv_heads
        self.num_kv_heads_local = num_kv_heads // tensor_parallel_size
        self.num_heads_local = self.num_kv_heads_local * self.group
        self.qkv = ColumnLinear(
            hidden, (num_heads + 2 * num_kv_heads) * self.head_dim, config=config, init_method=init_method,
            bias=False, gather_output=False,
        )
        self.out = RowLinear(
            hidden, hidden, config=config, init_method=init_method, bias=False,
            input_is_parallel=True, skip_bias_add=False,
        )

    entry_projections = ("qkv",)

    def forward(self, x, rope, attention_mask, fast=None, frozen=False, shared_base=None):
        b, l, _ = x.shape
        group = self.group
        qkv = self.project("qkv", x, fast, frozen, shared_base).view(
            b, l, self.num_kv_heads_local, group + 2, self.head_dim)
        cos, sin = rope
        # cos/sin: [l, d] (positions 0..l-1) or [b, l, d] (given positions) -> broadcast over heads.
        rotated = apply_rotary(qkv[:, :, :, :group + 1], cos[..., None, None, :], sin[..., None, None, :])
        q = rotated[:, :, :, :group].reshape(b, l, self.num_heads_local, self.head_dim).transpose(1, 2)
        k = rotated[:, :, :, group].transpose(1, 2)  # [b, kv heads, l, d]
        v = qkv[:, :, :, group + 1].transpose(1, 2)
        context = attend(q, k, v, attention_mask, grouped=group > 1)
        context = context.transpose(1, 2).reshape(b, l, self.num_heads_local * self.head_dim)
        return self.project("out", context, fast, frozen)


class SwiGLU(ProjectionSet):
    """``down(silu(gate(x)) * up(x))`` with separate gate, up and down projections."""

    def __init__(self, hidden: int, ffn_hidden: int, config: ModelParallelConfig, init_method):
        super().__init__()
        self.gate = ColumnLinear(
            hidden, ffn_hidden, config=config, init_method=init_method, bias=False, gather_output=False
        )
        self.up = ColumnLinear(
            hidden, ffn_hidden, config=config, init_method=init_method, bias=False, gather_output=False
        )
        self.down = RowLinear(
            ffn_hidden, hidden, config=config, init_method=init_method, bias=False,
            input_is_parallel=True, skip_bias_add=False,
        )

    entry_projections = ("gate", "up")

    def forward(self, x, fast=None, frozen=False, shared_base=None):
        gate = self.project("gate", x, fast, frozen, shared_base)
        hidden = F.silu(gate) * self.project("up", x, fast, frozen, shared_base)
        return self.project("down", hidden, fast, frozen)


class TransformerLayer(nn.Module):
    """Pre-norm layer as two sub-blocks: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``."""

    def __init__(self, cfg, config: ModelParallelConfig, init_method, tensor_parallel_size: int):
        super().__init__()
        dtype = config.params_dtype
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.attention = SelfAttention(cfg.hidden_size, cfg.num_heads, config, init_method, tensor_parallel_size,
                                       cfg.num_kv_heads)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size, config, init_method)

    def subblock_parts(self, index: int):
        return (self.attention_norm, self.attention) if index == 0 else (self.mlp_norm, self.mlp)

    def subblock_entry(self, index: int, h) -> "BlockEntry":
        """The fast-weight-free start of sub-block ``index`` on ``h``: its normed input and the
        base outputs of the projections that read it."""
        norm, body = self.subblock_parts(index)
        normed = norm(h)
        return BlockEntry(h, normed, {name: body.base_projection(name, normed, False)
                                      for name in body.entry_projections})

    def run_subblock(self, index: int, h, rope, attention_mask, fast=None, frozen=False, entry=None):
        norm, body = self.subblock_parts(index)
        if entry is not None:
            h, normed, shared = entry.h, entry.normed, entry.base_outputs
        else:
            normed, shared = norm(h, frozen), None
        if index == 0:
            return h + body(normed, rope, attention_mask, fast, frozen, shared)
        return h + body(normed, fast, frozen, shared)


@dataclass
class BlockEntry:
    """What a sub-block computes before any fast weight touches it (see ``subblock_entry``)."""

    h: torch.Tensor
    normed: torch.Tensor
    base_outputs: dict[str, torch.Tensor]

    def detach(self) -> "BlockEntry":
        return BlockEntry(self.h.detach(), self.normed.detach(),
                          {k: v.detach() for k, v in self.base_outputs.items()})
