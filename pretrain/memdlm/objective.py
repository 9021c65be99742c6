"""The MDLM loss and the inner losses, as per-sequence weights on a masked cross entropy.

Every loss here is ``sum over masked rows of scale[sequence] * CE(logits, x0)`` (the model's
fused head computes it on the rows ``pretrain.model.rows.select_rows`` gathers); only the per-sequence scale differs:
- outer (MDLM): ``w(t_i) / Z`` with ``Z`` from the *global* batch (token, sequence or batch
  normalisation), so cutting the global batch into micro-batches or ranks changes nothing;
- inner: ``w(r_i) / N_i`` where ``N_i`` is the number of masked tokens of sequence ``i`` in that
  state and ``r_i = N_i / n_i`` its masked ratio; each sequence's loss only involves itself.
"""

from __future__ import annotations

import torch

from parallel.collectives import LossNormalizer
from pretrain.config import DiffusionConfig


def outer_sequence_scale(
    t: torch.Tensor, maskable: torch.Tensor, cfg: DiffusionConfig, normalizer: LossNormalizer
) -> torch.Tensor:
    """``[b]`` scale of each sequence's masked-token cross entropies in the MDLM loss."""
    weight = 1.0 / t if cfg.loss_weight == "inverse_t" else torch.ones_like(t)
    if cfg.normalization == "token":
        return weight / normalizer.num_maskable.clamp_min(1)
    if cfg.normalization == "batch":
        return weight / normalizer.num_sequences
    per_sequence = maskable.sum(dim=1).to(weight.dtype)
    return torch.where(per_sequence > 0, weight / per_sequence.clamp_min(1), 0.0) / normalizer.num_sequences


def inner_sequence_scale(state_mask: torch.Tensor, maskable: torch.Tensor, weighting: str) -> torch.Tensor:
    """``[b]`` scale of an inner state's loss: ``w(r_i) / N_i`` (zero for a sequence with nothing masked)."""
    num_masked = state_mask.sum(dim=1).to(torch.float64)
    if weighting == "inverse_ratio":
        num_maskable = maskable.sum(dim=1).to(torch.float64)
        weight = num_maskable / num_masked.clamp_min(1)  # 1 / r_i
    else:
        weight = torch.ones_like(num_masked)
    return torch.where(num_masked > 0, weight / num_masked.clamp_min(1), 0.0)
