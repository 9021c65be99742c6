"""One pipeline stage's part of the bi-level step: the ``parallel.engines.pipeline.StageStep`` the pipeline
engine drives, made of the step's own stages (nothing of the algorithm is written here).

A stage holds the layers ``layers`` (the embedding with layer 0, the head with the last layer);
the last stage must hold every fast-weight layer, so the inner steps (and distillation teachers) and
the outer loss run there on the activations it receives, exactly as ``BilevelStep.__call__`` runs them
on the prefix output.
"""

from __future__ import annotations

import torch

from data_pipeline.masking import MaskedBatch
from parallel.collectives import LossNormalizer
from pretrain.memdlm.bilevel import BilevelStep, InnerState


class BilevelStage:
    """``bilevel``: the training step; ``adaptation``: the step inference-time adaptation runs (evaluation),
    ``bilevel.for_adaptation(seed)``. A sweep is ``(kind, InnerPass)`` from ``BilevelStep.sweep_passes``, or
    ``("inner_anchor", None)``: the inner anchor's prefix, when the last inner step cannot share the outer
    prefix."""

    def __init__(self, bilevel: BilevelStep, adaptation: BilevelStep):
        self.bilevel = bilevel
        self.adaptation = adaptation
        self.model = bilevel.model
        layers = self.model.layer_range
        self.first_block, self.last_block = 2 * layers.start, 2 * layers.stop
        self.is_first = self.model.has_embedding
        self.is_last = self.model.has_head
        self.num_inner_steps = bilevel.num_inner_steps
        self.activation_dtype = next(self.model.parameters()).dtype
        self.separate_inner_prefix = bilevel.separate_inner_prefix

    def _run(self, x: torch.Tensor, end: int, attention) -> torch.Tensor:
        """Embedding (first stage) and this stage's sub-blocks up to ``end`` (recomputed in the backward as
        the step's prefix is; nothing is kept in the forward-only sweeps anyway)."""
        h = self.model.embedding(x) if self.is_first else x
        return self.model.run_blocks(h, self.first_block, end, attention, recompute=self.bilevel.recompute)

    def forward(self, x: torch.Tensor, batch: MaskedBatch) -> torch.Tensor:
        self.bilevel.begin_routed_pass(self.bilevel.whole_sequences(batch), None)
        try:
            with self.bilevel.autocast():
                return self._run(x, self.last_block, self.bilevel.attention(batch))
        finally:
            self.model.routing.end_pass()

    # -- training ----------------------------------------------------------------------------------------
    def sweeps(self, step: int) -> list:
        if not self.bilevel.uses_memory_at(step):
            return []
        return self.bilevel.sweep_passes() + ([("inner_anchor", None)] if self.separate_inner_prefix else [])

    def sweep_input_ids(self, batch: MaskedBatch, sweep) -> torch.Tensor:
        return self._input_ids(self.bilevel, batch, sweep)

    def anchor_input_ids(self, batch: MaskedBatch) -> torch.Tensor:
        return self.bilevel.noised_ids(batch, batch.anchor_mask)

    @staticmethod
    def _input_ids(step: BilevelStep, batch: MaskedBatch, sweep) -> torch.Tensor:
        kind, p = sweep
        if kind == "inner_anchor":
            return step.noised_ids(batch, batch.inner_anchor)
        return step.teacher_input_ids(batch, p) if kind == "teacher" else step.pass_input_ids(batch, p)

    def initial_state(self, batch: MaskedBatch, step: int) -> InnerState:
        return InnerState(self.bilevel.initial_fast_weights(batch, step, training=True))

    def sweep_update(self, x, batch: MaskedBatch, sweep, state: InnerState):
        kind, p = sweep
        attention = self.bilevel.attention(batch)
        with self.bilevel.autocast():
            h = self._run(x, self.bilevel.boundary, attention)  # the engine runs this without grad
            if kind == "inner_anchor":
                state.inner_h = h
                return None
            inner_sum = self.bilevel.sweep_pass(state, kind, p, batch, attention, h=h)
        return (p.number, inner_sum) if inner_sum is not None else None

    def anchor_loss(self, x, batch: MaskedBatch, normalizer: LossNormalizer, state: InnerState | None):
        attention = self.bilevel.attention(batch)
        self.bilevel.begin_routed_pass(self.bilevel.whole_sequences(batch), None)
        try:
            with self.bilevel.autocast():
                h = self._run(x, self.bilevel.boundary, attention)
                objective, logged, inner_sum, _, by_source = self.bilevel.anchor_loss(
                    h, batch, normalizer, state, attention, getattr(state, "inner_h", None))
        finally:
            self.model.routing.end_pass()
        return objective, logged, inner_sum, by_source

    # -- evaluation ----------------------------------------------------------------------------------------
    def adaptation_sweeps(self) -> list:
        return [(kind, p) for p in self.adaptation.passes
                for kind in (("teacher", "student") if self.adaptation.distills else ("student",))]

    def adaptation_input_ids(self, batch: MaskedBatch, sweep) -> torch.Tensor:
        return self._input_ids(self.adaptation, batch, sweep)

    def adaptation_state(self, batch: MaskedBatch) -> InnerState:
        return InnerState(self.adaptation.initial_fast_weights(batch, 0))

    def adaptation_update(self, x, batch: MaskedBatch, sweep, state: InnerState) -> None:
        kind, p = sweep
        attention = self.adaptation.attention(batch)
        with self.adaptation.autocast():
            h = self._run(x, self.adaptation.boundary, attention)
            self.adaptation.sweep_pass(state, kind, p, batch, attention, h=h)

    def eval_loss(self, x, batch: MaskedBatch, normalizer: LossNormalizer, state: InnerState | None) -> torch.Tensor:
        """Scored as the one-process Evaluator scores: through the adaptation step (its boundary holds the
        fast-weight sites even when training runs without memory)."""
        adaptation = self.adaptation
        attention = adaptation.attention(batch)
        fast = state.fast if state is not None else None
        with adaptation.autocast():
            h = self._run(x, adaptation.boundary, attention)
            return adaptation.outer_loss(h, batch, normalizer, fast, attention).detach()
