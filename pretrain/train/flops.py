"""FLOPs of a step, counted for a bidirectional model, and model FLOP utilisation (MFU).

Conventions (a matmul of ``[m, k] x [k, n]`` is ``2 m k n``; elementwise work is not counted):

- Attention sees the whole ``l x l`` matrix (no causal halving): per token and layer, the scores
  ``Q K^T`` and the weighted sum ``P V`` are ``2 l h`` each, ``4 l h`` forward; a backward is twice
  its forward (input and weight gradients; for attention dQ, dK, dV and dP).
- **Model FLOPs** (``model_flops_per_token``): the plain MDLM step as other trainers count theirs,
  forward + backward with the head on every token:
  ``6 (L (h qkv + h^2 + 3 h f) + h V) + 12 L l h`` per token (``qkv = (heads + 2 kv heads) d``; the
  embedding lookup is no matmul). ``mfu_model`` = model FLOPs / (step time x peak x ranks): the number to
  compare with autoregressive trainers.
- **Executed FLOPs** (``executed_flops``): what the step runs, the inner loop included: every pass of
  the bi-level step (pre-anchor prefix and tail, the inner backward that reaches the fast weights only,
  the shared anchor prefix and entry projections, the outer tail and the full backward), the head on
  the masked rows only, LoRA or dense fast-weight matmuls, and the forward passes that activation
  recomputation repeats. ``mfu_total`` uses it. It equals ``torch.utils.flop_counter``'s count of a step
  (tested), given the masked row counts the loader reports.
"""

from __future__ import annotations

import statistics
import time

import torch

from data_pipeline.trajectory import ANCHOR
from pretrain.config import MemoryConfig, ModelConfig
from pretrain.model.fast_weights import adapted_layers
from pretrain.model.transformer import mlp_parameter_count

# Dense bf16 tensor-core peak per GPU, in FLOP/s (NVIDIA data sheets; SXM parts).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def model_flops_per_token(cfg: ModelConfig) -> float:
    """``6 N + 12 L l h``: ``N`` the matrix parameters a token uses (a mixture of experts counts its router, the
    ``moe_top_k`` experts a token goes to and the shared expert, not the others)."""
    h, layers = cfg.hidden_size, cfg.num_layers
    mlps = sum(mlp_parameter_count(cfg, layer, active=True) for layer in range(layers))
    matmul = layers * (h * cfg.qkv_size + cfg.attention_size * h) + mlps + h * cfg.vocab_size
    return 6.0 * matmul + 12.0 * layers * cfg.seq_len * cfg.attention_size


class _Layout:
    """Per-token forward FLOPs of each sub-block's pieces, and where the fast weights sit."""

    def __init__(self, cfg: ModelConfig, memory: MemoryConfig, seq_len: int, sequences: int = 1):
        self.cfg = cfg
        self.core = 4.0 * seq_len * cfg.attention_size  # attention scores and weighted sum, per token, forward
        self.num_blocks = 2 * cfg.num_layers
        # Routed experts' fast weights: each routed row meets the pairs of all the ``sequences`` an expert's rank
        # holds (``pretrain.model.moe.lora_rows``), so their work is that many times a LoRA's.
        self.sequences = sequences
        self.sites = set()
        if memory.enabled:
            for layer in adapted_layers(cfg.num_layers, memory.layer_fraction):
                for module in memory.target_module_list:
                    if module in ("qkv", "out"):
                        self.sites.add((2 * layer, module))
                    elif not cfg.is_moe_layer(layer):
                        self.sites.add((2 * layer + 1, module))
                    else:
                        if "routed" in memory.moe_target_set:
                            self.sites.add((2 * layer + 1, f"expert_{module}"))
                        if "shared" in memory.moe_target_set and cfg.moe_shared_ffn_hidden_size:
                            self.sites.add((2 * layer + 1, module))
        self.boundary = min((b for b, _ in self.sites), default=self.num_blocks)
        self.memory = memory

    def is_moe(self, block: int) -> bool:
        return block % 2 == 1 and self.cfg.is_moe_layer(block // 2)

    def projections(self, block: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(entry projections that read the normed input and are shared between passes, the rest) of a sub-block;
        a mixture of experts shares none: its routed experts (``routed``) and its shared expert's projections."""
        if block % 2 == 0:
            return ("qkv",), ("out",)
        if self.is_moe(block):
            return (), ("routed",) + (("gate", "up", "down") if self.cfg.moe_shared_ffn_hidden_size else ())
        return ("gate", "up"), ("down",)

    def shape(self, name: str, block: int) -> tuple[int, int]:
        cfg, h = self.cfg, self.cfg.hidden_size
        if name in ("qkv", "out"):
            return (h, cfg.qkv_size) if name == "qkv" else (cfg.attention_size, h)
        f = cfg.expert_ffn_hidden_size if name.startswith("expert_") else cfg.mlp_width(block // 2)
        return (f, h) if name.endswith("down") else (h, f)

    def routed(self, block: int, cost) -> float:
        """Per token: ``cost(site)`` of each routed-expert site of ``block``, for each of the ``moe_top_k`` rows a
        token sends and each sequence whose pairs its expert's rank holds."""
        sites = [name for b, name in self.sites if b == block and name.startswith("expert_")]
        return self.cfg.moe_top_k * self.sequences * sum(cost(name, block) for name in sites)

    def routed_sites(self, block: int) -> set[str]:
        return {name.removeprefix("expert_") for b, name in self.sites if b == block and name.startswith("expert_")}

    def base(self, name: str, block: int) -> float:
        cfg = self.cfg
        if name == "routed":  # the router, the chosen experts' SwiGLUs and a shared expert's gate, per token
            h = cfg.hidden_size
            gate = h if cfg.moe_shared_expert_gate and cfg.moe_shared_ffn_hidden_size else 0
            return 2.0 * (h * cfg.moe_num_experts + cfg.moe_top_k * 3 * h * cfg.expert_ffn_hidden_size + gate)
        i, o = self.shape(name, block)
        return 2.0 * i * o

    def fast(self, name: str, block: int) -> float:
        """Forward FLOPs of the fast weights on one projection, per token."""
        i, o = self.shape(name, block)
        if self.memory.adapter == "full":
            return 2.0 * i * o
        return 2.0 * self.memory.lora_rank * (i + o)

    def fast_grads(self, name: str, block: int) -> float:
        """The fast weights' own gradients: LoRA ``dB``, ``d(x A^T)`` and ``dA``; a dense delta's ``d delta``."""
        i, o = self.shape(name, block)
        if self.memory.adapter == "full":
            return 2.0 * i * o
        return 2.0 * self.memory.lora_rank * (2 * o + i)

    def fast_input_grad(self, name: str, block: int) -> float:
        """What the fast-weight path adds to an input gradient in the inner backward (``d(x A^T) A``)."""
        i, o = self.shape(name, block)
        return 2.0 * i * o if self.memory.adapter == "full" else 2.0 * self.memory.lora_rank * i

    def fast_outer(self, name: str, block: int) -> float:
        """The fast-weight path in the outer backward (the fast weights are constants there)."""
        return self.fast(name, block)

    def forward(self, blocks, with_fast: bool, skip_entry_of: int | None = None) -> float:
        total = 0.0
        for block in blocks:
            entry, rest = self.projections(block)
            for name in entry + rest:
                if not (block == skip_entry_of and name in entry):
                    total += self.base(name, block)
                if with_fast and (block, name) in self.sites:
                    total += self.fast(name, block)
            if with_fast and self.is_moe(block):
                total += self.routed(block, self.fast)
            if block % 2 == 0:
                total += self.core
        return total

    def entry(self, block: int) -> float:
        return sum(self.base(name, block) for name in self.projections(block)[0])

    def inner_backward(self, blocks) -> float:
        """``autograd.grad`` of an inner loss w.r.t. the fast weights only (the tail's input carries no
        graph): fast-weight gradients everywhere, input gradients only where an earlier site needs them."""
        total, blocks = 0.0, list(blocks)
        for position, block in enumerate(blocks):
            below = any(b in blocks[:position] for b, _ in self.sites)  # a site in an earlier tail block
            if self.is_moe(block):
                total += self._moe_inner_backward(block, below)
                continue
            entry, rest = self.projections(block)
            inner_sites = [n for n in entry if (block, n) in self.sites]
            # The projection(s) after the entry: their input gradient is needed for entry sites or below.
            need_rest_input = bool(inner_sites) or below
            for name in rest:
                if (block, name) in self.sites:
                    total += self.fast_grads(name, block)
                    if need_rest_input:
                        total += self.fast_input_grad(name, block)
                if need_rest_input:
                    total += self.base(name, block)
            if block % 2 == 0 and need_rest_input:
                total += 2.0 * self.core
            for name in entry:
                if (block, name) in self.sites:
                    total += self.fast_grads(name, block)
                    if below:
                        total += self.fast_input_grad(name, block)
                if below:
                    total += self.base(name, block)
        return total

    def _moe_inner_backward(self, block: int, below: bool) -> float:
        """A mixture of experts in the inner backward: the shared expert's fast-weight gradients; the input gradient
        of its down projection when a site before it (its gate or up, or an earlier block) needs it; the rest of its
        input gradients, and the routed experts' and the router's, only for a site in an earlier block."""
        sites = [name for name in ("gate", "up", "down") if (block, name) in self.sites]
        total = sum(self.fast_grads(name, block) for name in sites)
        if self.cfg.moe_shared_ffn_hidden_size and (below or {"gate", "up"} & set(sites)):
            total += self.base("down", block) + (self.fast_input_grad("down", block) if "down" in sites else 0.0)
        if below:
            total += self.base("routed", block)
            for name in ("gate", "up") if self.cfg.moe_shared_ffn_hidden_size else ():
                total += self.base(name, block) + (self.fast_input_grad(name, block) if name in sites else 0.0)
        # The routed experts' own pairs (each routed row): their gradients; the down projection's input gradient
        # (and its pair's) when a gate or up pair needs it; a gate or up pair's input gradient for an earlier site.
        routed = self.routed_sites(block)
        total += self.routed(block, self.fast_grads)
        top_k, width = self.cfg.moe_top_k, self.cfg.expert_ffn_hidden_size
        if "down" in routed and (below or {"gate", "up"} & routed):
            total += top_k * self.sequences * self.fast_input_grad("expert_down", block)
        if not below and {"gate", "up"} & routed:
            total += top_k * 2.0 * width * self.cfg.hidden_size  # (below: inside ``base("routed")``)
        if below:
            total += sum(top_k * self.sequences * self.fast_input_grad(f"expert_{name}", block)
                         for name in ("gate", "up") if name in routed)
        return total

    def outer_backward_without_fast(self, blocks) -> float:
        """The full backward through ``blocks`` without fast weights."""
        total = 0.0
        for block in blocks:
            entry, rest = self.projections(block)
            total += sum(2.0 * self.base(name, block) for name in entry + rest)
            if block % 2 == 0:
                total += 2.0 * self.core
        return total

    def outer_backward(self, blocks) -> float:
        """The full backward through ``blocks`` with the fast weights constant."""
        total = 0.0
        for block in blocks:
            entry, rest = self.projections(block)
            for name in entry + rest:
                total += 2.0 * self.base(name, block)
                if (block, name) in self.sites:
                    total += self.fast_outer(name, block)
            if self.is_moe(block):
                total += self.routed(block, self.fast_outer)
            if block % 2 == 0:
                total += 2.0 * self.core
        return total


def executed_flops(cfg: ModelConfig, memory: MemoryConfig, batch_size: int, row_counts: tuple[int, ...],
                   recompute: str = "none", seq_len: int | None = None, uses_memory: bool = True,
                   expert_parallel_size: int = 1) -> float:
    """FLOPs one micro-batch's step runs (forward and backward), given ``MaskedBatch.row_counts`` (the rows
    each inner step of one epoch scores, then the anchor's); ``uses_memory``: whether this step runs the
    inner loop (``--memory.probability``). Under expert parallelism a routed expert's rank holds the fast
    weights of the expert group's ``batch_size x expert_parallel_size`` sequences."""
    seq_len = seq_len or cfg.seq_len
    tokens = batch_size * seq_len
    layout = _Layout(cfg, memory, seq_len, batch_size * expert_parallel_size)
    head = 2.0 * cfg.hidden_size * cfg.vocab_size  # one head matmul, per row
    prefix, tail = range(layout.boundary), range(layout.boundary, layout.num_blocks)
    anchor_rows = row_counts[-1]
    recomputed = {"none": 0.0, "full": layout.forward(prefix, False),
                  "selective": layout.forward([b for b in prefix if b % 2 == 0], False)}[recompute]
    if not layout.sites or not uses_memory:  # plain MDLM: everything forward and backward, head on the masked rows
        return tokens * (3.0 * layout.forward(range(layout.num_blocks), False) + recomputed) + 3.0 * head * anchor_rows
    trajectory = memory.trajectory
    epoch = trajectory.steps()
    passes = [(i, s) for _ in range(memory.inner_epochs) for i, s in enumerate(epoch)]
    in_anchor = bool(passes) and passes[-1][1].state == ANCHOR
    distill = memory.inner_loss != "ce"
    logits = memory.inner_loss != "distill_hidden"
    student_head = 2.0 * head if logits else 0.0  # logits and their input gradient (the head is frozen)
    teacher_head = head if logits else 0.0
    total = 0.0
    for number, (index, _) in enumerate(passes):
        rows = row_counts[index]
        if distill:  # the teacher: the whole model with the current fast weights, without grad
            total += tokens * (layout.forward(prefix, False) + layout.forward(tail, True)) + teacher_head * rows
        if not (in_anchor and number == len(passes) - 1):  # an inner step from its own ids
            total += tokens * (layout.forward(prefix, False) + layout.forward(tail, True) + layout.inner_backward(tail))
            total += student_head * rows
    separate = in_anchor and (not memory.share_anchor_prefix or memory.pad_unmask == "inner")
    base = memory.base_weight > 0
    # The anchor: prefix once with grad; the sub-block entry computed apart when shared (by the last inner
    # step, or by the outer and the base-model tails).
    entry_shared = (in_anchor and not separate) or (not in_anchor and base)
    skip = layout.boundary if entry_shared else None
    total += tokens * (layout.forward(prefix, False) + (layout.entry(layout.boundary) if entry_shared else 0.0))
    if in_anchor:
        rows = row_counts[passes[-1][0]]
        if separate:  # the inner anchor's own prefix, without grad
            total += tokens * layout.forward(prefix, False)
        total += tokens * (layout.forward(tail, True, skip_entry_of=skip) + layout.inner_backward(tail))
        total += student_head * rows
    # The outer tail with phi_K (and the base model's without fast weights), then the full backward.
    total += tokens * (layout.forward(tail, True, skip_entry_of=skip) + layout.outer_backward(tail)
                       + 2.0 * layout.forward(prefix, False) + recomputed)
    total += 3.0 * head * anchor_rows
    if base:
        base_backward = layout.outer_backward_without_fast(tail)
        if skip is not None:  # the shared entry's own backward runs once, for both tails
            base_backward -= 2.0 * layout.entry(layout.boundary)
        total += tokens * (layout.forward(tail, False, skip_entry_of=skip) + base_backward)
        total += 3.0 * head * anchor_rows
    return total


def peak_flops(device: torch.device, bf16: bool) -> tuple[float, str]:
    """The device's peak FLOP/s for the step's matmuls, and where the figure comes from: a data-sheet
    figure for known GPUs in bf16, else the rate of a 2048^3 matmul measured here."""
    if device.type == "cuda" and bf16:
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16.items():
            if key in name:
                return value, f"{key} bf16 dense peak"
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    rates = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(2 * 2048**3 / (time.perf_counter() - start))
    return statistics.median(rates[1:]), f"measured {str(dtype).split('.')[-1]} 2048^3 matmul"
