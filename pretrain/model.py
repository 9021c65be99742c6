"""A bidirectional LLaDA/Llama-style transformer for masked diffusion.

The network is a chain of sub-blocks (attention, then MLP, per layer) between the token
embedding and the head (final norm + LM head). The bi-level step cuts that chain in two:
a prefix that ends before the first sub-block with fast weights, and a tail. The head runs
only on the rows a loss needs (``rows``), because every loss here is zero elsewhere.

The model makes no ``torch.distributed`` calls of its own; the megatron-core layers do the
tensor-parallel communication, and which ranks they talk to comes from ``parallel_state``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from pretrain.config import ModelConfig
from pretrain.fast_weights import FastWeightPlan, FastWeights
from pretrain.fused_head import VocabParallelHead
from pretrain.megatron_imports import (
    ModelParallelConfig,
    VocabParallelEmbedding,
    parallel_state,
)
from pretrain.modules import BlockEntry, RMSNorm, TransformerLayer, rotary_tables


class DiffusionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        if cfg.num_heads % tp_size or cfg.ffn_hidden_size % tp_size or cfg.vocab_size % tp_size:
            raise ValueError(
                f"tensor-parallel size {tp_size} must divide model.num_heads ({cfg.num_heads}), "
                f"model.ffn_hidden_size ({cfg.ffn_hidden_size}) and model.vocab_size ({cfg.vocab_size})"
            )
        mp_config = ModelParallelConfig(
            tensor_model_parallel_size=tp_size,
            params_dtype=dtype,
            use_cpu_initialization=True,  # full master weights drawn on CPU, then split: TP-independent init
            perform_initialization=True,
        )
        init = _normal_init(cfg.init_std)
        self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=init, config=mp_config)
        self.layers = nn.ModuleList(
            TransformerLayer(cfg, mp_config, init, tp_size) for _ in range(cfg.num_layers)
        )
        # Residual-branch outputs start smaller so the residual stream's scale does not grow with depth.
        residual_init = _normal_init(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        for layer in self.layers:
            for proj in (layer.attention.out, layer.mlp.down):
                _reinitialize(proj, residual_init)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.lm_head = VocabParallelHead(
            cfg.hidden_size, cfg.vocab_size, config=mp_config, init_method=init, bias=False, gather_output=False
        )
        cos, sin = rotary_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta, dtype)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.num_blocks = 2 * cfg.num_layers

    # -- fast weights ----------------------------------------------------------------------
    def attach_fast_weights(self, plan: FastWeightPlan) -> None:
        """Tell each projection which fast-weight site (if any) sits on it."""
        for site in plan.sites:
            layer = self.layers[site.layer]
            holder = layer.attention if site.module in ("qkv", "out") else layer.mlp
            holder.sites[site.module] = site
            holder.fast_scaling = plan.config.lora_scaling if plan.config.adapter == "lora" else 1.0

    # -- the chain ---------------------------------------------------------------------------
    def rope(self, seq_len: int):
        if seq_len > self.rope_cos.shape[0]:
            raise ValueError(
                f"sequence length {seq_len} exceeds model.seq_len {self.rope_cos.shape[0]}; "
                "train a model with a larger model.seq_len or cut the input"
            )
        return self.rope_cos[:seq_len], self.rope_sin[:seq_len]

    def run_blocks(
        self,
        h: torch.Tensor,
        start: int,
        end: int,
        attention_mask: torch.Tensor | None = None,
        fast: FastWeights | None = None,
        frozen: bool = False,
        entry: BlockEntry | None = None,
    ) -> torch.Tensor:
        """Sub-blocks ``[start, end)`` on ``h [b, l, hidden]``; ``entry`` (from ``block_entry``)
        replaces the fast-weight-free start of sub-block ``start``."""
        rope = self.rope(h.shape[1])
        for block in range(start, end):
            layer, sub = divmod(block, 2)
            h = self.layers[layer].run_subblock(
                sub, h, rope, attention_mask, fast, frozen, entry if block == start else None
            )
        return h

    def block_entry(self, h: torch.Tensor, block: int) -> BlockEntry:
        """Sub-block ``block``'s normed input and entry projections on ``h``, with grad."""
        layer, sub = divmod(block, 2)
        return self.layers[layer].subblock_entry(sub, h)

    def prefix(self, input_ids: torch.Tensor, boundary: int, attention_mask=None) -> torch.Tensor:
        """Embedding and sub-blocks ``[0, boundary)``: ``[b, l]`` ids -> ``[b, l, hidden]``."""
        h = self.embedding(input_ids)
        return self.run_blocks(h, 0, boundary, attention_mask)

    def head(self, h: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Final norm and LM head: ``[..., hidden]`` -> vocab-parallel logits ``[..., vocab/tp]``."""
        return self.lm_head(self.final_norm(h, frozen), frozen=frozen)

    def tail_loss(
        self,
        h: torch.Tensor,
        boundary: int,
        rows: torch.Tensor,
        targets: torch.Tensor,
        row_scale: torch.Tensor,
        attention_mask=None,
        fast: FastWeights | None = None,
        frozen: bool = False,
        entry: BlockEntry | None = None,
    ) -> torch.Tensor:
        """Sub-blocks ``[boundary, end)``, then ``sum(row_scale * CE(logits, targets))`` over the
        rows where ``rows [b, l]`` is true (``targets``, ``row_scale``: ``[n]``, in row order).
        The head runs on those rows only."""
        h = self.run_blocks(h, boundary, self.num_blocks, attention_mask, fast, frozen, entry)
        return self.lm_head(self.final_norm(h[rows], frozen), targets, row_scale, frozen=frozen)

    def forward(self, input_ids: torch.Tensor, attention_mask=None, fast: FastWeights | None = None):
        """Vocab-parallel logits ``[b, l, vocab/tp]`` for every position (inference and export).
        ``attention_mask``: ``[b, l]`` key padding (true on real tokens) or an SDPA-shaped mask."""
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = attention_mask[:, None, None, :]
        h = self.embedding(input_ids)
        h = self.run_blocks(h, 0, self.num_blocks, attention_mask, fast)
        return self.head(h)


def _normal_init(std: float):
    def init(weight: torch.Tensor) -> None:
        nn.init.normal_(weight, mean=0.0, std=std)

    return init


@torch.no_grad()
def _reinitialize(layer, init) -> None:
    """Redraw a row-parallel weight's full master tensor with ``init`` and keep this rank's shard."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    local = layer.weight
    full = torch.empty(local.shape[0], local.shape[1] * tp_size, dtype=torch.float32)
    init(full)
    local.copy_(full.chunk(tp_size, dim=1)[tp_rank].to(local.dtype))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
