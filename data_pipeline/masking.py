"""Masks for the MDLM objective and MemDLM's trajectory, as a pure function of
``(seed, global sample index, epoch)``.

Randomness comes from a counter-based hash (splitmix64 over uint64), not from a stateful
generator, so a sample's masks do not depend on which worker, rank or restart builds them,
and a whole micro-batch is built with array operations (no per-sample loop).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM_T, _STREAM_ANCHOR, _STREAM_EXTRA = 1, 2, 3


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_uniform(seed: int, stream: int, sample_index: np.ndarray, epoch, width: int) -> np.ndarray:
    """Uniform [0, 1) floats ``[b, width]``: one independent stream per (seed, stream, sample, epoch).

    ``epoch`` is an int or one epoch per sample.
    """
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([seed], dtype=np.uint64))[0] ^ _splitmix64(np.array([stream], dtype=np.uint64))[0]
        index = np.asarray(sample_index, dtype=np.uint64)
        epochs = np.broadcast_to(np.asarray(epoch, dtype=np.uint64), index.shape)
        per_sample = _splitmix64(_splitmix64(index ^ base) ^ (epochs * np.uint64(0xD1342543DE82EF95)))  # [b]
        positions = np.arange(width, dtype=np.uint64) * _GOLDEN
        bits = _splitmix64(per_sample[:, None] + positions[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass
class MaskedBatch:
    """One micro-batch with its noise, as the training step consumes it.

    ``pre_anchor_masks[j]`` is the mask of inner state ``j`` (noisiest first); the last inner
    state is the anchor itself. ``anchor ⊆ pre_anchor_masks[-1] ⊆ ... ⊆ pre_anchor_masks[0]``.
    """

    input_ids: torch.Tensor  # [b, l] int64, the clean tokens x0 (also the labels)
    maskable: torch.Tensor  # [b, l] bool: may be noised (not prompt, not padding)
    t: torch.Tensor  # [b] float64, the sampled noise level
    anchor_mask: torch.Tensor  # [b, l] bool, masked in the anchor state x_t
    pre_anchor_masks: torch.Tensor  # [K-1, b, l] bool
    sample_index: torch.Tensor  # [b] int64, global sample index
    key_padding_mask: torch.Tensor | None = None  # [b, l] bool, true on real tokens; None: no padding
    segment_ids: torch.Tensor | None = None  # [b, l] int32 document index in the sample; -1 on padding
    epoch: torch.Tensor | None = None  # [b] int64, the epoch each sample was drawn in
    num_skipped: int = 0  # damaged samples the reader skipped before this batch (webdataset)
    # Masked positions of each inner state (pre-anchor states, then the anchor), counted on the host
    # where the masks are built: the step sizes its row gathers from them without asking the device.
    row_counts: tuple[int, ...] | None = None

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    def masked_rows(self, state: int | None = None) -> int:
        """Masked positions of pre-anchor state ``state``, or of the anchor (``None``)."""
        if self.row_counts is None:  # a batch cut or assembled by hand: count (a device sync on GPUs)
            masks = [*self.pre_anchor_masks, self.anchor_mask]
            self.row_counts = tuple(int(m.sum()) for m in masks)
        return self.row_counts[-1 if state is None else state]

    def _map(self, fn) -> "MaskedBatch":
        return MaskedBatch(**{
            f.name: fn(f.name, value) if isinstance(value, torch.Tensor) else value
            for f in fields(self) for value in [getattr(self, f.name)]
        })

    def to(self, device, non_blocking: bool = False) -> "MaskedBatch":
        return self._map(lambda name, t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "MaskedBatch":
        return self._map(lambda name, t: t.pin_memory())

    def select(self, rows: slice) -> "MaskedBatch":
        """The sequences ``rows`` of this batch (``pre_anchor_masks`` sliced on its batch axis)."""
        part = self._map(lambda name, t: t[:, rows] if name == "pre_anchor_masks" else t[rows])
        part.row_counts = None
        return part

    # -- as two tensors, for sending a micro-batch to the other ranks of a model replica ------------
    @staticmethod
    def packed_shapes(num_sequences: int, seq_len: int, num_pre_anchor_states: int):
        """Shapes of ``pack()``'s two tensors: int64 ``[6 + states, b, l]`` and float64 ``[4, b]``."""
        return (6 + num_pre_anchor_states, num_sequences, seq_len), (4, num_sequences)

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every field in two tensors (see ``packed_shapes``); ``unpack`` gives the batch back."""
        ones = torch.ones_like(self.maskable)
        padding = self.key_padding_mask if self.key_padding_mask is not None else ones
        segments = self.segment_ids if self.segment_ids is not None else torch.zeros_like(self.input_ids)
        epoch = self.epoch if self.epoch is not None else torch.zeros_like(self.sample_index)
        counts = torch.zeros_like(self.input_ids)
        counts.view(-1)[:len(self.pre_anchor_masks) + 1] = torch.tensor(
            [self.masked_rows(i) for i in range(len(self.pre_anchor_masks))] + [self.masked_rows()])
        ints = torch.stack([self.input_ids, self.maskable.long(), self.anchor_mask.long(), padding.long(),
                            segments.long(), counts, *self.pre_anchor_masks.long()])
        skipped = torch.zeros_like(self.t, dtype=torch.float64)
        skipped[0] = self.num_skipped
        floats = torch.stack([self.t.double(), self.sample_index.double(), epoch.double(), skipped])
        return ints, floats

    @staticmethod
    def unpack(ints: torch.Tensor, floats: torch.Tensor) -> "MaskedBatch":
        padding = ints[3].bool()
        pre = ints[6:].bool()
        return MaskedBatch(
            input_ids=ints[0].clone(), maskable=ints[1].bool(), t=floats[0].clone(), anchor_mask=ints[2].bool(),
            pre_anchor_masks=pre, sample_index=floats[1].long(),
            key_padding_mask=None if bool(padding.all()) else padding, segment_ids=ints[4].int(),
            epoch=floats[2].long(), num_skipped=int(floats[3, 0]),
            row_counts=tuple(ints[5].reshape(-1)[:len(pre) + 1].tolist()),
        )

    def attention_mask(self, within_documents: bool = False) -> torch.Tensor | None:
        """What each position may attend to, for ``scaled_dot_product_attention``: ``None`` (all),
        ``[b, 1, 1, l]`` (not padding) or ``[b, 1, l, l]`` (same document; padding sees padding)."""
        if within_documents and self.segment_ids is not None:
            return (self.segment_ids[:, :, None] == self.segment_ids[:, None, :])[:, None]
        if self.key_padding_mask is not None:
            return self.key_padding_mask[:, None, None, :]
        return None


def build_masked_batch(
    input_ids: np.ndarray,
    sample_index: np.ndarray,
    *,
    seed: int,
    epoch,
    num_inner_steps: int,
    pre_anchor_scale: float,
    eps: float = 1e-3,
    maskable: np.ndarray | None = None,
    key_padding_mask: np.ndarray | None = None,
    mask_ratio: float | None = None,
) -> MaskedBatch:
    """Sample ``t``, the anchor mask and the pre-anchor trajectory for a micro-batch.

    ``epoch`` is an int or one per sample: a sample's noise depends on (seed, index, epoch) only.

    - Training: ``t_i ~ U[eps, 1]``; each maskable token is masked with probability ``t_i`` (the anchor).
    - ``mask_ratio`` (inference-time adaptation on a prompt): exactly ``max(1, round(ratio * n_i))`` of the
      ``n_i`` maskable tokens, chosen uniformly, form the anchor, and ``t_i`` is that ratio.
    - The noisiest pre-anchor state adds uniformly chosen maskable tokens until it has
      ``min(n_i, floor(scale * k_i))`` masked; with K > 2 inner steps the intermediate states
      reveal those extra tokens evenly (``ceil(remaining / steps left)`` per step).
    """
    input_ids = np.asarray(input_ids, dtype=np.int64)
    b, l = input_ids.shape
    sample_index = np.asarray(sample_index, dtype=np.int64)
    if maskable is None:
        maskable = np.ones((b, l), dtype=bool)
    if key_padding_mask is not None:
        maskable = maskable & key_padding_mask
    num_maskable = maskable.sum(axis=1)

    # 1. t and the anchor state.
    draws = hashed_uniform(seed, _STREAM_ANCHOR, sample_index, epoch, l)
    if mask_ratio is None:
        t = eps + (1.0 - eps) * hashed_uniform(seed, _STREAM_T, sample_index, epoch, 1)[:, 0]
        anchor = (draws < t[:, None]) & maskable
    else:
        count = np.where(num_maskable > 0, np.maximum(1, np.round(mask_ratio * num_maskable)), 0).astype(np.int64)
        anchor = _first_in_order(np.where(maskable, draws, np.inf), count)
        t = np.full(b, mask_ratio, dtype=np.float64)

    # 2. A uniformly random order of the maskable tokens the anchor left unmasked.
    candidates = maskable & ~anchor
    scores = np.where(candidates, hashed_uniform(seed, _STREAM_EXTRA, sample_index, epoch, l), np.inf)
    order = np.argsort(scores, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(l), (b, l)), axis=1)

    # 3. The pre-anchor states: anchor plus the first `remaining` extra tokens of that order.
    num_anchor = anchor.sum(axis=1)
    target = np.minimum(num_maskable, np.floor(pre_anchor_scale * num_anchor).astype(np.int64))
    remaining = np.maximum(target - num_anchor, 0)
    states = []
    for step in range(num_inner_steps - 1):
        states.append(anchor | (candidates & (rank < remaining[:, None])))
        steps_left = num_inner_steps - 1 - step
        remaining = remaining - (remaining + steps_left - 1) // steps_left
    pre = np.stack(states) if states else np.zeros((0, b, l), dtype=bool)

    return MaskedBatch(
        input_ids=torch.from_numpy(input_ids),
        maskable=torch.from_numpy(np.ascontiguousarray(maskable)),
        t=torch.from_numpy(t),
        anchor_mask=torch.from_numpy(anchor),
        pre_anchor_masks=torch.from_numpy(pre),
        sample_index=torch.from_numpy(sample_index),
        key_padding_mask=None if key_padding_mask is None else torch.from_numpy(np.asarray(key_padding_mask)),
        row_counts=tuple(int(x) for x in pre.reshape(len(pre), -1).sum(axis=1)) + (int(anchor.sum()),),
    )


def _first_in_order(scores: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``[b, l]``: true on the ``count[i]`` positions of row ``i`` with the smallest scores."""
    order = np.argsort(scores, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(scores.shape[1]), scores.shape), axis=1)
    return rank < count[:, None]
