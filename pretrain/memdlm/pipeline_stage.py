"""One pipeline stage's part of the bi-level step: the ``parallel.engines.pipeline.StageStep`` the pipeline
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
from pretrain.memdlm.bilevel import BilevelStep


class BilevelStage:
    """``bilevel``: the training step; ``adaptation``: the step inference-time adaptation runs (evaluation),
    ``bilevel.for_adaptation(seed)``."""

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

    def input_ids(self, batch: MaskedBatch, state: int | None) -> torch.Tensor:
        return self.bilevel.noised_ids(batch, self.bilevel.state_mask(batch, state))

    def _run(self, x: torch.Tensor, end: int, attention) -> torch.Tensor:
        """Embedding (first stage) and this stage's sub-blocks up to ``end`` (recomputed in the backward as
        the step's prefix is; nothing is kept in the forward-only pre-anchor sweep anyway)."""
        h = self.model.embedding(x) if self.is_first else x
        return self.model.run_blocks(h, self.first_block, end, attention, recompute=self.bilevel.recompute)

    def forward(self, x: torch.Tensor, batch: MaskedBatch) -> torch.Tensor:
        with self.bilevel.autocast():
            return self._run(x, self.last_block, self.bilevel.attention(batch))

    def initial_fast_weights(self, batch: MaskedBatch, step: int):
        return self.bilevel.initial_fast_weights(batch, step)

    def pre_anchor_update(self, x, batch: MaskedBatch, state: int, fast):
        attention = self.bilevel.attention(batch)
        with self.bilevel.autocast():
            h = self._run(x, self.bilevel.boundary, attention)  # the caller runs this without grad
            return self.bilevel.inner_update(fast, h, state, batch, attention)

    def anchor_loss(self, x, batch: MaskedBatch, normalizer: LossNormalizer, fast):
        attention = self.bilevel.attention(batch)
        with self.bilevel.autocast():
            h = self._run(x, self.bilevel.boundary, attention)
            loss, inner_sum, _ = self.bilevel.anchor_loss(h, batch, normalizer, fast, attention)
        return loss, inner_sum

    def adaptation_initial_fast_weights(self, batch: MaskedBatch):
        return self.adaptation.initial_fast_weights(batch, 0)

    def adaptation_update(self, x, batch: MaskedBatch, state: int | None, fast):
        attention = self.bilevel.attention(batch)
        with self.bilevel.autocast():
            h = self._run(x, self.bilevel.boundary, attention)
            return self.adaptation.inner_update(fast, h, state, batch, attention)[0]

    def eval_loss(self, x, batch: MaskedBatch, normalizer: LossNormalizer, fast) -> torch.Tensor:
        attention = self.bilevel.attention(batch)
        with self.bilevel.autocast():
            h = self._run(x, self.bilevel.boundary, attention)
            return self.bilevel.outer_loss(h, batch, normalizer, fast, attention).detach()
