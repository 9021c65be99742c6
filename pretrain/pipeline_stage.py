"""One pipeline stage's part of the bi-level step: the ``parallel.pipeline.StageStep`` the pipeline
engine drives, made of the step's own stages (nothing of the algorithm is written here).

A stage holds the layers ``layers`` (the embedding with layer 0, the head with the last layer);
the last stage must hold every fast-weight layer, so the inner steps and the outer loss run
there on the activations it receives, exactly as ``BilevelStep.__call__`` runs them on the
prefix output.
"""

from __future__ import annotations

import torch

from data_pipeline.masking import MaskedBatch
from parallel.collectives import LossNormalizer
from pretrain.bilevel import BilevelStep


class BilevelStage:
    def __init__(self, step: BilevelStep, adapter: BilevelStep | None = None):
        self.step = step
        self.adapter = adapter or step  # inference-time adaptation (evaluation): uniform inner weights
        self.model = step.model
        layers = self.model.layer_range
        self.first_block, self.last_block = 2 * layers.start, 2 * layers.stop
        self.is_first = self.model.has_embedding
        self.is_last = self.model.has_head
        self.num_inner_steps = step.num_inner_steps
        self.activation_dtype = next(self.model.parameters()).dtype

    def input_ids(self, batch: MaskedBatch, state: int | None) -> torch.Tensor:
        return self.step.noised_ids(batch, self.step.state_mask(batch, state))

    def _run(self, x: torch.Tensor, end: int, attention) -> torch.Tensor:
        """Embedding (first stage) and this stage's sub-blocks up to ``end`` (recomputed in the backward as
        the step's prefix is; nothing is kept in the forward-only pre-anchor sweep anyway)."""
        h = self.model.embedding(x) if self.is_first else x
        return self.model.run_blocks(h, self.first_block, end, attention, recompute=self.step.recompute)

    def forward(self, x: torch.Tensor, batch: MaskedBatch) -> torch.Tensor:
        with self.step.autocast():
            return self._run(x, self.last_block, self.step.attention(batch))

    def initial_memory(self, batch: MaskedBatch, step: int):
        return self.step.initial_fast_weights(batch, step)

    def pre_anchor_update(self, x, batch: MaskedBatch, state: int, memory):
        attention = self.step.attention(batch)
        with self.step.autocast():
            h = self._run(x, self.step.boundary, attention)  # the caller runs this without grad
            return self.step.inner_update(memory, h, state, batch, attention)

    def anchor_loss(self, x, batch: MaskedBatch, normalizer: LossNormalizer, memory):
        attention = self.step.attention(batch)
        with self.step.autocast():
            h = self._run(x, self.step.boundary, attention)
            loss, inner_sum, _ = self.step.anchor_loss(h, batch, normalizer, memory, attention)
        return loss, inner_sum

    def adapt_initial_memory(self, batch: MaskedBatch):
        return self.adapter.initial_fast_weights(batch, 0)

    def adapt_update(self, x, batch: MaskedBatch, state: int | None, memory):
        attention = self.step.attention(batch)
        with self.step.autocast():
            h = self._run(x, self.step.boundary, attention)
            return self.adapter.inner_update(memory, h, state, batch, attention)[0]

    def eval_loss(self, x, batch: MaskedBatch, normalizer: LossNormalizer, memory) -> torch.Tensor:
        attention = self.step.attention(batch)
        with self.step.autocast():
            h = self._run(x, self.step.boundary, attention)
            return self.step.outer_loss(h, batch, normalizer, memory, attention).detach()
