"""MemDLM's bi-level step (docs/DESIGN.md section 2) as public stages, and one function that runs them.

The stages, numbered as in docs/DESIGN.md section 2 (``h`` = the activations entering the
boundary sub-block, the first with fast weights; everything before it is the prefix):

0. ``noised_ids`` / ``initial_fast_weights``: a state's input ids; phi_0 for the step.
1-3. The inner passes (``inner_passes``): one SGD step each on a state of the trajectory
   (``data_pipeline.trajectory``: pmc's pre-anchor states, noisiest first, or another strategy's),
   ``inner_update``: the tail with frozen base weights and phi_j,
   ``phi_{j+1} = phi_j - eta * clip(d loss_j / d phi_j)``; the caller computes ``h`` without grad.
   A distillation loss first runs a teacher pass (``teacher_outputs``): the model with phi_j on the next
   state (or the clean sequence), without grad.
4-5. ``anchor_loss``: on the anchor prefix output, computed once with grad: the last inner
   step (pmc, no_progressive) on a detached copy -> phi_K, then the outer tail with phi_K detached
   (first-order). Its loss is the micro-batch's share of the global MDLM loss (plus ``base_weight`` x
   the loss without fast weights); its backward reaches only the base weights.

``BilevelStep.__call__`` runs them for one micro-batch on a whole model; the pipeline's last
stage (``pretrain.memdlm.pipeline_stage``) runs the same stages on the activations it receives.

Inner gradients come from ``torch.autograd.grad`` on the fast-weight tensors, so no
optimizer, gradient hook or data-parallel collective sees them. With memory disabled (or on a step
``--memory.probability`` leaves without memory) the same path runs with no fast weights and no inner
steps: plain MDLM.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from data_pipeline.masking import MaskedBatch, hashed_uniform
from data_pipeline.trajectory import ANCHOR, NO_NEXT, InnerStep
from parallel.collectives import LossNormalizer
from parallel.sequence import chunk_bounds, sum_over_sequence
from pretrain.config import DiffusionConfig, MemoryConfig
from pretrain.memdlm.objective import distill_row_loss, inner_sequence_weight, outer_sequence_scale
from pretrain.model.attention import document_block_mask
from pretrain.model.fast_weights import FastWeightPlan, FastWeights
from pretrain.model.layers import BlockEntry
from pretrain.model.rows import select_rows
from pretrain.model.transformer import DiffusionTransformer

_STREAM_MEMORY_STEP = 31  # the per-step draw of --memory.probability
OUTER_PASS = 1 << 20  # the dropout pass id of the outer forward


def uses_memory_at(memory: MemoryConfig, seed: int, step: int) -> bool:
    """Whether optimizer step ``step`` runs the inner loop: always with ``probability`` 1, else a draw from
    ``(seed, step)`` (every rank, layout and restart agrees)."""
    if not memory.enabled:
        return False
    if memory.probability >= 1.0:
        return True
    draw = hashed_uniform(seed, _STREAM_MEMORY_STEP, np.array([step]), 0, 1)[0, 0]
    return bool(draw < memory.probability)


@dataclass(frozen=True)
class InnerPass:
    """One inner SGD step of an optimizer step (epochs unrolled)."""

    number: int  # its place among the step's inner steps: the statistics slot
    step: InnerStep  # the state it runs on and the next state
    epoch_index: int  # its place within one epoch (``MaskedBatch.row_counts``)
    in_anchor: bool  # the last step, on the anchor: run inside ``anchor_loss`` on the shared prefix


@dataclass
class InnerState:
    """What a micro-batch's inner loop carries between passes: the fast weights, and the teacher's outputs
    for the next inner step (distillation)."""

    fast: FastWeights | None
    teacher: torch.Tensor | None = None
    inner_h: torch.Tensor | None = None  # the inner anchor's prefix output, when it is not the outer one's


@dataclass
class StepResult:
    loss: torch.Tensor  # this micro-batch's share of the global objective (attached): what is back-propagated
    inner_loss_sums: list[torch.Tensor]  # per inner step: sum over sequences of their inner loss (detached)
    fast_weight_history: list[dict] = field(default_factory=list)  # phi_1..phi_K when recorded
    logged_loss: torch.Tensor | None = None  # its MDLM loss share when the objective adds more (base_weight)
    loss_by_source: torch.Tensor | None = None  # [S] a mixture's per-source MDLM loss shares (detached)


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
        self.trajectory = memory.trajectory
        self.diffusion = diffusion
        self.mask_token_id = mask_token_id
        self.seed = seed
        self.within_documents = within_documents
        self.autocast = autocast
        self.recompute = recompute  # for the anchor prefix, the only pass that keeps a graph of many layers
        model.attach_fast_weights(plan)  # inert without fast weights: a projection adds one only when given one
        # The tail starts at the first sub-block with a fast weight (memory off: only the head).
        self.boundary = plan.boundary_block if memory.enabled else model.num_blocks
        self.passes = self._passes() if memory.enabled else []
        self.distills = memory.inner_loss != "ce"

    @property
    def uses_memory(self) -> bool:
        """Whether the step runs the inner loop (``--memory.enabled``); false is plain MDLM."""
        return self.memory.enabled

    def uses_memory_at(self, step: int) -> bool:
        return uses_memory_at(self.memory, self.seed, step)

    @property
    def num_inner_steps(self) -> int:
        """Inner steps a step reports (0 with memory off)."""
        return len(self.passes)

    def for_adaptation(self, seed: int) -> "BilevelStep":
        """The step inference-time adaptation runs (evaluation, generation, likelihoods): this step's memory
        settings with memory on (on every call) and uniform inner weights, on the same model, plan and
        precision; its fast-weight resets are drawn from ``seed``. The one place that defines it."""
        memory = dataclasses.replace(self.memory, enabled=True, inner_loss_weight="uniform", probability=1.0)
        return BilevelStep(self.model, self.plan, memory, self.diffusion, self.mask_token_id, seed=seed,
                           within_documents=self.within_documents, autocast=self.autocast)

    def _passes(self) -> list[InnerPass]:
        epoch = self.trajectory.steps()
        passes = [InnerPass(e * len(epoch) + i, s, i, False)
                  for e in range(self.memory.inner_epochs) for i, s in enumerate(epoch)]
        if passes and passes[-1].step.state == ANCHOR:
            passes[-1] = dataclasses.replace(passes[-1], in_anchor=True)
        return passes

    def sweep_passes(self) -> list[tuple[str, InnerPass]]:
        """The passes that run from their own input ids before the anchor pass, in order: a ``teacher`` pass
        before each inner step that distils, and a ``student`` pass for every inner step but the one inside
        ``anchor_loss``."""
        order = []
        for p in self.passes:
            if self.distills:
                order.append(("teacher", p))
            if not p.in_anchor:
                order.append(("student", p))
        return order

    # -- 0. inputs ---------------------------------------------------------------------------
    def whole_sequences(self, batch: MaskedBatch) -> MaskedBatch:
        """The batch as the model takes it: under sequence parallelism padded to a multiple of the
        sequence-parallel size (``MaskedBatch.padded_to``: nothing about the losses changes)."""
        return batch.padded_to(self.model.sequence_size)

    def noised_ids(self, batch: MaskedBatch, state_mask: torch.Tensor) -> torch.Tensor:
        """``[b, l]`` ids with the state's masked positions replaced by the mask token."""
        return torch.where(state_mask, self.mask_token_id, batch.input_ids)

    def attention(self, batch: MaskedBatch):
        """None, ``[b, 1, 1, l]`` (key padding) or, within documents, ``[b, 1, l, l]`` on the CPU and a
        FlexAttention block mask on GPUs (``pretrain.model.attention``)."""
        if self.within_documents and batch.segment_ids is not None and batch.segment_ids.is_cuda:
            return document_block_mask(batch.segment_ids)
        return batch.attention_mask(self.within_documents)

    def initial_fast_weights(self, batch: MaskedBatch, step: int, training: bool = False) -> FastWeights | None:
        """phi_0 of this step (``None`` with memory off, or on a training step without memory), on the
        weights' device, in ``memory.dtype`` (fp32 unless asked otherwise; the base weights are the fp32
        masters in every precision, so a float64 model in the tests keeps float64 fast weights).
        ``training``: a training step (``--memory.probability`` and ``--memory.inner_dropout`` apply)."""
        if not self.uses_memory or (training and not self.uses_memory_at(step)):
            return None
        param = next(self.model.parameters())
        dtype = torch.bfloat16 if self.memory.dtype == "bf16" else param.dtype
        fast = self.plan.initial(batch.num_sequences, self.seed, step, param.device, dtype)
        if self.model.sequence_size > 1:
            fast.tokens = chunk_bounds(batch.input_ids.shape[1], self.model.sequence_size, self.model.sequence_rank)
        if training and self.memory.inner_dropout > 0:
            fast.dropout = (self.memory.inner_dropout, self.seed, step, batch.sample_index.cpu())
        return fast

    def state_mask(self, batch: MaskedBatch, state: int) -> torch.Tensor:
        """The mask of inner state ``state``, or of the anchor as the inner loop sees it (``ANCHOR``)."""
        return batch.inner_anchor if state == ANCHOR else batch.inner_masks[state]

    def pass_input_ids(self, batch: MaskedBatch, p: InnerPass) -> torch.Tensor:
        return self.noised_ids(batch, self.state_mask(batch, p.step.state))

    def teacher_input_ids(self, batch: MaskedBatch, p: InnerPass) -> torch.Tensor:
        """The teacher's input: the next state, or the clean sequence after the trajectory's last state."""
        if p.step.next == NO_NEXT:
            return batch.input_ids
        return self.noised_ids(batch, self.state_mask(batch, p.step.next))

    def scored(self, batch: MaskedBatch, p: InnerPass) -> torch.Tensor:
        """The positions inner pass ``p`` scores (``data_pipeline.trajectory``)."""
        return self.trajectory.loss_mask_of(p.step, batch.inner_masks, batch.inner_anchor, batch.anchor_mask)

    def _rows(self, batch: MaskedBatch, p: InnerPass):
        scored = self.scored(batch, p)
        state = self.state_mask(batch, p.step.state)
        weight = inner_sequence_weight(self.memory, self.trajectory, p.step, state, batch.inner_pool, batch.t)
        num_scored = scored.sum(dim=1).to(torch.float64)
        scale = torch.where(num_scored > 0, weight / num_scored.clamp_min(1), 0.0)
        rows = select_rows(batch.input_ids, scored, scale, batch.scored_rows(p.epoch_index, scored))
        return self.model.local_rows(rows, batch.input_ids.shape[1])

    @staticmethod
    def _for_pass(fast: FastWeights | None, pass_id: int) -> FastWeights | None:
        return fast.for_pass(pass_id) if fast is not None else None

    # -- 1-3. one inner step ---------------------------------------------------------------------
    def _output_kind(self, teacher: bool) -> str:
        if self.memory.inner_loss != "distill_hidden":
            return "logits"
        # The intended comparison is of like with like (both normed, what the head reads); the reference
        # compares the student's pre-norm state with the teacher's post-norm one.
        return "hidden" if self.memory.reference_compat and not teacher else "normed"

    def teacher_outputs(self, fast: FastWeights, h: torch.Tensor, p: InnerPass, batch: MaskedBatch,
                        attention) -> torch.Tensor:
        """The teacher's logits (or hidden states) at the rows pass ``p`` scores: the model with the current
        fast weights on the teacher input, whose prefix output is ``h``; no grad."""
        rows = self._rows(batch, p)
        with torch.no_grad():
            teacher = fast.detach().for_pass(2 * p.number + 1)
            return self.model.tail_outputs(h, self.boundary, rows.index, attention, teacher, frozen=True,
                                           kind=self._output_kind(teacher=True))

    def teacher_outputs_from_ids(self, fast: FastWeights, batch: MaskedBatch, p: InnerPass, attention):
        with torch.no_grad():
            h = self.model.prefix(self.teacher_input_ids(batch, p), self.boundary, attention)
        return self.teacher_outputs(fast, h, p, batch, attention)

    def inner_update(self, fast: FastWeights, h: torch.Tensor, p: InnerPass, batch: MaskedBatch, attention,
                     entry: BlockEntry | None = None, teacher: torch.Tensor | None = None
                     ) -> tuple[FastWeights, torch.Tensor]:
        """One SGD step of ``fast`` on the inner loss of pass ``p``; ``h`` (or ``entry``) must carry no graph
        to the base weights. Returns phi_{j+1} and the inner loss summed over sequences."""
        rows = self._rows(batch, p)
        student = fast.for_pass(2 * p.number)
        with torch.enable_grad():
            if not self.distills:
                loss = self.model.tail_loss(h, self.boundary, rows, attention, student, frozen=True, entry=entry)
            else:
                outputs = self.model.tail_outputs(h, self.boundary, rows.index, attention, student, frozen=True,
                                                  entry=entry, kind=self._output_kind(teacher=False))
                per_row = distill_row_loss(self.memory, outputs, teacher)
                loss = (per_row.to(rows.scale.dtype) * rows.scale).sum().to(outputs.dtype)
            grads = torch.autograd.grad(loss, fast.leaves(), materialize_grads=True)
        # Under sequence parallelism each rank has its tokens' share of every sequence's gradient.
        grads = sum_over_sequence(list(grads), self.model.sequence_group)
        update = self.plan.sgd_step(fast, list(grads), self.memory.inner_lr, self.memory.inner_grad_clip)
        return update, loss.detach()

    def inner_update_from_ids(self, fast: FastWeights, batch: MaskedBatch, p: InnerPass, attention,
                              teacher: torch.Tensor | None = None) -> tuple[FastWeights, torch.Tensor]:
        """An inner step whose prefix runs without grad on its state's noised ids (every step but the one
        that shares the anchor's prefix, and every step of inference-time adaptation)."""
        with torch.no_grad():
            h = self.model.prefix(self.pass_input_ids(batch, p), self.boundary, attention)
        return self.inner_update(fast, h, p, batch, attention, teacher=teacher)

    def sweep_pass(self, state: InnerState, kind: str, p: InnerPass, batch: MaskedBatch, attention,
                   h: torch.Tensor | None = None) -> torch.Tensor | None:
        """One sweep pass on ``state`` (updated in place); ``h``: its prefix output, if already computed
        (the pipeline's last stage). Returns the inner loss sum of a ``student`` pass."""
        if kind == "teacher":
            state.teacher = (self.teacher_outputs_from_ids(state.fast, batch, p, attention) if h is None
                             else self.teacher_outputs(state.fast, h, p, batch, attention))
            return None
        if h is None:
            state.fast, inner_sum = self.inner_update_from_ids(state.fast, batch, p, attention, state.teacher)
        else:
            state.fast, inner_sum = self.inner_update(state.fast, h, p, batch, attention, teacher=state.teacher)
        state.teacher = None
        return inner_sum

    # -- 4-5. the anchor state: last inner step and the outer loss -------------------------------------
    def outer_loss(self, h: torch.Tensor, batch: MaskedBatch, normalizer: LossNormalizer,
                   fast: FastWeights | None, attention, entry: BlockEntry | None = None,
                   by_source: torch.Tensor | None = None) -> torch.Tensor:
        """The MDLM loss of the anchor state on its prefix output ``h`` with ``fast`` held constant;
        ``by_source`` (``[S]``): each source's share of it is added there (a mixture's accounting)."""
        outer_scale = outer_sequence_scale(batch.t, batch.maskable, self.diffusion, normalizer)
        rows = select_rows(batch.input_ids, batch.anchor_mask, outer_scale, batch.anchor_rows())
        if by_source is not None:
            rows.group = batch.source_ids.to(rows.index.device)[rows.index // batch.input_ids.shape[1]]
            rows.group_sums = by_source
        rows = self.model.local_rows(rows, batch.input_ids.shape[1])
        constant = fast.detach().for_pass(OUTER_PASS) if fast is not None else None
        return self.model.tail_loss(h, self.boundary, rows, attention, constant, entry=entry)

    def anchor_loss(self, h: torch.Tensor, batch: MaskedBatch, normalizer: LossNormalizer,
                    state: InnerState | None, attention, inner_h: torch.Tensor | None = None):
        """The outer objective on the anchor prefix output ``h`` (attached), after the last inner step.

        The start of the boundary sub-block (its norm and the base projections that read the normed
        input) is fast-weight free, so the last inner step and the outer tail share it, unless
        ``inner_h`` (a separately computed prefix output of the inner anchor) is given for the inner step.
        Returns (objective, logged MDLM loss, last inner loss sum or ``None``, phi_K or ``None``, the logged
        loss of each source of a mixture or ``None``: that source's own MDLM loss over the global batch's
        sequences from it, as if they were the whole batch, split into this micro-batch's share).
        """
        fast = state.fast if state is not None else None
        by_source = None
        if normalizer.by_source is not None:
            by_source = torch.zeros(normalizer.by_source.shape[1], dtype=torch.float64, device=h.device)
        if fast is None:
            loss = self.outer_loss(h, batch, normalizer, None, attention, by_source=by_source)
            return loss, loss.detach(), None, None, self._per_source(by_source, normalizer)
        inner_sum, entry = None, None
        last = self.passes[-1] if self.passes else None
        if last is not None and last.in_anchor:
            if inner_h is None:
                entry = self.model.block_entry(h, self.boundary)
                fast, inner_sum = self.inner_update(fast, h.detach(), last, batch, attention, entry.detach(),
                                                    state.teacher)
            else:
                fast, inner_sum = self.inner_update(fast, inner_h, last, batch, attention, teacher=state.teacher)
        elif self.memory.base_weight > 0:
            entry = self.model.block_entry(h, self.boundary)
        loss = self.outer_loss(h, batch, normalizer, fast, attention, entry, by_source=by_source)
        objective = loss
        if self.memory.base_weight > 0:  # the base model's own MDLM loss on the same anchor, no fast weights
            objective = loss + self.memory.base_weight * self.outer_loss(h, batch, normalizer, None, attention,
                                                                        entry)
        return objective, loss.detach(), inner_sum, fast, self._per_source(by_source, normalizer)

    def _per_source(self, by_source: torch.Tensor | None, normalizer: LossNormalizer) -> torch.Tensor | None:
        if by_source is None:
            return None
        return by_source * normalizer.source_factors(self.diffusion.normalization).to(by_source.device)

    @property
    def separate_inner_prefix(self) -> bool:
        """The in-anchor inner step does not share the outer prefix: asked not to, or its input may differ
        (pad_unmask inner: padding masked for the outer loss stays visible to the inner loop)."""
        if not (self.passes and self.passes[-1].in_anchor):
            return False
        return not self.memory.share_anchor_prefix or self.memory.pad_unmask == "inner"

    # -- inference-time adaptation ----------------------------------------------------------------------
    def adapt(self, batch: MaskedBatch, step: int = 0) -> FastWeights | None:
        """Inference-time adaptation (docs/DESIGN.md section 2): from phi_0, the inner steps of the trajectory
        on ``batch``'s states (pmc: pre-anchor states, noisiest first, then the anchor, a prompt masked at
        ``memory.prompt_mask_ratio``), each sequence its own memory. Returns phi_K (``None`` with memory
        off): call it on ``for_adaptation(seed)``, whose inner weights are uniform as the reference evaluation's."""
        if not self.uses_memory:
            return None
        batch = self.whole_sequences(batch)
        with self.autocast():
            attention = self.attention(batch)
            state = InnerState(self.initial_fast_weights(batch, step))
            for p in self.passes:
                if self.distills:
                    self.sweep_pass(state, "teacher", p, batch, attention)
                self.sweep_pass(state, "student", p, batch, attention)
        return state.fast.detach()

    # -- the whole step on one model --------------------------------------------------------------
    def begin_routed_pass(self, batch: MaskedBatch, normalizer: LossNormalizer | None) -> None:
        """Tell the model's MoE layers (``pretrain.model.routing``) which of this rank's tokens are real and how
        many sequences the global batch has, before a pass that trains the base model."""
        valid = batch.key_padding_mask
        self.model.routing.begin_pass(self.model.local_tokens(valid) if valid is not None else None,
                                      normalizer.num_sequences if normalizer is not None else None)

    def check_batch(self, batch: MaskedBatch) -> None:
        expected = self.trajectory.num_states
        if self.uses_memory and batch.inner_masks.shape[0] != expected:
            raise ValueError(
                f"batch has {batch.inner_masks.shape[0]} inner states but the memory settings need {expected} "
                f"({self.trajectory.strategy}, num_inner_steps {self.memory.num_inner_steps}); build batches with "
                "the same memory settings")

    def __call__(self, batch: MaskedBatch, normalizer: LossNormalizer, step: int,
                 record_fast_weights: bool = False) -> StepResult:
        model = self.model
        self.check_batch(batch)
        batch = self.whole_sequences(batch)
        with self.autocast():
            attention = self.attention(batch)
            state = InnerState(self.initial_fast_weights(batch, step, training=True))
            inner_loss_sums, history = [], []
            # 1-3. The inner steps before the anchor's: prefix without grad, inner update on the tail.
            for kind, p in (self.sweep_passes() if state.fast is not None else []):
                inner_sum = self.sweep_pass(state, kind, p, batch, attention)
                if inner_sum is not None:
                    inner_loss_sums.append(inner_sum)
                    if record_fast_weights:
                        history.append(state.fast.clone_values())
            # 4-5. The anchor prefix once, with grad; the last inner step; the outer loss with phi_K.
            x_t = self.noised_ids(batch, batch.anchor_mask)
            self.begin_routed_pass(batch, normalizer)
            try:
                h_anchor = model.prefix(x_t, self.boundary, attention, recompute=self.recompute)
                inner_h = None
                if state.fast is not None and self.separate_inner_prefix:
                    with torch.no_grad():
                        inner_h = model.prefix(self.noised_ids(batch, batch.inner_anchor), self.boundary,
                                               attention)
                objective, logged, inner_sum, fast, by_source = self.anchor_loss(h_anchor, batch, normalizer,
                                                                                 state, attention, inner_h)
            finally:
                balancing = model.routing.end_pass()
        reported = logged if self.memory.base_weight > 0 and fast is not None else None
        if balancing is not None:  # the MoE balancing loss trains the base model too; the MDLM loss is reported
            objective, reported = objective + balancing.to(objective.dtype), logged
        if inner_sum is not None:
            inner_loss_sums.append(inner_sum)
            if record_fast_weights:
                history.append(fast.clone_values())
        return StepResult(objective, inner_loss_sums, history,
                          logged_loss=reported, loss_by_source=by_source)
