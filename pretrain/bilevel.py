"""MemDLM's bi-level step (DESIGN.md sections 2 and 3), one function with a small result.

For a micro-batch with K inner steps:

1. For each pre-anchor state ``j < K-1`` (noisiest first): the prefix under ``no_grad``, then the
   tail with frozen base weights and ``phi_j``; ``phi_{j+1} = phi_j - eta * clip(d loss_j / d phi_j)``.
2. The anchor state's prefix runs once, with grad. A detached copy feeds inner step K (tail,
   frozen base, ``phi_{K-1}``) -> ``phi_K``.
3. The outer tail runs on the attached prefix output with ``phi_K`` detached (first-order);
   the returned loss is the MDLM loss, and its backward reaches only the base weights.

Inner gradients come from ``torch.autograd.grad`` on the fast-weight tensors, so no
optimizer, gradient hook or data-parallel collective sees them. With memory disabled the
same path runs with no fast weights and no inner steps: plain MDLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from data_pipeline.masking import MaskedBatch
from pretrain.config import DiffusionConfig, MemoryConfig
from pretrain.fast_weights import FastWeightPlan, FastWeights
from pretrain.model import DiffusionTransformer
from pretrain.objective import (
    LossNormalizer,
    inner_sequence_scale,
    outer_sequence_scale,
    row_targets,
)


@dataclass
class StepResult:
    loss: torch.Tensor  # this micro-batch's share of the global-batch MDLM loss (attached)
    inner_loss_sums: list[torch.Tensor]  # per inner step: sum over sequences of their inner loss (detached)
    fast_weight_history: list[dict] = field(default_factory=list)  # phi_1..phi_K when recorded


class BilevelStep:
    """Computes the MemDLM (or plain MDLM) loss of a micro-batch; the caller runs the backward."""

    def __init__(
        self,
        model: DiffusionTransformer,
        plan: FastWeightPlan | None,
        memory: MemoryConfig,
        diffusion: DiffusionConfig,
        mask_token_id: int,
        within_documents: bool = False,
    ):
        self.model = model
        self.within_documents = within_documents
        self.memory = memory
        self.diffusion = diffusion
        self.mask_token_id = mask_token_id
        self.plan = plan if memory.enabled else None
        if self.plan is not None:
            model.attach_fast_weights(self.plan)

    def __call__(
        self,
        batch: MaskedBatch,
        normalizer: LossNormalizer,
        step: int,
        seed: int,
        record_fast_weights: bool = False,
    ) -> StepResult:
        model, ids = self.model, batch.input_ids
        attention = batch.attention_mask(self.within_documents)  # None, [b,1,1,l] or [b,1,l,l]
        anchor = batch.anchor_mask
        x_t = torch.where(anchor, self.mask_token_id, ids)  # [b, l]
        outer_scale = outer_sequence_scale(batch.t, batch.maskable, self.diffusion, normalizer)

        outer_targets, outer_row_scale = row_targets(ids, anchor, outer_scale)

        if self.plan is None:
            h = model.prefix(x_t, model.num_blocks, attention)
            loss = model.tail_loss(h, model.num_blocks, anchor, outer_targets, outer_row_scale, attention)
            return StepResult(loss, [])

        expected = self.memory.num_inner_steps - 1
        if batch.pre_anchor_masks.shape[0] != expected:
            raise ValueError(
                f"batch has {batch.pre_anchor_masks.shape[0]} pre-anchor states but memory.num_inner_steps="
                f"{self.memory.num_inner_steps} needs {expected}; build batches with the same num_inner_steps"
            )
        boundary = self.plan.boundary_block
        param = next(model.parameters())
        fast = self.plan.initial(ids.shape[0], seed, step, param.device, param.dtype)
        inner_loss_sums, history = [], []

        def inner_step(h_detached: torch.Tensor, state: torch.Tensor, entry=None) -> None:
            nonlocal fast
            loss = self._inner_loss(h_detached, state, batch, attention, fast, boundary, entry)
            grads = torch.autograd.grad(loss, fast.leaves(), materialize_grads=True)
            fast = self.plan.sgd_step(fast, list(grads))
            inner_loss_sums.append(loss.detach())
            if record_fast_weights:
                history.append(fast.clone_values())

        # 1. Pre-anchor states: prefix without grad, inner update on the tail.
        for state in batch.pre_anchor_masks:
            with torch.no_grad():
                h_state = model.prefix(torch.where(state, self.mask_token_id, ids), boundary, attention)
            inner_step(h_state, state)

        # 2. The anchor prefix, once, with grad; a detached copy feeds the last inner step. The
        #    start of the first tail sub-block (its norm and the base projections that read the
        #    normed input) is fast-weight free, so it is shared too.
        h_anchor = model.prefix(x_t, boundary, attention)
        if self.memory.share_anchor_prefix:
            entry = model.block_entry(h_anchor, boundary)
            inner_step(h_anchor.detach(), anchor, entry.detach())
        else:
            entry = None
            with torch.no_grad():
                h_inner = model.prefix(x_t, boundary, attention)
            inner_step(h_inner, anchor)

        # 3. Outer loss with phi_K as a constant.
        loss = model.tail_loss(
            h_anchor, boundary, anchor, outer_targets, outer_row_scale, attention, fast.detach(), entry=entry
        )
        return StepResult(loss, inner_loss_sums, history)

    def _inner_loss(self, h, state, batch: MaskedBatch, attention, fast: FastWeights, boundary: int, entry):
        scale = inner_sequence_scale(state, batch.maskable, self.memory.inner_loss_weight)
        targets, row_scale = row_targets(batch.input_ids, state, scale)
        with torch.enable_grad():
            return self.model.tail_loss(
                h, boundary, state, targets, row_scale, attention, fast, frozen=True, entry=entry
            )
