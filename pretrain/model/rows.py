"""The rows a loss needs: the masked positions of a state, gathered to a size known on the host.

Every loss of the step is zero outside the masked positions, so the head and its cross entropy run on
those rows only (``DiffusionTransformer.tail_loss``); each row carries its sequence's loss scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROW_BUCKET = {"cuda": 128}  # gathered rows are padded up to a multiple of this (1 elsewhere)


@dataclass
class Rows:
    """The rows one loss needs, gathered to a size fixed on the host (no device sync on GPUs)."""

    index: torch.Tensor  # [n] positions in the flattened [b * l] sequence, padded with 0
    targets: torch.Tensor  # [n] the clean tokens x0 there
    scale: torch.Tensor  # [n] their sequence's scale; 0 on the padding, so it adds nothing
    # Optionally, each row's group (its sequence's source) and the per-group sums of scaled losses to add to.
    group: torch.Tensor | None = None
    group_sums: torch.Tensor | None = None


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
