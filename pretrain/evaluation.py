"""Held-out evaluation and likelihoods.

- ``Evaluator``: on a validation micro-batch (masks from the evaluation's fixed seed), the MDLM loss
  (the negative ELBO bound: ``sum over masked tokens of CE / t``, divided by the maskable tokens of the
  whole evaluation set, i.e. nats per token) of the base model without fast weights and, optionally,
  with inference-time adaptation on the sample itself (the inner loop on the sample masked at
  ``memory.prompt_mask_ratio``, uniform weights; the fast weights are then constants). The engines run
  it on their layout (``EngineBase.evaluate``; the pipeline engine through forward-only sweeps).
- ``conditional_log_likelihood``: ``log p(continuation | prompt)`` estimated by Monte Carlo over masks,
  as LLaDA does: for each of ``num_samples`` draws, ``k`` uniform in ``1..n`` of the ``n`` continuation
  tokens are masked (chosen uniformly), and ``(n / k) * sum of their log-probabilities`` is an unbiased
  estimate of the ELBO, a lower bound of the log-likelihood; the mean is returned. Deterministic for a
  seed; optionally with inference-time adaptation on the prompt.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from data_pipeline.masking import MaskedBatch, hashed_uniform
from data_pipeline.readers import MaskingCollate, MaskingSpec
from parallel.collectives import LossNormalizer
from pretrain.bilevel import BilevelStep
from pretrain.inference import prompt_adaptation_batch

_STREAM_LIKELIHOOD = 21


class Evaluator:
    """What an engine runs on each validation micro-batch: ``(loss, adapted loss)`` shares, 0-d each."""

    def __init__(self, adapter: BilevelStep):
        self.adapter = adapter

    def __call__(self, batch: MaskedBatch, normalizer: LossNormalizer, prompt: MaskedBatch | None) -> torch.Tensor:
        step = self.adapter
        with step.autocast():
            attention = step.attention(batch)
            with torch.no_grad():
                h = step.model.prefix(step.noised_ids(batch, batch.anchor_mask), step.boundary, attention)
                base = step.outer_loss(h, batch, normalizer, None, attention)
            adapted = torch.zeros_like(base)
            if prompt is not None and step.plan is not None:
                fast = step.adapt(prompt)
                with torch.no_grad():
                    adapted = step.outer_loss(h, batch, normalizer, fast, attention)
        return torch.stack([base.detach().double(), adapted.detach().double()])


@torch.no_grad()
def conditional_log_likelihood(model, adapter: BilevelStep, prompt: list[int], continuation: list[int],
                               mask_id: int, num_samples: int = 32, seed: int = 0, adapt: bool = False,
                               prompt_index: int = 0) -> float:
    """Monte Carlo estimate of ``log p(continuation | prompt)`` (nats), see the module docstring."""
    device = next(model.parameters()).device
    n = len(continuation)
    ids = torch.tensor(prompt + continuation, dtype=torch.long, device=device)
    fast = None
    if adapt and adapter.plan is not None:
        fast = adapter.adapt(prompt_adaptation_batch(adapter, [prompt], [prompt_index], mask_id).to(device))
    # Masks from (seed, prompt index, draw): counts k ~ U{1..n}, then the k smallest of uniform scores.
    index = np.arange(num_samples) + prompt_index * 1_000_003
    counts = 1 + np.floor(hashed_uniform(seed, _STREAM_LIKELIHOOD, index, 0, 1)[:, 0] * n).astype(np.int64)
    scores = hashed_uniform(seed, _STREAM_LIKELIHOOD + 1, index, 0, n)
    order = np.argsort(scores, axis=1, kind="stable")
    masked = np.zeros((num_samples, n), dtype=bool)
    for row, k in enumerate(counts):
        masked[row, order[row, :k]] = True
    inputs = ids.repeat(num_samples, 1)
    where = torch.from_numpy(masked).to(device)
    inputs[:, len(prompt):] = torch.where(where, mask_id, inputs[:, len(prompt):])
    if fast is not None:
        fast = fast.with_leaves([t.expand(num_samples, *t.shape[1:]).contiguous() for t in fast.leaves()])
    logits = model(inputs, fast=fast)[:, len(prompt):]  # [draws, n, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_probs = logits.log_softmax(-1).gather(-1, ids[len(prompt):].expand(num_samples, n)[..., None]).squeeze(-1)
    estimates = (log_probs * where).sum(-1) * (n / torch.from_numpy(counts).to(device).double())
    return float(estimates.mean())


def evaluation_collates(seed: int, memory, eps: float, seq_len: int, vocab_size: int,
                        adaptation: bool) -> list[MaskingCollate]:
    """How validation samples are masked: the evaluation's anchor masks (from ``seed``) and, for
    adaptation, the same samples masked at ``memory.prompt_mask_ratio`` (from ``seed + 1``)."""
    spec = MaskingSpec(seed, memory.num_inner_steps, memory.pre_anchor_scale, eps, seq_len, vocab_size)
    collates = [MaskingCollate(spec)]
    if adaptation:
        collates.append(MaskingCollate(dataclasses.replace(spec, seed=seed + 1, mask_ratio=memory.prompt_mask_ratio)))
    return collates


def bits(nats: float) -> float:
    return nats / math.log(2.0)
