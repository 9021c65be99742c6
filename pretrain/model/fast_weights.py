"""Fast weights: MemDLM's transient parametric memory.

Each adapted projection ("site") carries a per-sequence low-rank pair (A, B) or a dense
delta. Every tensor has a leading batch dimension: sequence i has its own memory, written
only by its own inner loss, so the result of a step does not depend on how the global
batch is cut into micro-batches or data-parallel ranks. Fast weights are plain tensors,
never parameters: no optimizer, hook or data-parallel collective ever sees them.

Tensor parallelism follows the base layer (docs/DESIGN.md section 5):
- column-parallel ``W[out/tp, in]``: ``A[r, in]`` replicated, ``B[out/tp, r]`` sharded;
- row-parallel ``W[out, in/tp]``: ``A[r, in/tp]`` sharded, ``B[out, r]`` replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.megatron import (
    copy_to_tensor_model_parallel_region,
    parallel_state,
    reduce_from_tensor_model_parallel_region,
)
from pretrain.config import adapted_layers

MODULE_PARALLELISM = {"qkv": "column", "gate": "column", "up": "column", "out": "row", "down": "row",
                      "expert_gate": "column", "expert_up": "column", "expert_down": "row"}
# Sub-block of a layer that holds each module: 0 = attention, 1 = MLP. ``expert_*``: the routed experts of an
# MoE layer (one LoRA pair per sequence and expert); an MoE layer's ``gate``/``up``/``down`` are its shared expert.
MODULE_SUBBLOCK = {"qkv": 0, "out": 0, "gate": 1, "up": 1, "down": 1, "expert_gate": 1, "expert_up": 1,
                   "expert_down": 1}


@dataclass(frozen=True)
class FastWeightSite:
    """One adapted projection and how its fast weights are partitioned."""

    layer: int
    module: str
    in_features: int  # logical (unpartitioned) sizes
    out_features: int
    tensor_parallel_size: int
    tensor_parallel_rank: int
    index: int = 0  # its place in the plan (draws of its initial value and dropout masks)
    num_experts: int = 0  # routed experts (``expert_*`` sites): each has its own pair per sequence
    expert_parallel_size: int = 1  # ranks that split the experts: each holds its experts' pairs for the
    expert_parallel_rank: int = 0  # sequences of every rank of its expert group ([b x size, E / size, ...])

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.module}"

    @property
    def parallel(self) -> str:
        return MODULE_PARALLELISM[self.module]

    @property
    def routed(self) -> bool:
        return self.num_experts > 0

    @property
    def block(self) -> int:
        """Index of the sub-block (2 per layer) that holds this site."""
        return 2 * self.layer + MODULE_SUBBLOCK[self.module]


class FastWeights:
    """The fast-weight tensors of one micro-batch, keyed by site name.

    Per site: ``(A [b, r, in_local], B [b, out_local, r])`` for LoRA, ``(delta [b, out_local, in_local],)``
    for the dense form; a routed-expert site has an expert dimension after the sequences, ``A [b', E_local, r,
    in_local]``, where under expert parallelism ``b'`` is the expert group's sequences (b on each of its ranks).
    """

    def __init__(self, tensors: dict[str, tuple[torch.Tensor, ...]], dropout: tuple | None = None,
                 pass_id: int = 0, tokens: tuple[int, int] | None = None):
        self.tensors = tensors
        # --memory.inner_dropout in training: (p, seed, step, sample indices [b]); the masks also depend on
        # the pass (``for_pass``) and the site, so every layout drops the same elements.
        self.dropout = dropout
        self.pass_id = pass_id
        # Under sequence parallelism: the token positions [start, end) this rank's inputs hold (dropout masks
        # are drawn for whole sequences and cut to them).
        self.tokens = tokens

    def get(self, name: str):
        return self.tensors.get(name)

    def leaves(self) -> list[torch.Tensor]:
        return [t for site in self.tensors.values() for t in site]

    def with_leaves(self, leaves: list[torch.Tensor]) -> "FastWeights":
        it = iter(leaves)
        return FastWeights({name: tuple(next(it) for _ in site) for name, site in self.tensors.items()},
                           self.dropout, self.pass_id, self.tokens)

    def for_pass(self, pass_id: int) -> "FastWeights":
        """The same tensors, for the forward pass ``pass_id`` of a step (its dropout masks)."""
        return FastWeights(self.tensors, self.dropout, pass_id, self.tokens)

    def dropout_mask(self, site: "FastWeightSite", shape: torch.Size, device, dtype) -> torch.Tensor | None:
        """The scaled keep-mask ``[b, l, in_local]`` of ``site``'s input in this pass, or None (no dropout)."""
        if self.dropout is None:
            return None
        p, seed, step, sample_index = self.dropout
        b, l, in_local = shape
        start, end = self.tokens if self.tokens is not None else (0, l)
        masks = []
        for index in sample_index.tolist():
            generator = torch.Generator().manual_seed(_mix(_mix(seed, step, self.pass_id), site.index, index))
            keep = (torch.rand(end, site.in_features, generator=generator) >= p)[start:end]
            if site.parallel == "row" and site.tensor_parallel_size > 1:
                keep = keep.chunk(site.tensor_parallel_size, dim=1)[site.tensor_parallel_rank]
            masks.append(keep)
        return (torch.stack(masks).to(device=device, dtype=dtype) / (1.0 - p))[:, :l, :in_local]

    def detach(self) -> "FastWeights":
        return self.with_leaves([t.detach() for t in self.leaves()])

    def clone_values(self) -> dict[str, tuple[torch.Tensor, ...]]:
        return {name: tuple(t.detach().clone() for t in site) for name, site in self.tensors.items()}


class FastWeightPlan:
    """Where fast weights go and what shape they have (the sites, the form, the LoRA rank and scaling), how
    to reset them, and the SGD update the inner loop applies. The inner loop's settings (learning rate,
    clipping, loss weights) are the step's ``memory`` (``pretrain.memdlm.bilevel.BilevelStep``), not here."""

    def __init__(self, sites: list[FastWeightSite], adapter: str = "lora", lora_rank: int = 32,
                 lora_alpha: float = 64.0, tensor_parallel_group=None, expert_group=None):
        self.sites = sites
        self.expert_group = expert_group  # the expert-parallel group routed-expert sites are split over
        self.adapter = adapter  # "lora" (A, B) or "full" (a dense delta)
        self.lora_rank = lora_rank
        self.scaling = lora_alpha / lora_rank if adapter == "lora" else 1.0  # the update is scaled by this
        self.tensor_parallel_group = tensor_parallel_group
        # The tail starts at the first sub-block that holds a fast weight; everything
        # before it (the prefix) sees the same input in the last inner step and the outer pass.
        self.boundary_block = min(site.block for site in sites)

    # -- reset ---------------------------------------------------------------------------
    def initial(self, batch_size: int, seed: int, step: int, device, dtype) -> FastWeights:
        """phi_0 for one step: ``A ~ kaiming_uniform(a=sqrt(5))``, ``B = 0`` (or a zero delta).

        ``A_0`` is drawn from ``(seed, step, site)`` on the full logical tensor and then sliced,
        so every rank, layout and micro-batch of a step starts from the same ``A_0``.
        """
        tensors = {}
        for index, site in enumerate(self.sites):
            in_local, out_local = self.local_shape(site)
            if self.adapter == "full":
                delta = torch.zeros(batch_size, out_local, in_local, device=device, dtype=dtype)
                tensors[site.name] = (delta.requires_grad_(),)
                continue
            rank = self.lora_rank
            generator = torch.Generator().manual_seed(_mix(seed, step, index))
            bound = 1.0 / math.sqrt(site.in_features)
            experts = (site.num_experts,) if site.routed else ()  # each expert draws its own A
            a_full = torch.empty(*experts, rank, site.in_features, dtype=torch.float64)
            a_full.uniform_(-bound, bound, generator=generator)
            if site.parallel == "row":
                a_full = a_full.chunk(site.tensor_parallel_size, dim=-1)[site.tensor_parallel_rank]
            if site.routed:
                a_full = a_full.chunk(site.expert_parallel_size, dim=0)[site.expert_parallel_rank]
            a_full = a_full.to(dtype)
            if torch.device(device).type == "cuda":  # from pinned memory: the copy does not block the host
                a_full = a_full.pin_memory()
            rows = batch_size * site.expert_parallel_size
            a = a_full.to(device, non_blocking=True).expand(rows, *a_full.shape).clone()
            b_out = out_local if site.parallel == "column" else site.out_features
            b = torch.zeros(rows, *a_full.shape[:-2], b_out, rank, device=device, dtype=dtype)
            tensors[site.name] = (a.requires_grad_(), b.requires_grad_())
        return FastWeights(tensors)

    def local_shape(self, site: FastWeightSite) -> tuple[int, int]:
        if site.parallel == "column":
            return site.in_features, site.out_features // site.tensor_parallel_size
        return site.in_features // site.tensor_parallel_size, site.out_features

    def leaf_groups(self) -> list[list]:
        """For each leaf (in ``FastWeights.leaves`` order): the groups it is split over (tensor-parallel ranks;
        for a routed-expert site, also the expert group), whose pieces make up each sequence's tensor."""
        groups = []
        for site in self.sites:
            tensor = [self.tensor_parallel_group] if site.tensor_parallel_size > 1 else []
            experts = [self.expert_group] if site.routed and site.expert_parallel_size > 1 else []
            if self.adapter == "full":
                groups.append(tensor + experts)
            elif site.parallel == "column":
                groups.extend([experts, tensor + experts])  # A replicated, B sharded
            else:
                groups.extend([tensor + experts, experts])  # A sharded, B replicated
        return groups

    # -- inner SGD step --------------------------------------------------------------------
    @torch.no_grad()
    def sgd_step(self, fast: FastWeights, grads: list[torch.Tensor], lr: float, clip: float) -> FastWeights:
        """``phi - lr * clip(grad)`` with each tensor of each sequence clipped to norm ``clip`` on its own
        (0: no clipping)."""
        new_leaves = []
        for leaf, grad, groups in zip(fast.leaves(), grads, self.leaf_groups()):
            if clip > 0:
                grad = clip_per_sequence(grad, clip, groups)
            new_leaves.append((leaf - lr * grad).requires_grad_())
        return fast.with_leaves(new_leaves)


def clip_per_sequence(grad: torch.Tensor, clip: float, groups=()) -> torch.Tensor:
    """Scale each sequence's gradient ``grad[i]`` to norm ``clip`` if its norm exceeds it.

    For a tensor split over ranks (tensor-parallel shards, experts over the expert group) the norm is that of
    the whole logical tensor (sums of squares all-reduced over each of ``groups``).
    """
    squares = grad.flatten(1).pow(2).sum(dim=1)  # [b]
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(squares, group=group)
    norm = squares.sqrt()
    scale = torch.where(norm > clip, clip / norm, torch.ones_like(norm))
    return grad * scale.view(-1, *([1] * (grad.dim() - 1)))


def apply_fast_weight(
    x: torch.Tensor, base_out: torch.Tensor, site: FastWeightSite, tensors, scaling: float, tensor_parallel_group,
    dropout: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base_out`` plus the fast-weight contribution of ``site`` for input ``x [b, l, in_local]`` (its input
    multiplied by ``dropout``, a scaled keep-mask, when given).

    Fast weights stored in another dtype than ``x`` (``--memory.dtype bf16`` in an fp32 run) are cast
    to it; under autocast the matmuls run in its dtype anyway."""
    if tensors[0].dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        tensors = tuple(t.to(x.dtype) for t in tensors)
    if dropout is not None:
        x = x * dropout
    if len(tensors) == 1:  # dense delta
        (delta,) = tensors
        if site.parallel == "column":
            return torch.baddbmm(base_out, x, delta.transpose(1, 2))
        update = torch.bmm(x, delta.transpose(1, 2))
        update = reduce_from_tensor_model_parallel_region(update, group=tensor_parallel_group)
        return base_out + update
    a, b = tensors
    low_rank = torch.bmm(x, a.transpose(1, 2))  # [b, l, r]
    if site.parallel == "column":
        # Every rank holds the full x A^T; its gradient is the sum of the ranks' partial B-shard terms.
        low_rank = copy_to_tensor_model_parallel_region(low_rank, group=tensor_parallel_group)
    else:
        low_rank = reduce_from_tensor_model_parallel_region(low_rank, group=tensor_parallel_group)
    return torch.baddbmm(base_out, low_rank, b.transpose(1, 2), alpha=scaling)


def _mix(seed: int, step: int, index: int) -> int:
    """A 63-bit seed from (seed, step, site index) that differs for every step and site."""
    value = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    value ^= value >> 31
    value = (value * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return value >> 1


def build_fast_weight_plan(model_cfg, memory_cfg, tensor_parallel_size: int = 1,
                           tensor_parallel_rank: int = 0, tensor_parallel_group=None) -> FastWeightPlan:
    """The sites of ``memory_cfg.target_modules`` on the adapted layers of a model shaped by ``model_cfg``; on a
    mixture-of-experts layer the MLP modules go to the routed experts and/or the shared expert
    (``memory_cfg.moe_targets``). Routed-expert sites follow this rank's expert-parallel group."""
    h = model_cfg.hidden_size
    experts, expert_size, expert_rank, expert_group = model_cfg.moe_num_experts, 1, 0, None
    if experts and parallel_state.model_parallel_is_initialized():
        expert_size = parallel_state.get_expert_model_parallel_world_size()
        expert_rank = parallel_state.get_expert_model_parallel_rank()
        expert_group = parallel_state.get_expert_model_parallel_group() if expert_size > 1 else None

    def shape(layer: int, module: str) -> tuple[int, int]:
        ffn = model_cfg.expert_ffn_hidden_size if module.startswith("expert_") else model_cfg.mlp_width(layer)
        return {"qkv": (h, model_cfg.qkv_size), "out": (model_cfg.attention_size, h), "gate": (h, ffn),
                "up": (h, ffn), "down": (ffn, h)}[module.removeprefix("expert_")]

    def modules(layer: int) -> list[str]:
        listed = [m for m in ("qkv", "out", "gate", "up", "down") if m in memory_cfg.target_module_list]
        if not model_cfg.is_moe_layer(layer):
            return listed
        targets = memory_cfg.moe_target_set
        chosen = [m for m in listed if m in ("qkv", "out")]
        mlp = [m for m in listed if m in ("gate", "up", "down")]
        if "routed" in targets:
            chosen += [f"expert_{m}" for m in mlp]
        if "shared" in targets and model_cfg.moe_shared_ffn_hidden_size:
            chosen += mlp
        return chosen

    places = [(layer, module) for layer in adapted_layers(model_cfg.num_layers, memory_cfg.layer_fraction)
              for module in modules(layer)]
    sites = [FastWeightSite(layer, module, *shape(layer, module), tensor_parallel_size, tensor_parallel_rank, index,
                            *((experts, expert_size, expert_rank) if module.startswith("expert_") else ()))
             for index, (layer, module) in enumerate(places)]
    return FastWeightPlan(sites, memory_cfg.adapter, memory_cfg.lora_rank, memory_cfg.lora_alpha, tensor_parallel_group,
                          expert_group)
