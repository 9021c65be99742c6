"""MemDLM's bi-level step (docs/DESIGN.md section 2) as public stages, and one function that runs them.

The stages, numbered as in docs/DESIGN.md section 2 (``h`` = the activations entering the
boundary sub-block, the first with fast weights; everything before it is the prefix):

0. ``noised_ids`` / ``initial_fast_weights``: the state's input ids; phi_0 for the step.
1-3. ``inner_update``: one inner SGD step on one state (a pre-anchor state, noisiest first):
   the tail with frozen base weights and phi_j, ``phi_{j+1} = phi_j - eta * clip(d loss_j / d phi_j)``.
   The caller computes ``h`` without grad.
4-5. ``anchor_loss``: on the anchor prefix output, computed once with grad: the last inner
   step on a detached copy -> phi_K, then the outer tail with phi_K detached (first-order).
   Its loss is the micro-batch's share of the global MDLM loss; its backward reaches only the
   base weights.

``BilevelStep.__call__`` runs them for one micro-batch on a whole model; the pipeline's last
stage (``pretrain.memdlm.pipeline_stage``) runs the same stages on the activations it receives.

Inner gradients come from ``torch.autograd.grad`` on the fast-weight tensors, so no
optimizer, gradient hook or data-parallel collective sees them. With memory disabled the
same path runs with no fast weights and no inner steps: plain MDLM.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from data_pipeline.masking import MaskedBatch
from parallel.collectives import LossNormalizer
from pretrain.config import DiffusionConfig, MemoryConfig
from pretrain.memdlm.objective import inner_sequence_scale, outer_sequence_scale
from pretrain.model.attention import document_block_mask
from pretrain.model.fast_weights import FastWeightPlan, FastWeights
from pretrain.model.layers import BlockEntry
from pretrain.model.rows import select_rows
from pretrain.model.transformer import DiffusionTransformer


@dataclass
class StepResult:
    loss: torch.Tensor  # this micro-batch's share of the global-batch MDLM loss (attached)
    inner_loss_sums: list[torch.Tensor]  # per inner step: sum over sequences of their inner loss (detached)
    fast_weight_history: list[dict] = field(default_factory=list)  # phi_1..phi_K when recorded


class BilevelStep:
    """Computes the MemDLM (or plain MDLM) loss of a micro-batch; the caller runs the backward.

    ``autocast``: a context factory every stage runs under (bf16 autocast, or nothing); ``recompute``:
    activation recomputation of the prefix layers in the anchor pass (``none``, ``full``, ``selective``:
    attention only). The inner-loop passes keep no outer graph, so they never need it."""

    def __init__(
        self,
        model: DiffusionTransformer,
        plan: FastWeightPlan,
        memory: MemoryConfig,
        diffusion: DiffusionConfig,
        mask_token_id: int,
        seed: int = 0,
        within_documents: bool = False,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        recompute: str = "none",
    ):
        self.model = model
        self.plan = plan  # where fast weights go; kept with memory off too (inference-time adaptation uses it)
        self.memory = memory  # the inner loop's settings: the one copy the step, its plan and adaptation use
        self.diffusion = diffusion
        self.mask_token_id = mask_token_id
        self.seed = seed
        self.within_documents = within_documents
        self.autocast = autocast
        self.recompute = recompute  # for the anchor prefix, the only pass that keeps a graph of many layers
        model.attach_fast_weights(plan)  # inert without fast weights: a projection adds one only when given one
        # The tail starts at the first sub-block with a fast weight (memory off: only the head).
        self.boundary = plan.boundary_block if memory.enabled else model.num_blocks

    @property
    def uses_memory(self) -> bool:
        """Whether the step runs the inner loop (``--memory.enabled``); false is plain MDLM."""
        return self.memory.enabled

    @property
    def num_inner_steps(self) -> int:
        return self.memory.num_inner_steps if self.uses_memory else 0

    def for_adaptation(self, seed: int) -> "BilevelStep":
        """The step inference-time adaptation runs (evaluation, generation, likelihoods): this step's memory
        settings with memory on and uniform inner weights, on the same model, plan and precision; its
        fast-weight resets are drawn from ``seed``. The one place that defines it."""
        memory = dataclasses.replace(self.memory, enabled=True, inner_loss_weight="uniform")
        return BilevelStep(self.model, self.plan, memory, self.diffusion, self.mask_token_id, seed=seed,
                           within_documents=self.within_documents, autocast=self.autocast)

    # -- 0. inputs ---------------------------------------------------------------------------
    def noised_ids(self, batch: MaskedBatch, state_mask: torch.Tensor) -> torch.Tensor:
        """``[b, l]`` ids with the state's masked positions replaced by the mask token."""
        return torch.where(state_mask, self.mask_token_id, batch.input_ids)

    def attention(self, batch: MaskedBatch):
        """None, ``[b, 1, 1, l]`` (key padding) or, within documents, ``[b, 1, l, l]`` on the CPU and a
        FlexAttention block mask on GPUs (``pretrain.model.attention``)."""
        if self.within_documents and batch.segment_ids is not None and batch.segment_ids.is_cuda:
            return document_block_mask(batch.segment_ids)
        return batch.attention_mask(self.within_documents)

    def initial_fast_weights(self, batch: MaskedBatch, step: int) -> FastWeights | None:
        """phi_0 of this step (``None`` with memory off), on the weights' device, in ``memory.dtype``
        (fp32 unless asked otherwise; the base weights are the fp32 masters in every precision, so a
        float64 model in the tests keeps float64 fast weights)."""
        if not self.uses_memory:
            return None
        param = next(self.model.parameters())
        dtype = torch.bfloat16 if self.memory.dtype == "bf16" else param.dtype
        return self.plan.initial(batch.num_sequences, self.seed, step, param.device, dtype)

    # -- 1-3. one inner step ---------------------------------------------------------------------
    def state_mask(self, batch: MaskedBatch, state: int | None) -> torch.Tensor:
        """The mask of pre-anchor state ``state`` (noisiest first), or of the anchor (``None``)."""
        return batch.anchor_mask if state is None else batch.pre_anchor_masks[state]

    def inner_update(self, fast: FastWeights, h: torch.Tensor, state: int | None, batch: MaskedBatch,
                     attention, entry: BlockEntry | None = None) -> tuple[FastWeights, torch.Tensor]:
        """One SGD step of ``fast`` on the inner loss of ``state`` (a pre-anchor index, or ``None`` for the
        anchor); ``h`` (or ``entry``) must carry no graph to the base weights. Returns phi_{j+1} and the
        inner loss summed over sequences."""
        mask = self.state_mask(batch, state)
        scale = inner_sequence_scale(mask, batch.maskable, self.memory.inner_loss_weight)
        rows = select_rows(batch.input_ids, mask, scale, batch.masked_rows(state))
        with torch.enable_grad():
            loss = self.model.tail_loss(h, self.boundary, rows, attention, fast, frozen=True, entry=entry)
            grads = torch.autograd.grad(loss, fast.leaves(), materialize_grads=True)
        update = self.plan.sgd_step(fast, list(grads), self.memory.inner_lr, self.memory.inner_grad_clip)
        return update, loss.detach()

    def inner_update_from_ids(self, fast: FastWeights, batch: MaskedBatch, state: int | None,
                              attention) -> tuple[FastWeights, torch.Tensor]:
        """An inner step whose prefix runs without grad on the state's noised ids (the pre-anchor states,
        and every state of inference-time adaptation)."""
        with torch.no_grad():
            h = self.model.prefix(self.noised_ids(batch, self.state_mask(batch, state)), self.boundary, attention)
        return self.inner_update(fast, h, state, batch, attention)

    # -- 4-5. the anchor state: last inner step and the outer loss -------------------------------------
    def outer_loss(self, h: torch.Tensor, batch: MaskedBatch, normalizer: LossNormalizer,
                   fast: FastWeights | None, attention, entry: BlockEntry | None = None) -> torch.Tensor:
        """The MDLM loss of the anchor state on its prefix output ``h`` with ``fast`` held constant."""
        outer_scale = outer_sequence_scale(batch.t, batch.maskable, self.diffusion, normalizer)
        rows = select_rows(batch.input_ids, batch.anchor_mask, outer_scale, batch.masked_rows())
        constant = fast.detach() if fast is not None else None
        return self.model.tail_loss(h, self.boundary, rows, attention, constant, entry=entry)

    def anchor_loss(self, h: torch.Tensor, batch: MaskedBatch, normalizer: LossNormalizer,
                    fast: FastWeights | None, attention, inner_h: torch.Tensor | None = None):
        """The outer loss on the anchor prefix output ``h`` (attached), after the last inner step.

        The start of the boundary sub-block (its norm and the base projections that read the normed
        input) is fast-weight free, so the last inner step and the outer tail share it, unless
        ``inner_h`` (a separately computed prefix output) is given for the inner step.
        Returns (loss, last inner loss sum or ``None``, phi_K or ``None``).
        """
        if fast is None:
            return self.outer_loss(h, batch, normalizer, None, attention), None, None
        if inner_h is None:
            entry = self.model.block_entry(h, self.boundary)
            fast, inner_sum = self.inner_update(fast, h.detach(), None, batch, attention, entry.detach())
        else:
            entry = None
            fast, inner_sum = self.inner_update(fast, inner_h, None, batch, attention)
        return self.outer_loss(h, batch, normalizer, fast, attention, entry), inner_sum, fast

    # -- inference-time adaptation ----------------------------------------------------------------------
    def adapt(self, batch: MaskedBatch, step: int = 0) -> FastWeights | None:
        """Inference-time adaptation (docs/DESIGN.md section 2): from phi_0, the K inner steps on ``batch``'s
        states (pre-anchor states, noisiest first, then the anchor: a prompt masked at
        ``memory.prompt_mask_ratio``), each sequence its own memory. Returns phi_K (``None`` with memory
        off): call it on ``for_adaptation(seed)``, whose inner weights are uniform as the reference evaluation's."""
        if not self.uses_memory:
            return None
        with self.autocast():
            attention = self.attention(batch)
            fast = self.initial_fast_weights(batch, step)
            for state in [*range(len(batch.pre_anchor_masks)), None]:
                fast, _ = self.inner_update_from_ids(fast, batch, state, attention)
        return fast.detach()

    # -- the whole step on one model --------------------------------------------------------------
    def __call__(self, batch: MaskedBatch, normalizer: LossNormalizer, step: int,
                 record_fast_weights: bool = False) -> StepResult:
        model = self.model
        expected = self.num_inner_steps - 1
        if self.uses_memory and batch.pre_anchor_masks.shape[0] != expected:
            raise ValueError(
                f"batch has {batch.pre_anchor_masks.shape[0]} pre-anchor states but memory.num_inner_steps="
                f"{self.memory.num_inner_steps} needs {expected}; build batches with the same num_inner_steps"
            )
        with self.autocast():
            attention = self.attention(batch)
            fast = self.initial_fast_weights(batch, step)
            inner_loss_sums, history = [], []
            # 1-3. Pre-anchor states: prefix without grad, inner update on the tail.
            for state in range(len(batch.pre_anchor_masks) if fast is not None else 0):
                fast, inner_sum = self.inner_update_from_ids(fast, batch, state, attention)
                inner_loss_sums.append(inner_sum)
                if record_fast_weights:
                    history.append(fast.clone_values())
            # 4-5. The anchor prefix once, with grad; the last inner step; the outer loss with phi_K.
            x_t = self.noised_ids(batch, batch.anchor_mask)
            h_anchor = model.prefix(x_t, self.boundary, attention, recompute=self.recompute)
            inner_h = None
            if fast is not None and not self.memory.share_anchor_prefix:
                with torch.no_grad():
                    inner_h = model.prefix(x_t, self.boundary, attention)
            loss, inner_sum, fast = self.anchor_loss(h_anchor, batch, normalizer, fast, attention, inner_h)
        if inner_sum is not None:
            inner_loss_sums.append(inner_sum)
            if record_fast_weights:
                history.append(fast.clone_values())
        return StepResult(loss, inner_loss_sums, history)
