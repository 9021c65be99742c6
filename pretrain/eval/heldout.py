"""Held-out evaluation: the MDLM loss of validation samples, with and without inference-time adaptation.

- ``Evaluator``: on a validation micro-batch (masks from the evaluation's fixed seed), the MDLM loss
  (the negative ELBO bound: ``sum over masked tokens of CE / t``, divided by the maskable tokens of the
  whole evaluation set, i.e. nats per token) of the base model without fast weights and, optionally,
  with inference-time adaptation on the sample itself (the inner loop on the sample masked at
  ``memory.prompt_mask_ratio``, uniform weights; the fast weights are then constants). The engines run
  it on their layout (``EngineBase.evaluate``; the pipeline engine through forward-only sweeps).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from data_pipeline.masking import MaskedBatch
from data_pipeline.readers import MaskingCollate, MaskingSpec
from parallel.collectives import LossNormalizer
from pretrain.memdlm.bilevel import BilevelStep


class Evaluator:
    """What an engine runs on each validation micro-batch: ``(loss, adapted loss)`` shares, 0-d each.

    ``adaptation``: the step inference-time adaptation runs (``BilevelStep.for_adaptation``)."""

    def __init__(self, adaptation: BilevelStep):
        self.adaptation = adaptation

    def __call__(self, batch: MaskedBatch, normalizer: LossNormalizer, prompt: MaskedBatch | None) -> torch.Tensor:
        adaptation = self.adaptation
        batch = adaptation.whole_sequences(batch)
        with adaptation.autocast():
            attention = adaptation.attention(batch)
            with torch.no_grad():
                noised = adaptation.noised_ids(batch, batch.anchor_mask)
                h = adaptation.model.prefix(noised, adaptation.boundary, attention)
                base = adaptation.outer_loss(h, batch, normalizer, None, attention)
            adapted = torch.zeros_like(base)
            if prompt is not None:
                fast = adaptation.adapt(prompt)
                with torch.no_grad():
                    adapted = adaptation.outer_loss(h, batch, normalizer, fast, attention)
        return torch.stack([base.detach().double(), adapted.detach().double()])


def evaluation_collates(seed: int, memory, eps: float, seq_len: int, vocab_size: int,
                        adaptation: bool, context_fraction: float = 0.0,
                        unscored_token: int = -1) -> list[MaskingCollate]:
    """How validation samples are masked: the evaluation's anchor masks (from ``seed``) and, for
    adaptation, the same samples masked at ``memory.prompt_mask_ratio`` (from ``seed + 1``).

    ``context_fraction`` > 0 splits each sample: the scored masks cover only the continuation (the context
    visible), and adaptation sees only the context, so no position the adaptation trains on is scored (with
    0 the adaptation is on the whole sample and trains on some of the very targets then scored)."""
    spec = MaskingSpec(seed, memory.trajectory, eps, seq_len, vocab_size, unscored_token=unscored_token)
    if context_fraction > 0:
        spec = dataclasses.replace(spec, context_fraction=context_fraction, context_role="continuation")
    collates = [MaskingCollate(spec)]
    if adaptation:
        prompt = dataclasses.replace(spec, seed=seed + 1, mask_ratio=memory.prompt_mask_ratio)
        if context_fraction > 0:
            prompt = dataclasses.replace(prompt, context_role="context")
        collates.append(MaskingCollate(prompt))
    return collates


def bits(nats: float) -> float:
    return nats / math.log(2.0)
