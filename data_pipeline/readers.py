"""Streaming readers that hand the trainer masked micro-batches.

- MDS (mosaicml-streaming): ``IndexedStreamingDataset`` adds each sample's global index, epoch and (for a
  mixture, one ``Stream`` per source) source; ``StreamingDataLoader`` partitions samples over ranks and
  workers. The global sample order depends only on the seed and ``num_canonical_nodes``, not on the number
  of ranks or workers, and its ``state_dict`` resumes mid-epoch exactly, also with another number of ranks.
- webdataset: each (rank, worker) streams its own shards (shard ``i`` of an epoch's shuffled
  shard list goes to slot ``i mod (ranks * workers)``). Resuming needs the same number of ranks,
  workers and micro-batch size. A corrupt shard can be skipped within a budget.

Both build the ``MaskedBatch`` in the worker (``MaskingCollate``), with masks from
``(seed, sample index, epoch)``.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from streaming import StreamingDataset
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.errors import DataError
from data_pipeline.masking import MaskedBatch, build_masked_batch, hashed_uniform
from data_pipeline.packing import decode_layout, sample_masks
from data_pipeline.shards import decode_webdataset_sample
from data_pipeline.trajectory import TrajectorySpec


@dataclass(frozen=True)
class MaskingSpec:
    seed: int
    trajectory: TrajectorySpec  # the inner loop's states and loss masks
    eps: float
    seq_len: int
    vocab_size: int
    mask_ratio: float | None = None  # a fixed share masked (inference-time adaptation), else t ~ U[eps, 1]
    # Held-out evaluation split into a context and its continuation (``context_fraction`` of each sample's real
    # tokens, rounded up): ``continuation`` masks and scores the continuation only, the context visible;
    # ``context`` keeps the context alone (the rest is padding, never attended): what adaptation sees.
    context_fraction: float = 0.0
    context_role: str | None = None
    # Documents: a token never masked nor scored (the end-of-text token with --data.eot_target false; -1:
    # none), and the share of samples cut to a random length (the rest padding, ``pad_id``).
    unscored_token: int = -1
    random_length_fraction: float = 0.0
    pad_id: int = 0


_STREAM_LENGTH = 12  # the random-length draws (``masking`` uses streams 1-5, ``validation`` 11)


class MaskingCollate:
    """Samples (dicts of arrays) -> one ``MaskedBatch``, with array operations only."""

    def __init__(self, spec: MaskingSpec):
        self.spec = spec

    def __call__(self, samples: list[dict]) -> MaskedBatch:
        spec = self.spec
        tokens = np.stack([np.asarray(s["tokens"]) for s in samples]).astype(np.int64)
        index = np.array([s["sample_index"] for s in samples], dtype=np.int64)
        epoch = np.array([s["epoch"] for s in samples], dtype=np.int64)
        if tokens.shape[1] != spec.seq_len:
            raise DataError(f"samples have {tokens.shape[1]} tokens but --model.seq_len is {spec.seq_len}")
        bad = (tokens < 0) | (tokens >= spec.vocab_size)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise DataError(
                f"sample {index[row]} holds token id {tokens[row, col]} outside the vocabulary "
                f"[0, {spec.vocab_size}); the shards do not belong to this tokenizer/model.vocab_size"
            )
        lengths, doc_starts, prompt_spans = zip(*(decode_layout(np.asarray(s["layout"])) for s in samples))
        lengths = np.array(lengths)
        if spec.random_length_fraction > 0:
            lengths = self._cut(tokens, lengths, index, epoch)
        real, maskable, segments = sample_masks(lengths, list(doc_starts), list(prompt_spans), spec.seq_len)
        if spec.unscored_token >= 0:
            maskable = maskable & (tokens != spec.unscored_token)
        if spec.context_role is not None:
            context_length = np.ceil(spec.context_fraction * np.array(lengths)).astype(np.int64)
            context = np.arange(spec.seq_len)[None, :] < context_length[:, None]
            if spec.context_role == "continuation":
                maskable = maskable & ~context
            else:
                real, maskable = real & context, maskable & context
                segments = np.where(real, segments, -1).astype(np.int32)
        batch = build_masked_batch(
            tokens, index, seed=spec.seed, epoch=epoch, trajectory=spec.trajectory, eps=spec.eps, maskable=maskable,
            key_padding_mask=None if real.all() else real, mask_ratio=spec.mask_ratio,
        )
        batch.segment_ids = torch.from_numpy(segments)
        batch.epoch = torch.from_numpy(epoch)
        batch.num_skipped = sum(s.get("skipped_before", 0) for s in samples)
        sources = np.array([s.get("source", 0) for s in samples], dtype=np.int64)
        batch.source_ids = torch.from_numpy(sources)
        tokens_per_source = np.bincount(sources, weights=real.sum(axis=1))
        batch.source_tokens = tuple((int(i), int(n)) for i, n in enumerate(tokens_per_source) if n)
        return batch

    def _cut(self, tokens: np.ndarray, lengths: np.ndarray, index: np.ndarray, epoch: np.ndarray) -> np.ndarray:
        """``random_length_fraction`` of the samples (drawn from their index and epoch) cut to a length drawn
        uniformly from 1..their length; the tokens after it become padding (in place)."""
        spec = self.spec
        draws = hashed_uniform(spec.seed, _STREAM_LENGTH, index, epoch, 2)
        cut = draws[:, 0] < spec.random_length_fraction
        shorter = np.minimum(1 + np.floor(draws[:, 1] * lengths).astype(np.int64), lengths)
        lengths = np.where(cut, shorter, lengths)
        tokens[np.arange(spec.seq_len)[None, :] >= lengths[:, None]] = spec.pad_id
        return lengths


class IndexedStreamingDataset(StreamingDataset):
    """mosaicml-streaming's dataset, with each sample's global index and epoch attached."""

    def _resume_incr_epoch(self) -> tuple[int, int]:
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._iteration_epoch = epoch
        return epoch, sample_in_epoch

    def get_item(self, sample_id: int, retry: int = 7):
        try:
            sample = super().get_item(sample_id, retry)
        except Exception as err:  # a shard that decodes to garbage raises assorted errors
            shard, _ = self.spanner[sample_id]
            raise DataError(f"sample {sample_id} of MDS shard {self.shards[shard].raw_data.basename} "
                            f"could not be read ({type(err).__name__}: {err})") from None
        sample["sample_index"] = int(sample_id)
        sample["epoch"] = int(getattr(self, "_iteration_epoch", 0))
        if len(self.streams) > 1:
            sample["source"] = int(self.stream_per_shard[self.spanner[sample_id][0]])
        return sample


class WebDatasetStream(IterableDataset):
    """Micro-batches from webdataset shards for one data-parallel rank (see module docstring)."""

    def __init__(self, folder, shards: list[dict], micro_batch_size: int, collate: MaskingCollate, seed: int,
                 rank: int, num_ranks: int, start_batches: int = 0, max_skipped: int = 0, shuffle: bool = True):
        self.folder = folder
        self.shards = shards
        self.micro_batch_size = micro_batch_size
        self.collate = collate
        self.seed = seed
        self.rank = rank
        self.num_ranks = num_ranks
        self.start_batches = start_batches
        self.max_skipped = max_skipped
        self.shuffle = shuffle
        # A sample's index: the samples of the shards before its own (in the manifest's order) + its position.
        self.first_index = np.concatenate([[0], np.cumsum([shard["samples"] for shard in shards])])[:-1].tolist()

    def _slot(self) -> tuple[int, int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if len(self.shards) < self.num_ranks * workers:
            raise DataError(
                f"webdataset: {len(self.shards)} shards cannot feed {self.num_ranks} ranks x {workers} workers; "
                "prepare with a smaller --samples-per-shard or use fewer --data.num_workers"
            )
        return self.rank * workers + worker, self.num_ranks * workers, worker

    def _my_shards(self, epoch: int, slot: int, slots: int) -> list[tuple[dict, int]]:
        """This slot's shards of the epoch, each with the index of its first sample."""
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0xDA7A]).permutation(len(self.shards))
        return [(self.shards[i], self.first_index[i]) for position, i in enumerate(order) if position % slots == slot]

    def _samples(self, slot: int, slots: int, skip: int):
        """This slot's samples, epoch after epoch, after skipping ``skip`` of them."""
        skipped_total = 0
        for epoch in itertools.count():
            for shard, first in self._my_shards(epoch, slot, slots):
                if skip >= shard["samples"]:  # resume: whole shards are skipped by arithmetic
                    skip -= shard["samples"]
                    continue
                path = f"{self.folder}/{shard['file']}"
                read = 0
                try:
                    for raw in wds.WebDataset([path], shardshuffle=False, nodesplitter=_all, workersplitter=_all,
                                              empty_check=False):
                        read += 1
                        if skip:
                            skip -= 1
                            continue
                        try:
                            sample = decode_webdataset_sample(raw, first + read - 1)
                        except DataError as err:  # one malformed sample
                            skipped_total += 1
                            self._check_budget(skipped_total, str(err))
                            yield {"skip_marker": 1}
                            continue
                        sample["epoch"] = epoch
                        yield sample
                    if read < shard["samples"]:  # a damaged tar can also just end early
                        raise DataError(f"it ended after {read} of its {shard['samples']} samples")
                except Exception as err:  # tar errors of a damaged shard: the rest of it is lost
                    lost = max(shard["samples"] - read, 1)
                    skipped_total += lost
                    reason = f"webdataset shard {path} is damaged ({type(err).__name__}: {err})"
                    self._check_budget(skipped_total, reason)
                    print(f"warning: skipped {lost} samples of damaged shard {path} ({skipped_total} in total)",
                          file=sys.stderr)
                    yield {"skip_marker": lost}

    def _check_budget(self, skipped_total: int, reason: str) -> None:
        if skipped_total > self.max_skipped:
            raise DataError(
                f"{reason}; {skipped_total} samples lost in total, over --data.max_skipped_samples "
                f"{self.max_skipped} (raise it to skip more, or repair the shard)"
            )

    def __iter__(self):
        slot, slots, worker = self._slot()
        workers = slots // self.num_ranks
        # Batch k of this rank comes from worker k mod workers (the DataLoader's round robin).
        mine_before = max(0, (self.start_batches - worker + workers - 1) // workers)
        samples, pending_skips = [], 0
        for sample in self._samples(slot, slots, mine_before * self.micro_batch_size):
            if "skip_marker" in sample:
                pending_skips += sample["skip_marker"]
                continue
            if pending_skips:
                sample["skipped_before"], pending_skips = pending_skips, 0
            samples.append(sample)
            if len(samples) == self.micro_batch_size:
                yield self.collate(samples)
                samples = []


def _all(source):
    return source
