"""A bidirectional LLaDA/Llama-style transformer for masked diffusion.

The network is a chain of sub-blocks (attention, then MLP, per layer) between the token
embedding and the head (final norm + LM head). The bi-level step cuts that chain in two:
a prefix that ends before the first sub-block with fast weights, and a tail. The head runs
only on the rows a loss needs (``rows``), because every loss here is zero elsewhere.

The model never decides how it is parallelised. Its communication is tensor- and sequence-parallel only:
the megatron-core layers' own, the fused head's vocab-parallel cross entropy (all-reduces of the
row maxima, predicted logits and sums over the tensor-parallel group), the fast weights'
reductions (``pretrain.model.fast_weights``) and attention's all-to-all over the sequence-parallel group
(``parallel.sequence``); which ranks they talk to comes from ``parallel_state``.

Under sequence parallelism (S ranks) the model takes whole, padded sequences of ids ``[b, L]`` (``L`` a
multiple of S) and keeps this rank's chunk of the tokens from the embedding on: activations are
``[b, L/S, hidden]``, the rows a loss gathers are those of the chunk (``local_rows``), and its losses and
gradients are this rank's share (the caller sums them over the group).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from parallel.collectives import gather_last_dim
from parallel.experts import split_over_experts
from parallel.megatron import (
    ColumnParallelLinear,
    ModelParallelConfig,
    RowParallelLinear,
    VocabParallelEmbedding,
    parallel_state,
    set_tensor_model_parallel_attributes,
)
from parallel.sequence import chunk_bounds, gather_tokens, padded_length
from pretrain.config import ModelConfig
from pretrain.model.fast_weights import FastWeightPlan, FastWeights
from pretrain.model.fused_head import DEFAULT_CHUNK_ROWS, VocabParallelHead
from pretrain.model.layers import BlockEntry, ColumnLinear, RMSNorm, RowLinear, TransformerLayer, rotary_tables
from pretrain.model.moe import MixtureOfExperts
from pretrain.model.routing import Routing
from pretrain.model.rows import Rows


class DiffusionTransformer(nn.Module):
    """The whole model, or the part of it one pipeline stage holds (``layers``: a range of layer
    indices; the embedding comes with layer 0 and the head with the last layer)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0,
                 layers: range | None = None):
        super().__init__()
        self.cfg = cfg
        tensor_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
        sizes = (cfg.num_heads, cfg.key_value_heads, cfg.ffn_hidden_size, cfg.vocab_size)
        if any(size % tensor_parallel_size for size in sizes):
            raise ValueError(
                f"tensor-parallel size {tensor_parallel_size} must divide model.num_heads ({cfg.num_heads}), "
                f"the key/value heads ({cfg.key_value_heads}), "
                f"model.ffn_hidden_size ({cfg.ffn_hidden_size}) and model.vocab_size ({cfg.vocab_size})"
            )
        self.layer_range = layers if layers is not None else range(cfg.num_layers)
        sequence_parallel = parallel_state.model_parallel_is_initialized()
        self.sequence_size = parallel_state.get_context_parallel_world_size() if sequence_parallel else 1
        self.sequence_rank = parallel_state.get_context_parallel_rank() if sequence_parallel else 0
        self.sequence_group = parallel_state.get_context_parallel_group() if self.sequence_size > 1 else None
        if (cfg.key_value_heads // tensor_parallel_size) % self.sequence_size:
            raise ValueError(
                f"sequence-parallel size {self.sequence_size} must divide the key/value heads of a tensor-parallel "
                f"rank ({cfg.key_value_heads} / {tensor_parallel_size})")
        mp_config = ModelParallelConfig(
            tensor_model_parallel_size=tensor_parallel_size,
            params_dtype=dtype,
            use_cpu_initialization=True,
            perform_initialization=False,  # initialize_parameters draws every weight from (seed, name)
        )
        unused = _normal_init(cfg.init_std)
        self.has_embedding = self.layer_range.start == 0
        self.has_head = self.layer_range.stop == cfg.num_layers
        if self.has_embedding:
            self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=unused,
                                                    config=mp_config)
        # A dict keyed by the global layer index keeps parameter names ("layers.7.mlp...") the
        # same whichever stage holds the layer.
        self.layers = nn.ModuleDict({
            str(i): TransformerLayer(cfg, mp_config, unused, tensor_parallel_size, i) for i in self.layer_range
        })
        self.routing = Routing(cfg)  # expert biases, routed-token counts, the balancing loss (MoE layers)
        self.routing.sequence_group = self.sequence_group
        for layer in self.layers.values():
            layer.attention.sequence_group = self.sequence_group
            if isinstance(layer.mlp, MixtureOfExperts):
                layer.mlp.routing = self.routing
        if self.has_head:
            self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
            self.lm_head = VocabParallelHead(
                cfg.hidden_size, cfg.vocab_size, config=mp_config, init_method=unused, bias=False,
                gather_output=False,
            )
            self.lm_head.chunk_rows = head_chunk_rows(cfg, tensor_parallel_size)
        if cfg.tie_embeddings:
            if not (self.has_embedding and self.has_head):
                raise ValueError("model.tie_embeddings needs the embedding and the head on one pipeline stage")
            self.lm_head.weight = self.embedding.weight  # one parameter, named embedding.weight
        # Positions up to the padded length: padding added for sequence parallelism gets positions too.
        cos, sin = rotary_tables(padded_length(cfg.seq_len, self.sequence_size), cfg.rotary_dim,
                                 cfg.rope_theta, dtype, rope_scaling(cfg))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.num_blocks = 2 * cfg.num_layers
        initialize_parameters(self, cfg, seed)

    def layer(self, index: int) -> TransformerLayer:
        return self.layers[str(index)]

    def _apply(self, fn, *args, **kwargs):  # ``.to(device)`` moves the routing table with the weights
        super()._apply(fn, *args, **kwargs)
        device = self.rope_cos.device
        if self.routing.bias.device != device:
            self.routing.to(device)
        return self

    # -- fast weights ----------------------------------------------------------------------
    def attach_fast_weights(self, plan: FastWeightPlan) -> None:
        """Tell each projection which fast-weight site (if any) sits on it."""
        for site in plan.sites:
            if str(site.layer) not in self.layers:
                continue  # held by another pipeline stage
            layer = self.layer(site.layer)
            holder = layer.attention if site.module in ("qkv", "out") else layer.mlp
            if isinstance(holder, MixtureOfExperts):  # on its routed experts or its shared expert
                holder = holder.experts if site.routed else holder.shared_expert
            holder.sites[site.module] = site
            holder.fast_scaling = plan.scaling

    # -- sequence parallelism ----------------------------------------------------------------
    def local_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's chunk ``[b, L/S, ...]`` of whole sequences ``x [b, L, ...]`` (all of it without SP)."""
        if self.sequence_size == 1:
            return x
        start, end = chunk_bounds(x.shape[1], self.sequence_size, self.sequence_rank)
        return x[:, start:end]

    def local_rows(self, rows: Rows, seq_len: int) -> Rows:
        """The rows (token positions in the flattened ``[b * seq_len]`` whole sequences, with their targets and
        scales) as this rank's model computes them: each replaced by the row that predicts it
        (``predicting_rows``), and, under sequence parallelism, only those in this rank's chunk, numbered in
        the flattened ``[b * seq_len / S]`` chunk. Under SP the count is known only on the device: a GPU
        synchronises here once per loss."""
        predicting = self.predicting_rows(rows.index, seq_len)
        if self.sequence_size == 1:
            return Rows(predicting, rows.targets, rows.scale, rows.group, rows.group_sums)
        start, end = chunk_bounds(seq_len, self.sequence_size, self.sequence_rank)
        position = predicting % seq_len
        here = torch.nonzero((position >= start) & (position < end)).reshape(-1)
        local = (predicting // seq_len) * (end - start) + position - start
        return Rows(local[here], rows.targets[here], rows.scale[here],
                    rows.group[here] if rows.group is not None else None, rows.group_sums)

    # -- the chain ---------------------------------------------------------------------------
    def rope(self, seq_len: int, positions: torch.Tensor | None = None):
        """cos/sin ``[l, d]`` for positions ``0..l-1``, or ``[b, l, d]`` for given ``positions [b, l]``."""
        if seq_len > self.rope_cos.shape[0]:
            raise ValueError(
                f"sequence length {seq_len} exceeds model.seq_len {self.rope_cos.shape[0]}; "
                "train a model with a larger model.seq_len or cut the input"
            )
        if positions is not None:
            return self.rope_cos[positions], self.rope_sin[positions]
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
        recompute: str = "none",
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sub-blocks ``[start, end)`` on ``h [b, l, hidden]``; ``entry`` (from ``block_entry``)
        replaces the fast-weight-free start of sub-block ``start``.

        ``recompute``: keep only each sub-block's input for the backward and run it again there:
        every sub-block (``full``) or the attention ones (``selective``); ``none`` keeps everything.
        It only matters when a graph is being built. ``positions [b, l]``: RoPE positions other than
        ``0..l-1`` (left-padded generation). Under sequence parallelism ``h`` is this rank's chunk and
        ``positions`` are those of the whole sequences."""
        rope = self.rope(h.shape[1] * self.sequence_size, positions)
        for block in range(start, end):
            layer, sub = divmod(block, 2)
            args = (sub, h, rope, attention_mask, fast, frozen, entry if block == start else None)
            run = self.layer(layer).run_subblock
            if torch.is_grad_enabled() and (recompute == "full" or (recompute == "selective" and sub == 0)):
                h = checkpoint(run, *args, use_reentrant=False)
            else:
                h = run(*args)
        return h

    def compile_blocks(self) -> None:
        """Regional compilation: each layer's ``run_subblock`` through ``torch.compile``. Layers share their
        compiled graphs (parameters are graph inputs, not constants), so the cost is one compilation per variant
        of a sub-block (attention or MLP; with or without fast weights, frozen or not, entry or not), not per
        layer. The shapes inside a sub-block are those of the micro-batch (the masked-row gathers, whose sizes
        change every step, stay outside), so a run compiles in its first steps and never again."""
        import warnings

        import torch._dynamo

        # megatron's linear layers warn (about CUDA_DEVICE_MAX_CONNECTIONS) on every call; a warning inside a
        # compiled region would break its graph in two, so dynamo is told to lift warnings out of the graph.
        torch._dynamo.config.reorderable_logging_functions.add(warnings.warn)
        for module in self.modules():
            if isinstance(module, RowLinear):
                module.plain = True
        for layer in self.layers.values():
            layer.run_subblock = torch.compile(layer.run_subblock, dynamic=False)

    def use_float8(self, matmul, exempt_layers: range = range(0)) -> None:
        """``--train.precision fp8``: the attention and MLP projections (shared experts' too) of this stage's layers
        outside ``exempt_layers`` (those that carry fast weights) run their trained path through ``matmul`` (a
        ``pretrain.model.float8.Float8Matmul``)."""
        for key, layer in self.layers.items():
            if int(key) in exempt_layers:
                continue
            for name, module in layer.named_modules():
                if isinstance(module, (ColumnLinear, RowLinear)):
                    if isinstance(module, RowLinear) and module.bias is not None:
                        raise ValueError(f"layers.{key}.{name}: the fp8 row-parallel path adds no bias")
                    module.float8 = matmul

    def block_entry(self, h: torch.Tensor, block: int) -> BlockEntry:
        """Sub-block ``block``'s normed input and entry projections on ``h``, with grad."""
        layer, sub = divmod(block, 2)
        return self.layer(layer).subblock_entry(sub, h)

    def prefix(self, input_ids: torch.Tensor, boundary: int, attention_mask=None,
               recompute: str = "none") -> torch.Tensor:
        """Embedding and sub-blocks ``[0, boundary)``: ``[b, l]`` ids -> ``[b, l, hidden]`` (``[b, l/S, hidden]``,
        this rank's chunk, under sequence parallelism)."""
        h = self.embedding(self.local_tokens(input_ids))
        return self.run_blocks(h, 0, boundary, attention_mask, recompute=recompute)

    def head(self, h: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Final norm and LM head: ``[..., hidden]`` -> vocab-parallel logits ``[..., vocab/tp]``."""
        return self.lm_head(self.final_norm(h, frozen), frozen=frozen)

    def predicting_rows(self, index: torch.Tensor, seq_len: int) -> torch.Tensor:
        """The rows of the flattened ``[b * l]`` outputs that predict the tokens at ``index``: the same rows, or
        with ``shifted_prediction`` the row before (a sequence's first token predicted by its own row)."""
        if not self.cfg.shifted_prediction:
            return index
        return torch.where(index % seq_len == 0, index, index - 1)

    def tail_loss(
        self,
        h: torch.Tensor,
        boundary: int,
        rows: Rows,
        attention_mask=None,
        fast: FastWeights | None = None,
        frozen: bool = False,
        entry: BlockEntry | None = None,
    ) -> torch.Tensor:
        """Sub-blocks ``[boundary, end)``, then ``sum(rows.scale * CE(logits, rows.targets))`` over the
        gathered ``rows`` of ``h [b, l, hidden]`` (``rows`` from ``local_rows``). The head runs on those rows
        only."""
        h = self.run_blocks(h, boundary, self.num_blocks, attention_mask, fast, frozen, entry)
        selected = h.reshape(-1, h.shape[-1]).index_select(0, rows.index)
        return self.lm_head(self.final_norm(selected, frozen), rows.targets, rows.scale, frozen=frozen,
                            row_group=rows.group, group_sums=rows.group_sums)

    def tail_outputs(
        self,
        h: torch.Tensor,
        boundary: int,
        index: torch.Tensor,
        attention_mask=None,
        fast: FastWeights | None = None,
        frozen: bool = False,
        entry: BlockEntry | None = None,
        kind: str = "logits",
    ) -> torch.Tensor:
        """Sub-blocks ``[boundary, end)``, then at the rows ``index`` (from ``local_rows``) of ``h``: the
        full-vocabulary logits ``[n, vocab]`` (``logits``, gathered over tensor-parallel ranks), the final-normed
        hidden states (``normed``) or the last sub-block's output before the final norm (``hidden``)."""
        h = self.run_blocks(h, boundary, self.num_blocks, attention_mask, fast, frozen, entry)
        selected = h.reshape(-1, h.shape[-1]).index_select(0, index)
        if kind == "hidden":
            return selected
        normed = self.final_norm(selected, frozen)
        if kind == "normed":
            return normed
        logits = self.lm_head(normed, frozen=frozen)  # vocab-parallel
        return gather_last_dim(logits, self.lm_head.tp_group)

    def forward(self, input_ids: torch.Tensor, attention_mask=None, fast: FastWeights | None = None,
                positions: torch.Tensor | None = None):
        """Vocab-parallel logits ``[b, l, vocab/tp]`` for every position (inference and export).
        ``attention_mask``: ``[b, l]`` key padding (true on real tokens) or an SDPA-shaped mask;
        ``positions``: ``[b, l]`` RoPE positions (default ``0..l-1``). Under sequence parallelism every rank
        gives the same ids and gets every position's logits (the chunks are gathered)."""
        length = input_ids.shape[1]
        if self.sequence_size > 1:
            input_ids, attention_mask, positions = self._pad_for_sequence_parallel(input_ids, attention_mask,
                                                                                   positions)
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = attention_mask.bool()[:, None, None, :]
        h = self.embedding(self.local_tokens(input_ids))
        h = self.run_blocks(h, 0, self.num_blocks, attention_mask, fast, positions=positions)
        logits = gather_tokens(self.head(h), self.sequence_group)[:, :length]
        if self.cfg.shifted_prediction:  # position i's logits come from row i - 1 (row 0 keeps its own)
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def _pad_for_sequence_parallel(self, input_ids, attention_mask, positions):
        """Ids (and a key-padding mask, positions) padded to a multiple of the sequence-parallel size; the
        padding is never attended to."""
        b, length = input_ids.shape
        extra = padded_length(length, self.sequence_size) - length
        if extra == 0:
            return input_ids, attention_mask, positions
        if attention_mask is None:
            attention_mask = torch.ones(b, length, dtype=torch.bool, device=input_ids.device)
        if attention_mask.dim() != 2:
            raise ValueError("under sequence parallelism give forward() a [b, l] key-padding mask (or none) when "
                             "the length is not a multiple of the sequence-parallel size")
        attention_mask = nn.functional.pad(attention_mask.bool(), (0, extra), value=False)
        input_ids = nn.functional.pad(input_ids, (0, extra), value=0)
        if positions is not None:
            positions = nn.functional.pad(positions, (0, extra), value=0)
        return input_ids, attention_mask, positions


def rope_scaling(cfg: ModelConfig) -> dict | None:
    if cfg.rope_scaling == "none":
        return None
    return {"factor": cfg.rope_scaling_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_positions": cfg.rope_original_max_positions}


LOGITS_BLOCK_BYTES = 128 << 20  # the automatic head chunk keeps one block of fp32 logits below this


def head_chunk_rows(cfg: ModelConfig, tensor_parallel_size: int = 1) -> int:
    """Rows of the head computed at once: ``--model.head_chunk_rows``, or the largest power of two (at most
    1024, at least 16) whose fp32 logits over this rank's share of the vocabulary fit ``LOGITS_BLOCK_BYTES``."""
    if cfg.head_chunk_rows:
        return cfg.head_chunk_rows
    rows_that_fit = LOGITS_BLOCK_BYTES // (4 * max(1, cfg.vocab_size // tensor_parallel_size))
    return max(16, min(DEFAULT_CHUNK_ROWS, 1 << max(0, int(rows_that_fit).bit_length() - 1)))


def _normal_init(std: float):
    def init(weight: torch.Tensor) -> None:
        nn.init.normal_(weight, mean=0.0, std=std)

    return init


def _name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def initialize_parameters(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Draw every weight from ``(seed, parameter name)`` at its full, unpartitioned size, then keep
    this rank's expert-parallel and tensor-parallel shard: any layout (TP, PP, EP, one process) starts from the
    same model.

    Normal(0, init_std) for matrices, smaller for the residual-branch outputs (attention out, MLP
    down) so the residual stream does not grow with depth; ones for norms.
    """
    tensor_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
    tensor_parallel_rank = parallel_state.get_tensor_model_parallel_rank()
    # megatron marks partitioned weights only when it initialises them itself; mark them here.
    marked = set()  # a tied head shares the embedding's parameter: marked once
    for module in model.modules():
        if id(getattr(module, "weight", None)) in marked:
            continue
        if isinstance(module, (VocabParallelEmbedding, ColumnParallelLinear)):
            set_tensor_model_parallel_attributes(module.weight, True, 0, 1)
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(module.weight, True, 1, 1)
        else:
            continue
        marked.add(id(module.weight))
    for module in model.modules():  # a column-parallel bias, unless megatron has marked it already
        bias = getattr(module, "bias", None)
        if isinstance(module, ColumnParallelLinear) and bias is not None and not hasattr(bias, "partition_dim"):
            set_tensor_model_parallel_attributes(bias, True, 0, 1)
    for name, param in model.named_parameters():
        if param.is_meta:  # a model built on the meta device (a plan, a shape check) holds no values
            continue
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        if name.endswith(".bias"):
            param.zero_()
            continue
        std = cfg.init_std
        if name.endswith(("attention.out.weight", "down.weight", "experts.down")):
            std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        sharded = getattr(param, "tensor_model_parallel", False) and tensor_parallel_size > 1
        dim = getattr(param, "partition_dim", 0)
        shape = list(param.shape)
        if sharded:
            shape[dim] *= tensor_parallel_size
        if split_over_experts(param):  # routed experts split over the expert group
            shape[0] *= param.expert_parallel_size
        generator = torch.Generator().manual_seed(_name_seed(seed, name))
        full = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        if split_over_experts(param):
            full = full.chunk(param.expert_parallel_size, dim=0)[param.expert_parallel_rank]
        if sharded:
            full = full.chunk(tensor_parallel_size, dim=dim)[tensor_parallel_rank]
        param.copy_(full.to(param.dtype))


def full_parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the whole model, whatever part of it one rank holds."""
    h = cfg.hidden_size
    attention = h * cfg.qkv_size + cfg.attention_size * h + 2 * h
    attention += (cfg.qkv_size if cfg.qkv_bias else 0) + (2 * cfg.attention_head_dim if cfg.qk_norm else 0)
    mlps = sum(mlp_parameter_count(cfg, layer) for layer in range(cfg.num_layers))
    return (1 if cfg.tie_embeddings else 2) * cfg.vocab_size * h + cfg.num_layers * attention + mlps + h


def mlp_parameter_count(cfg: ModelConfig, layer: int, active: bool = False) -> int:
    """Parameters of layer ``layer``'s MLP: dense, or the router, the routed experts (only the ``moe_top_k`` a
    token uses when ``active``) and the shared expert (with its gate)."""
    h = cfg.hidden_size
    if not cfg.is_moe_layer(layer):
        return 3 * h * cfg.ffn_hidden_size
    experts = cfg.moe_top_k if active else cfg.moe_num_experts
    shared = 3 * h * cfg.moe_shared_ffn_hidden_size + (h if cfg.moe_shared_expert_gate and
                                                          cfg.moe_shared_ffn_hidden_size else 0)
    return h * cfg.moe_num_experts + experts * 3 * h * cfg.expert_ffn_hidden_size + shared


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
