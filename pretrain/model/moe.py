"""Mixture-of-experts MLP: a router, routed SwiGLU experts and an optional shared expert.

Written here rather than taken from megatron-core's ``MoELayer``: on a CPU that layer needs four CUDA-only
calls patched out (its all-to-all dispatcher's streams, the router's device move and buffers, the
sequence-parallel gathers its dispatchers allocate on ``cuda``), and its dispatcher carries hidden states
only, while per-sequence fast weights on routed experts need each routed token's sequence. The math
follows the families' published routers:

- scores: ``softmax`` over the experts (Qwen2/3-MoE, OLMoE, LLaDA-MoE) or ``sigmoid`` (DeepSeek-V3,
  LLaDA2); with ``moe_num_groups`` > 1 the experts are split into groups, each scored by the sum of its
  two best scores, and only the best ``moe_topk_groups`` groups are eligible (group-limited routing);
- the ``moe_top_k`` best eligible experts are chosen; their weights are their scores, renormalised to sum
  to 1 when ``moe_norm_topk`` (DeepSeek-V3's ``norm_topk_prob``; LLaDA2's code always does), then multiplied
  by ``moe_routed_scaling``;
- the output is ``sum_j w_j * expert_j(x)`` plus the shared expert's (ungated, or gated by
  ``sigmoid(x . g)`` as Qwen2-MoE's ``shared_expert_gate``).

Experts are stacked tensors ``gate/up [E, F, H]`` and ``down [E, H, F]``. Tensor parallelism splits each
expert's inner width F like a dense MLP (gate/up by rows, down by columns, the output all-reduced); the
router is replicated. Tokens are grouped by expert and each expert runs one matmul chain on its tokens;
experts that receive none still run (on zero rows), so every expert weight gets a gradient (zero) in every
step and every engine sees the same parameters with gradients.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.experts import ExpertDispatch, mark_expert_parallel
from parallel.megatron import (
    copy_to_tensor_model_parallel_region,
    parallel_state,
    reduce_from_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
)


def route(logits: torch.Tensor, top_k: int, score: str, num_groups: int = 1, topk_groups: int = 1,
          normalize: bool = False, scaling: float = 1.0, bias: torch.Tensor | None = None,
          bias_in_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits [T, E]`` -> (weights ``[T, k]``, chosen experts ``[T, k]``, scores ``[T, E]``), in fp32 or wider.
    ``bias [E]``: added to the scores for choosing the groups and the experts only (auxiliary-loss-free
    balancing); the weights are the unbiased scores, unless ``bias_in_weights`` (LLaDA-MoE's code)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    scores = logits.softmax(dim=-1) if score == "softmax" else logits.sigmoid()
    eligible = scores if bias is None else scores + bias.to(scores.dtype)
    if num_groups > 1:
        tokens, experts = scores.shape
        grouped = eligible.view(tokens, num_groups, experts // num_groups)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # [T, groups]
        best = group_scores.topk(topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        eligible = grouped.masked_fill(~keep[..., None], float("-inf")).view(tokens, experts)
    chosen = eligible.topk(top_k, dim=-1).indices
    weights = (eligible if bias_in_weights and bias is not None else scores).gather(1, chosen)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, chosen, scores


class RoutedExperts(nn.Module):
    """``E`` SwiGLU experts as stacked weights; this tensor-parallel rank's share of each expert's inner width, and
    under expert parallelism (``dispatch``) only this rank's ``E / EP`` experts."""

    def __init__(self, num_experts: int, hidden: int, ffn_hidden: int, tensor_parallel_size: int, dtype,
                 tensor_parallel_group, dispatch: ExpertDispatch | None = None):
        super().__init__()
        local = ffn_hidden // tensor_parallel_size
        self.num_experts = num_experts
        held = dispatch.num_local if dispatch is not None else num_experts
        self.gate = nn.Parameter(torch.empty(held, local, hidden, dtype=dtype))
        self.up = nn.Parameter(torch.empty(held, local, hidden, dtype=dtype))
        self.down = nn.Parameter(torch.empty(held, hidden, local, dtype=dtype))
        for param, dim in ((self.gate, 1), (self.up, 1), (self.down, 2)):
            set_tensor_model_parallel_attributes(param, True, dim, 1)
            if dispatch is not None:  # split over the expert group along dim 0 (see ``mark_expert_parallel``)
                mark_expert_parallel(param, dispatch.size, dispatch.rank)
        self.tp_group = tensor_parallel_group
        self.dispatch = dispatch
        self.sites: dict = {}  # fast-weight sites (``expert_gate``/``expert_up``/``expert_down``), set by the model
        self.fast_scaling = 1.0

    def forward(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, frozen: bool = False,
                fast=None, sequences: int = 1):
        """``x [T, H]`` (``sequences`` sequences of equal length, in order), each token's ``weights`` and
        ``chosen`` experts ``[T, k]`` -> ``[T, H]`` (all-reduced over tensor-parallel ranks; the caller makes
        ``x``'s and the weights' gradients whole). ``fast``: per-sequence LoRA pairs on the experts' projections
        (``lora_rows``), which under expert parallelism live with their experts."""
        gate, up, down = (p.detach() if frozen else p for p in (self.gate, self.up, self.down))
        tokens, top_k = chosen.shape
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, in token order
        token_of = torch.arange(tokens, device=x.device).repeat_interleave(top_k)[order]
        counts = torch.bincount(flat, minlength=self.num_experts)
        routed = x.index_select(0, token_of)
        pairs = {name: fast.get(site.name) for name, site in self.sites.items()} if fast is not None else {}
        pairs = {name: tensors for name, tensors in pairs.items() if tensors is not None}
        sequence_of = None
        if pairs:  # each row's sequence among those whose pairs this rank holds
            sequence_of = token_of // (tokens // sequences)
            if self.dispatch is not None:
                sequence_of = sequence_of + self.dispatch.rank * sequences
        scaling, group = self.fast_scaling, self.tp_group

        def experts(rows: torch.Tensor, per_expert: list[int], sequence: torch.Tensor | None) -> torch.Tensor:
            """This rank's experts on their rows: ``[n, H]`` partial sums over tensor-parallel ranks, followed by
            the down projection's fast-weight term ``[n, H]`` (already whole) when it has one."""
            outputs, terms, start = [], [], 0
            for expert, count in enumerate(per_expert):
                part = rows[start:start + count]
                ids = sequence[start:start + count] if sequence is not None else None

                def lora(name, inputs, base):
                    if name not in pairs:
                        return base
                    a, b = (t[:, expert] for t in pairs[name])
                    return base + lora_rows(inputs, ids, a, b, scaling, self.sites[name].parallel, group)

                inner = F.silu(lora("expert_gate", part, part @ gate[expert].t())) * lora(
                    "expert_up", part, part @ up[expert].t())
                outputs.append(inner @ down[expert].t())
                if "expert_down" in pairs:
                    terms.append(lora("expert_down", inner, torch.zeros_like(outputs[-1])))
                start += count
            return torch.cat([torch.cat(outputs), torch.cat(terms)], dim=1) if terms else torch.cat(outputs)

        if self.dispatch is None:
            outputs = experts(routed, counts.tolist(), sequence_of)  # a device sync on GPUs
        else:
            outputs = self.dispatch.run(routed, counts, experts, sequence_of)
        weight = weights.reshape(-1)[order].to(x.dtype)[:, None]
        hidden = x.shape[1]
        out = torch.zeros_like(x).index_add(0, token_of, outputs[:, :hidden] * weight)
        out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        if outputs.shape[1] > hidden:  # the down projection's fast-weight term, whole on every rank
            # Its gradient to the routing weights is whole on every rank too, and those weights' gradients are
            # summed over tensor-parallel ranks (the caller's copy): each rank sends its 1/tp share.
            weight = gradient_share(weight, parallel_state.get_tensor_model_parallel_world_size())
            out = out + torch.zeros_like(x).index_add(0, token_of, outputs[:, hidden:] * weight)
        return out


def lora_rows(x: torch.Tensor, sequence: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
              parallel: str, tensor_parallel_group) -> torch.Tensor:
    """Each row's own sequence's LoRA term ``scaling * B_s A_s x`` for rows ``x [n, in_local]`` of one expert
    from several sequences (``sequence [n]``; ``a [S, r, in_local]``, ``b [S, out_local, r]``).

    Every row is multiplied by all S pairs and keeps its own (a one-hot over the sequences): exact, S times the
    LoRA's own work, with no per-row copies of the pairs. Tensor parallelism as ``apply_fast_weight``: a column
    projection's low-rank activations are whole on every rank (their gradient summed over the ranks; the rows'
    gradient from them is whole too, so each rank passes on its share), a row projection's are summed over the
    ranks."""
    if a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        a, b = a.to(x.dtype), b.to(x.dtype)
    count, rank = a.shape[0], a.shape[1]
    if parallel == "column":  # the rows' gradient from here is whole, and the caller sums theirs over the ranks
        x = gradient_share(x, parallel_state.get_tensor_model_parallel_world_size())
    own = F.one_hot(sequence, count).to(x.dtype)[:, :, None]  # [n, S, 1]
    low = ((x @ a.reshape(count * rank, -1).t()).view(-1, count, rank) * own).sum(dim=1)  # [n, r]
    if parallel == "column":
        low = copy_to_tensor_model_parallel_region(low, group=tensor_parallel_group)
    else:
        low = reduce_from_tensor_model_parallel_region(low, group=tensor_parallel_group)
    blocks = (own * low[:, None, :]).reshape(-1, count * rank)  # row i: its low-rank vector in its sequence's slot
    return scaling * (blocks @ b.transpose(1, 2).reshape(count * rank, -1))


def gradient_share(t: torch.Tensor, ranks: int) -> torch.Tensor:
    """``t`` itself, whose gradient is divided by ``ranks``: for a path whose gradient is whole on every
    tensor-parallel rank into a tensor whose gradients are summed over them."""
    if ranks == 1:
        return t
    return t / ranks + (t * (1.0 - 1.0 / ranks)).detach()


class MixtureOfExperts(nn.Module):
    """The MLP sub-block of an MoE layer: ``[b, l, H]`` -> ``[b, l, H]``. ``shared_expert`` is a ``SwiGLU`` (the
    caller builds it, so fast weights can sit on it as on a dense MLP) or ``None``."""

    entry_projections: tuple[str, ...] = ()  # nothing reads the normed input before the router decides

    def __init__(self, cfg, dtype, tensor_parallel_size: int, tensor_parallel_group, shared_expert: nn.Module | None,
                 layer: int = 0):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.routing = None  # the model's ``pretrain.model.routing.Routing`` (biases, counts, balancing loss)
        self.router = nn.Linear(cfg.hidden_size, cfg.moe_num_experts, bias=False, dtype=dtype)
        self.experts = RoutedExperts(cfg.moe_num_experts, cfg.hidden_size, cfg.expert_ffn_hidden_size,
                                     tensor_parallel_size, dtype, tensor_parallel_group, expert_dispatch(cfg))
        self.shared_expert = shared_expert
        self.shared_expert_gate = (nn.Linear(cfg.hidden_size, 1, bias=False, dtype=dtype)
                                   if shared_expert is not None and cfg.moe_shared_expert_gate else None)
        self.tp_group = tensor_parallel_group

    @property
    def sites(self) -> dict:
        """Fast-weight sites: those of the shared expert and of the routed experts."""
        return {**(self.shared_expert.sites if self.shared_expert is not None else {}), **self.experts.sites}

    def base_projection(self, name, x, frozen):  # pragma: no cover - no entry projections
        raise KeyError(name)

    def forward(self, x: torch.Tensor, fast=None, frozen: bool = False, shared_base=None) -> torch.Tensor:
        cfg = self.cfg
        b, l, hidden = x.shape
        # Each tensor-parallel rank's expert outputs are partial sums, so the gradients they send to the routing
        # weights, the router and the input are partial too: both go through the copy (its backward all-reduces).
        flat = copy_to_tensor_model_parallel_region(x.reshape(-1, hidden), group=self.tp_group)
        router = self.router.weight.detach() if frozen else copy_to_tensor_model_parallel_region(
            self.router.weight, group=self.tp_group)
        routing = self.routing
        bias = routing.bias[routing.slot(self.layer)] if routing is not None else None
        weights, chosen, scores = route(F.linear(flat, router), cfg.moe_top_k, cfg.moe_score, cfg.moe_num_groups,
                                        cfg.moe_topk_groups, cfg.moe_norm_topk, cfg.moe_routed_scaling, bias,
                                        cfg.moe_bias_in_weights)
        if routing is not None and routing.records(frozen):
            routing.record(self.layer, scores, chosen, b)
        out = self.experts(flat, weights, chosen, frozen, fast, b).view(b, l, hidden)
        if self.shared_expert is not None:
            shared = self.shared_expert(x, fast, frozen)
            if self.shared_expert_gate is not None:
                gate = self.shared_expert_gate.weight.detach() if frozen else self.shared_expert_gate.weight
                shared = torch.sigmoid(F.linear(x, gate)) * shared
            out = out + shared
        return out


def expert_dispatch(cfg) -> ExpertDispatch | None:
    """The exchange of this rank's expert-parallel group (``None`` without expert parallelism)."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    size = parallel_state.get_expert_model_parallel_world_size()
    if size == 1:
        return None
    return ExpertDispatch(parallel_state.get_expert_model_parallel_group(), size,
                          parallel_state.get_expert_model_parallel_rank(), cfg.moe_num_experts)
