"""Building blocks of the bidirectional transformer, on megatron-core tensor-parallel layers.

Activations are ``[b, l, h]``. Every projection can run "frozen": with its weight detached,
so a backward through it computes input gradients only (the inner loop's case, where the
base weights must receive nothing) and megatron takes its frozen-weight linear path. Under
``--train.precision fp8`` the trained path of the projections may run in fp8 (``pretrain.model.float8``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.megatron import (
    ColumnParallelLinear,
    ModelParallelConfig,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from parallel.sequence import heads_to_tokens, tokens_to_heads
from pretrain.model.attention import attend
from pretrain.model.fast_weights import FastWeightSite, apply_fast_weight
from pretrain.model.moe import MixtureOfExperts


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        weight = self.weight.detach() if frozen else self.weight
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


def rotary_tables(seq_len: int, head_dim: int, theta: float, dtype: torch.dtype,
                  scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[seq_len, head_dim]`` in the rotate-half (Llama/HF) convention; ``scaling``: Llama-3.1's
    frequency scaling (``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_positions``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, **scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def llama3_frequencies(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_max_positions: int) -> torch.Tensor:
    """Llama-3.1's RoPE scaling: wavelengths longer than ``original / low_freq_factor`` are stretched by
    ``factor``, those shorter than ``original / high_freq_factor`` kept, those between interpolated."""
    wavelength = 2 * math.pi / inv_freq
    low_wavelength = original_max_positions / low_freq_factor
    high_wavelength = original_max_positions / high_freq_factor
    scaled = torch.where(wavelength > low_wavelength, inv_freq / factor, inv_freq)
    smooth = (original_max_positions / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    return torch.where(medium, smoothed, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., d]`` by position; ``cos``/``sin`` broadcast to it (``[l, 1, ..., r]``, ``r`` <= d: the
    first ``r`` dimensions of each head rotate in the rotate-half convention, the rest are unchanged).

    The tables take ``x``'s dtype (bf16 under autocast: fp32 tables would promote q and k to fp32),
    and ``x`` is made contiguous first, so the elementwise kernels run vectorised rather than strided."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:  # partial rotary: the first ``rotary`` dimensions turn, the others pass (LLaDA2)
        return torch.cat([apply_rotary(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)
    x = x.contiguous()
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class ColumnLinear(ColumnParallelLinear):
    """megatron's column-parallel linear returning just the output; ``frozen`` detaches the weight (and the
    bias, which megatron is asked to hand back rather than add, so that it can be detached too).

    The weight is read inside ``forward`` so engines that gather parameters around a module's
    forward (DeepSpeed ZeRO-3) see it.
    """

    float8 = None  # a pretrain.model.float8.Float8Matmul for the trained path under --train.precision fp8

    def __init__(self, *args, bias: bool = False, **kwargs):
        super().__init__(*args, bias=bias, skip_bias_add=bias, **kwargs)

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        if self.float8 is not None and not frozen:  # megatron's path with the matmul in fp8
            out = self.float8(copy_to_tensor_model_parallel_region(x, group=self.tp_group), self.weight)
            return out if self.bias is None else out + self.bias
        out, bias = super().forward(x, weight=self.weight.detach() if frozen else None)
        if bias is not None:
            out = out + (bias.detach() if frozen else bias)
        return out


class RowLinear(RowParallelLinear):
    """megatron's row-parallel linear returning just the output; ``frozen`` detaches the weight.

    ``plain`` (set for compiled models): the trained path as a plain matmul and the group's reduction, because
    megatron's own forward warns on every call (it passes no tensor-parallel group on), and a warning inside a
    compiled region breaks the graph. Eager runs keep megatron's path."""

    plain = False
    float8 = None  # as ColumnLinear's

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        float8 = None if frozen else self.float8
        if not (frozen or self.plain or float8 is not None):
            return super().forward(x)[0]
        # RowParallelLinear takes no weight argument: its path spelled out (the weight detached when frozen; the
        # matmul in fp8 under --train.precision fp8; no row-parallel projection has a bias).
        weight = self.weight.detach() if frozen else self.weight
        out = float8(x, weight) if float8 is not None else torch.matmul(x, weight.t())
        return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)


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

    Under sequence parallelism (``sequence_group``, set by the model) the input holds this rank's chunk of
    the tokens: the packed projection goes through one all-to-all that gives each rank every token of its
    share of the key/value groups, attention runs on whole sequences, and the context comes back to the
    token chunks by the reverse exchange (``parallel.sequence``). RoPE is applied after the exchange, at
    the true positions.
    """

    sequence_group = None

    def __init__(self, cfg, config: ModelParallelConfig, init_method, tensor_parallel_size: int):
        super().__init__()
        num_heads, num_kv_heads, hidden = cfg.num_heads, cfg.key_value_heads, cfg.hidden_size
        self.head_dim = cfg.attention_head_dim
        self.group = num_heads // num_kv_heads
        self.num_kv_heads_local = num_kv_heads // tensor_parallel_size
        self.num_heads_local = self.num_kv_heads_local * self.group
        self.qkv = ColumnLinear(
            hidden, cfg.qkv_size, config=config, init_method=init_method, bias=cfg.qkv_bias, gather_output=False,
        )
        self.out = RowLinear(
            cfg.attention_size, hidden, config=config, init_method=init_method, bias=False,
            input_is_parallel=True, skip_bias_add=False,
        )
        if cfg.qk_norm:  # one weight per head dimension, shared by all heads (replicated over TP ranks)
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, config.params_dtype)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, config.params_dtype)
        else:
            self.q_norm = self.k_norm = None

    entry_projections = ("qkv",)

    def forward(self, x, rope, attention_mask, fast=None, frozen=False, shared_base=None):
        b, chunk, _ = x.shape
        group = self.group
        qkv = self.project("qkv", x, fast, frozen, shared_base).view(
            b, chunk, self.num_kv_heads_local, group + 2, self.head_dim)
        qkv = tokens_to_heads(qkv, self.sequence_group)  # [b, l, kv heads here, group + 2, d]
        l, kv_heads = qkv.shape[1], qkv.shape[2]
        queries_keys = qkv[:, :, :, :group + 1]
        if self.q_norm is not None:
            queries_keys = self._normed_queries_keys(queries_keys, frozen)
        cos, sin = rope
        # cos/sin: [l, d] (positions 0..l-1) or [b, l, d] (given positions) -> broadcast over heads.
        rotated = apply_rotary(queries_keys, cos[..., None, None, :], sin[..., None, None, :])
        q = rotated[:, :, :, :group].reshape(b, l, kv_heads * group, self.head_dim).transpose(1, 2)
        k = rotated[:, :, :, group].transpose(1, 2)  # [b, kv heads, l, d]
        v = qkv[:, :, :, group + 1].transpose(1, 2)
        context = attend(q, k, v, attention_mask, grouped=group > 1)
        context = context.transpose(1, 2).reshape(b, l, kv_heads, group * self.head_dim)
        context = heads_to_tokens(context, self.sequence_group)  # [b, chunk, kv heads of this TP rank, ...]
        context = context.reshape(b, chunk, self.num_heads_local * self.head_dim)
        return self.project("out", context, fast, frozen)

    def _normed_queries_keys(self, queries_keys: torch.Tensor, frozen: bool) -> torch.Tensor:
        """Each query and key head RMS-normalised over its dimensions, then scaled by the query's or the key's
        norm weight (``[b, l, kv heads, group + 1, d]``: the group's queries, then its key)."""
        q_weight, k_weight = self.q_norm.weight, self.k_norm.weight
        if frozen:
            q_weight, k_weight = q_weight.detach(), k_weight.detach()
        else:  # replicated over tensor-parallel ranks, each of which sees its own heads: gradients are summed
            q_weight = copy_to_tensor_model_parallel_region(q_weight)
            k_weight = copy_to_tensor_model_parallel_region(k_weight)
        weight = torch.cat([q_weight.expand(self.group, -1), k_weight[None]], dim=0)
        normed = F.rms_norm(queries_keys, (queries_keys.shape[-1],), None, self.q_norm.eps)
        return normed * weight


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
    """Pre-norm layer as two sub-blocks: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``; the MLP is a mixture
    of experts (``pretrain.model.moe``) on the layers ``cfg.is_moe_layer`` names."""

    def __init__(self, cfg, config: ModelParallelConfig, init_method, tensor_parallel_size: int, index: int = 0):
        super().__init__()
        dtype = config.params_dtype
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.attention = SelfAttention(cfg, config, init_method, tensor_parallel_size)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        if cfg.is_moe_layer(index):
            shared = cfg.moe_shared_ffn_hidden_size
            self.mlp = MixtureOfExperts(cfg, dtype, tensor_parallel_size, self.attention.out.tp_group,
                                        SwiGLU(cfg.hidden_size, shared, config, init_method) if shared else None,
                                        layer=index)
        else:
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
