"""``conditional_log_likelihood``: ``log p(continuation | prompt)`` estimated by Monte Carlo over masks,
  as LLaDA does: for each of ``num_samples`` draws, ``k`` uniform in ``1..n`` of the ``n`` continuation
  tokens are masked (chosen uniformly), and ``(n / k) * sum of their log-probabilities`` is an unbiased
  estimate of the ELBO, a lower bound of the log-likelihood; the mean is returned. Deterministic for a
  seed; optionally with inference-time adaptation on the prompt.
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.masking import hashed_uniform
from pretrain.eval.inference import prompt_adaptation_batch
from pretrain.memdlm.bilevel import BilevelStep

_STREAM_LIKELIHOOD = 21


@torch.no_grad()
def conditional_log_likelihood(model, adaptation: BilevelStep, prompt: list[int], continuation: list[int],
                               mask_id: int, num_samples: int = 32, seed: int = 0, adapt: bool = False,
                               prompt_index: int = 0) -> float:
    """Monte Carlo estimate of ``log p(continuation | prompt)`` (nats), see the module docstring."""
    device = next(model.parameters()).device
    n = len(continuation)
    ids = torch.tensor(prompt + continuation, dtype=torch.long, device=device)
    fast = None
    if adapt:
        fast = adaptation.adapt(prompt_adaptation_batch(adaptation, [prompt], [prompt_index], mask_id).to(device))
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
