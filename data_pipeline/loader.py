"""Deterministic micro-batches of packed sequences, masked in DataLoader workers.

The run's sample stream is fixed by the seed: epoch ``e`` visits the ``N`` packed sequences in
the order of a permutation drawn from ``(seed, e)``, and position ``p`` of the stream is sample
``perm_{p // N}[p % N]`` of epoch ``p // N``. Micro-batch ``k`` holds positions
``[k * micro, (k + 1) * micro)``. A worker builds micro-batch ``k`` from ``k`` alone, so the
stream does not depend on the number of workers, and resuming at step ``s`` means starting
at micro-batch ``s * accumulation``: nothing is repeated or skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from torch.utils.data import DataLoader, Dataset

from data_pipeline.masking import MaskedBatch, build_masked_batch


@dataclass(frozen=True)
class MaskingSpec:
    seed: int
    num_inner_steps: int
    pre_anchor_scale: float
    eps: float


class SampleOrder:
    """Which (sample index, epoch) sits at each position of the run's stream."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed

    @lru_cache(maxsize=4)
    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.num_samples)

    def at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        epochs = positions // self.num_samples
        offsets = positions % self.num_samples
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):  # at most two epochs per micro-batch
            picked = epochs == epoch
            indices[picked] = self.permutation(int(epoch))[offsets[picked]]
        return indices, epochs


class PackedMicroBatches(Dataset):
    """Micro-batch ``k`` of the stream, masked: ``dataset[k] -> MaskedBatch``."""

    def __init__(self, sequences: np.ndarray, micro_batch_size: int, num_micro_batches: int, masking: MaskingSpec):
        self.sequences = sequences
        self.micro_batch_size = micro_batch_size
        self.num_micro_batches = num_micro_batches
        self.masking = masking
        self.order = SampleOrder(len(sequences), masking.seed)

    def __len__(self) -> int:
        return self.num_micro_batches

    def __getitem__(self, k: int) -> MaskedBatch:
        positions = np.arange(k * self.micro_batch_size, (k + 1) * self.micro_batch_size, dtype=np.int64)
        indices, epochs = self.order.at(positions)
        return build_masked_batch(
            self.sequences[indices],
            indices,
            seed=self.masking.seed,
            epoch=epochs,
            num_inner_steps=self.masking.num_inner_steps,
            pre_anchor_scale=self.masking.pre_anchor_scale,
            eps=self.masking.eps,
        )


def _single(batch: MaskedBatch) -> MaskedBatch:
    return batch


def micro_batch_loader(
    dataset: PackedMicroBatches, start: int, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    """Micro-batches ``start, start + 1, ...`` of ``dataset``, built by ``num_workers`` processes."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start, len(dataset)),
        num_workers=num_workers,
        collate_fn=_single,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
    )
