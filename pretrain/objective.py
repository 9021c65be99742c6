"""The MDLM loss and the inner losses, as per-sequence weights on a masked cross entropy.

Every loss here is ``sum over masked rows of scale[sequence] * CE(logits, x0)`` (the model's
fused head computes it from ``row_targets``); only the per-sequence scale differs:
- outer (MDLM): ``w(t_i) / Z`` with ``Z`` from the *global* batch (token, sequence or batch
  normalisation), so cutting the global batch into micro-batches or ranks changes nothing;
- inner: ``w(r_i) / N_i`` where ``N_i`` is the number of masked tokens of sequence ``i`` in that
  state and ``r_i = N_i / n_i`` its masked ratio; each sequence's loss only involves itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.config import DiffusionConfig


@dataclass
class LossNormalizer:
    """Counts over the whole global batch (all micro-batches, all data-parallel ranks)."""

    num_maskable: torch.Tensor  # 0-d float: maskable tokens
    num_sequences: torch.Tensor  # 0-d float: sequences

    @staticmethod
    def of(maskable_masks: list[torch.Tensor]) -> "LossNormalizer":
        num_maskable = sum(m.sum(dtype=torch.float64) for m in maskable_masks)
        num_sequences = torch.tensor(float(sum(m.shape[0] for m in maskable_masks)), dtype=torch.float64)
        return LossNormalizer(torch.as_tensor(num_maskable, dtype=torch.float64), num_sequences)

    def to(self, device) -> "LossNormalizer":
        return LossNormalizer(self.num_maskable.to(device), self.num_sequences.to(device))


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


def row_targets(input_ids: torch.Tensor, rows: torch.Tensor, sequence_scale: torch.Tensor):
    """Targets and scales ``[n]`` of the rows where ``rows [b, l]`` is true, in row-major order."""
    return input_ids[rows], sequence_scale[:, None].expand_as(rows)[rows]
