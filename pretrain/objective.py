"""The MDLM loss and the inner losses, as per-sequence weights on a masked cross entropy.

Every loss here is ``sum over masked rows of scale[sequence] * CE(logits, x0)`` (the model's
fused head computes it from ``select_rows``); only the per-sequence scale differs:
- outer (MDLM): ``w(t_i) / Z`` with ``Z`` from the *global* batch (token, sequence or batch
  normalisation), so cutting the global batch into micro-batches or ranks changes nothing;
- inner: ``w(r_i) / N_i`` where ``N_i`` is the number of masked tokens of sequence ``i`` in that
  state and ``r_i = N_i / n_i`` its masked ratio; each sequence's loss only involves itself.
"""

from __future__ import annotations

from dataclasses import dataclass

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


ROW_BUCKET = {"cuda": 128}  # gathered rows are padded up to a multiple of this (1 elsewhere)


@dataclass
class Rows:
    """The rows one loss needs, gathered to a size fixed on the host (no device sync on GPUs)."""

    index: torch.Tensor  # [n] positions in the flattened [b * l] sequence, padded with 0
    targets: torch.Tensor  # [n] the clean tokens x0 there
    scale: torch.Tensor  # [n] their sequence's scale; 0 on the padding, so it adds nothing


def select_rows(input_ids: torch.Tensor, state_mask: torch.Tensor, sequence_scale: torch.Tensor,
                count: int) -> Rows:
    """The ``count`` rows where ``state_mask [b, l]`` is true, in row-major order, padded on GPUs to a
    multiple of 128 (at most ``b * l``): ``count`` is known on the host, so nothing waits on the device,
    and the sizes a step sees stay few. On the CPU there is no padding (sums stay bit for bit)."""
    b, l = state_mask.shape
    bucket = ROW_BUCKET.get(state_mask.device.type, 1)
    size = min(b * l, -(-count // bucket) * bucket)
    index = torch.nonzero_static(state_mask.reshape(-1), size=size, fill_value=0).reshape(-1)
    valid = torch.arange(size, device=index.device) < count
    scale = torch.where(valid, sequence_scale[index // l], torch.zeros((), dtype=sequence_scale.dtype,
                                                                         device=index.device))
    return Rows(index, input_ids.reshape(-1)[index], scale)
