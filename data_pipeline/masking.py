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

from data_pipeline.trajectory import TrajectorySpec

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM_T, _STREAM_ANCHOR, _STREAM_EXTRA = 1, 2, 3
_STREAM_PROGRESSIVE, _STREAM_REVEAL = 4, 5


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_MASK64 = (1 << 64) - 1


def _splitmix64_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hashed_uniform_one(seed: int, stream: int, sample_index: int, epoch: int = 0) -> float:
    """``hashed_uniform(seed, stream, [sample_index], epoch, 1)[0, 0]``, exactly, in plain integers (a few
    microseconds instead of NumPy's tens for one value: the per-document validation split uses it)."""
    base = _splitmix64_int(seed) ^ _splitmix64_int(stream)
    per_sample = _splitmix64_int(_splitmix64_int(sample_index ^ base) ^ ((epoch * 0xD1342543DE82EF95) & _MASK64))
    return (_splitmix64_int(per_sample) >> 11) * (1.0 / (1 << 53))


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

    ``inner_masks[j]`` is the mask of inner state ``j``: for pmc the pre-anchor states, noisiest first
    (``anchor ⊆ inner_masks[-1] ⊆ ... ⊆ inner_masks[0]``), the anchor being the last inner state; for the
    other strategies see ``data_pipeline.trajectory``.
    """

    input_ids: torch.Tensor  # [b, l] int64, the clean tokens x0 (also the labels)
    maskable: torch.Tensor  # [b, l] bool: may be noised (not prompt; not padding unless pad_mode says so)
    t: torch.Tensor  # [b] float64, the sampled noise level
    anchor_mask: torch.Tensor  # [b, l] bool, masked in the anchor state x_t
    inner_masks: torch.Tensor  # [S, b, l] bool, the inner loop's states
    sample_index: torch.Tensor  # [b] int64, global sample index
    key_padding_mask: torch.Tensor | None = None  # [b, l] bool, true on real tokens; None: no padding
    segment_ids: torch.Tensor | None = None  # [b, l] int32 document index in the sample; -1 on padding
    epoch: torch.Tensor | None = None  # [b] int64, the epoch each sample was drawn in
    num_skipped: int = 0  # damaged samples the reader skipped before this batch (webdataset)
    # pad_mode "inner": what the inner loop may mask, and the anchor as it sees it (padding left out).
    inner_maskable: torch.Tensor | None = None
    inner_anchor_mask: torch.Tensor | None = None
    # The positions each inner step of one epoch scores, then the anchor's, counted on the host where the
    # masks are built: the step sizes its row gathers from them without asking the device.
    row_counts: tuple[int, ...] | None = None
    source_ids: torch.Tensor | None = None  # [b] int64: which source of a mixture each sample came from
    # Real tokens per source, counted on the host by the reader ((source, tokens) pairs; reading rank only).
    source_tokens: tuple[tuple[int, int], ...] | None = None

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def inner_anchor(self) -> torch.Tensor:
        return self.anchor_mask if self.inner_anchor_mask is None else self.inner_anchor_mask

    @property
    def inner_pool(self) -> torch.Tensor:
        """What the inner loop counts as maskable (its masked ratios' denominators)."""
        return self.maskable if self.inner_maskable is None else self.inner_maskable

    def anchor_rows(self) -> int:
        """Masked positions of the anchor: the rows the outer loss scores."""
        if self.row_counts is None:  # a batch cut or assembled by hand: count (a device sync on GPUs)
            return int(self.anchor_mask.sum())
        return self.row_counts[-1]

    def scored_rows(self, step: int, scored: torch.Tensor) -> int:
        """Positions inner step ``step`` (of one epoch) scores; ``scored`` is its loss mask."""
        if self.row_counts is None:
            return int(scored.sum())
        return self.row_counts[step]

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
        """The sequences ``rows`` of this batch (``inner_masks`` sliced on its batch axis)."""
        part = self._map(lambda name, t: t[:, rows] if name == "inner_masks" else t[rows])
        part.row_counts = part.source_tokens = None
        return part

    def padded_to(self, multiple: int) -> "MaskedBatch":
        """This batch with its sequences padded at the end to a multiple of ``multiple`` positions (sequence
        parallelism): the padding is never maskable, masked or attended to (key padding false, segment -1),
        so every loss and count is the unpadded batch's."""
        length = self.input_ids.shape[1]
        extra = -(-length // multiple) * multiple - length
        if extra == 0:
            return self

        def pad(name, t):
            if name in ("input_ids", "maskable", "anchor_mask", "inner_maskable", "inner_anchor_mask",
                        "key_padding_mask", "segment_ids", "inner_masks"):
                return torch.nn.functional.pad(t, (0, extra), value=-1 if name == "segment_ids" else 0)
            return t

        padded = self._map(pad)
        real = self.key_padding_mask if self.key_padding_mask is not None else torch.ones_like(self.maskable)
        padded.key_padding_mask = torch.nn.functional.pad(real, (0, extra), value=False)
        if self.segment_ids is None:
            padded.segment_ids = torch.nn.functional.pad(torch.zeros_like(self.input_ids, dtype=torch.int32),
                                                         (0, extra), value=-1)
        return padded

    # -- as two tensors, for sending a micro-batch to the other ranks of a model replica ------------
    @staticmethod
    def packed_shapes(num_sequences: int, seq_len: int, num_states: int, separate_inner: bool = False):
        """Shapes of ``pack()``'s two tensors: int64 ``[6 + states (+ 2), b, l]`` and float64 ``[5, b]``.
        ``separate_inner``: the batch carries ``inner_maskable`` and ``inner_anchor_mask`` (pad_mode inner)."""
        return (6 + num_states + (2 if separate_inner else 0), num_sequences, seq_len), (5, num_sequences)

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every field in two tensors (see ``packed_shapes``); ``unpack`` gives the batch back."""
        ones = torch.ones_like(self.maskable)
        padding = self.key_padding_mask if self.key_padding_mask is not None else ones
        segments = self.segment_ids if self.segment_ids is not None else torch.zeros_like(self.input_ids)
        epoch = self.epoch if self.epoch is not None else torch.zeros_like(self.sample_index)
        counts = torch.zeros_like(self.input_ids)
        if self.row_counts is not None:
            counts.view(-1)[0] = len(self.row_counts)
            counts.view(-1)[1:1 + len(self.row_counts)] = torch.tensor(self.row_counts)
        planes = [self.input_ids, self.maskable.long(), self.anchor_mask.long(), padding.long(), segments.long(),
                  counts, *self.inner_masks.long()]
        if self.inner_maskable is not None:
            planes += [self.inner_maskable.long(), self.inner_anchor_mask.long()]
        skipped = torch.zeros_like(self.t, dtype=torch.float64)
        skipped[0] = self.num_skipped
        sources = self.source_ids if self.source_ids is not None else torch.zeros_like(self.sample_index)
        floats = torch.stack([self.t.double(), self.sample_index.double(), epoch.double(), skipped, sources.double()])
        return torch.stack(planes), floats

    @staticmethod
    def unpack(ints: torch.Tensor, floats: torch.Tensor, num_states: int | None = None) -> "MaskedBatch":
        num_states = len(ints) - 6 if num_states is None else num_states
        padding = ints[3].bool()
        inner = ints[6:6 + num_states].bool()
        separate = len(ints) > 6 + num_states
        counts = ints[5].reshape(-1)
        num_counts = int(counts[0])
        return MaskedBatch(
            input_ids=ints[0].clone(), maskable=ints[1].bool(), t=floats[0].clone(), anchor_mask=ints[2].bool(),
            inner_masks=inner, sample_index=floats[1].long(),
            key_padding_mask=None if bool(padding.all()) else padding, segment_ids=ints[4].int(),
            epoch=floats[2].long(), num_skipped=int(floats[3, 0]),
            inner_maskable=ints[6 + num_states].bool() if separate else None,
            inner_anchor_mask=ints[7 + num_states].bool() if separate else None,
            row_counts=tuple(counts[1:1 + num_counts].tolist()) if num_counts else None,
            source_ids=floats[4].long(),
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
    num_inner_steps: int = 2,
    pre_anchor_scale: float = 1.5,
    eps: float = 1e-3,
    maskable: np.ndarray | None = None,
    key_padding_mask: np.ndarray | None = None,
    mask_ratio: float | None = None,
    trajectory: TrajectorySpec | None = None,
) -> MaskedBatch:
    """Sample ``t``, the anchor mask and the inner loop's states for a micro-batch.

    ``epoch`` is an int or one per sample: a sample's noise depends on (seed, index, epoch) only.
    ``trajectory`` (default: pmc with ``num_inner_steps`` and ``pre_anchor_scale``) says which states the
    inner loop runs on (``data_pipeline.trajectory``).

    - Training: ``t_i ~ U[eps, 1]``; each maskable token is masked with probability ``t_i`` (the anchor).
    - ``mask_ratio`` (inference-time adaptation on a prompt): exactly ``max(1, round(ratio * n_i))`` of the
      ``n_i`` maskable tokens, chosen uniformly, form the anchor, and ``t_i`` is that ratio.
    - pmc / pre_only: the noisiest pre-anchor state adds uniformly chosen maskable tokens until it has
      ``min(n_i, floor(scale * k_i))`` masked; with K > 2 inner steps the intermediate states reveal
      those extra tokens evenly (``ceil(remaining / steps left)`` per step).
    - progressive_memory: Bernoulli(``trajectory.schedule_ratio(0)``) masks, then uniformly chosen reveals
      down to ``int(n_i * ratio(s))`` masked tokens.
    - Padding (``trajectory.pad_mode``): ``both`` never masks or attends it; ``none`` treats it as tokens
      (masked, scored and attended like any other); ``inner`` does so for the outer loss only, while the
      inner loop's states and losses leave it out (``inner_maskable``, ``inner_anchor_mask``).
    """
    spec = trajectory or TrajectorySpec("pmc", num_inner_steps=num_inner_steps, pre_anchor_scale=pre_anchor_scale)
    input_ids = np.asarray(input_ids, dtype=np.int64)
    b, l = input_ids.shape
    sample_index = np.asarray(sample_index, dtype=np.int64)
    if maskable is None:
        maskable = np.ones((b, l), dtype=bool)
    inner_maskable = None
    if key_padding_mask is not None:
        real = np.asarray(key_padding_mask, dtype=bool)
        if spec.pad_mode == "both":
            maskable = maskable & real
        else:  # padding is a token to the outer loss, and attended
            key_padding_mask = None
            if spec.pad_mode == "inner":
                inner_maskable = maskable & real
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
    inner_anchor = anchor if inner_maskable is None else anchor & inner_maskable
    inner_pool = maskable if inner_maskable is None else inner_maskable

    # 2. The inner loop's states.
    if spec.strategy == "progressive_memory":
        states = _progressive_states(spec, seed, sample_index, epoch, inner_pool)
    else:
        states = _pre_anchor_states(spec, seed, sample_index, epoch, inner_pool, inner_anchor)
    inner = np.stack(states) if states else np.zeros((0, b, l), dtype=bool)

    # 3. What each inner step scores, counted here so the step never asks the device.
    scored = [spec.loss_mask_of(step, inner, inner_anchor, anchor) for step in spec.steps()]
    return MaskedBatch(
        input_ids=torch.from_numpy(input_ids),
        maskable=torch.from_numpy(np.ascontiguousarray(maskable)),
        t=torch.from_numpy(t),
        anchor_mask=torch.from_numpy(anchor),
        inner_masks=torch.from_numpy(inner),
        sample_index=torch.from_numpy(sample_index),
        key_padding_mask=None if key_padding_mask is None else torch.from_numpy(np.asarray(key_padding_mask)),
        inner_maskable=None if inner_maskable is None else torch.from_numpy(inner_maskable),
        inner_anchor_mask=None if inner_maskable is None else torch.from_numpy(inner_anchor),
        row_counts=tuple(int(m.sum()) for m in scored) + (int(anchor.sum()),),
    )


def _pre_anchor_states(spec: TrajectorySpec, seed: int, sample_index, epoch, pool, anchor) -> list[np.ndarray]:
    """pmc / pre_only: supersets of the anchor, noisiest first, ending ``ceil`` steps above it."""
    b, l = anchor.shape
    num_pool = pool.sum(axis=1)
    # A uniformly random order of the maskable tokens the anchor left unmasked.
    candidates = pool & ~anchor
    scores = np.where(candidates, hashed_uniform(seed, _STREAM_EXTRA, sample_index, epoch, l), np.inf)
    order = np.argsort(scores, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(l), (b, l)), axis=1)
    # The pre-anchor states: anchor plus the first `remaining` extra tokens of that order.
    num_anchor = anchor.sum(axis=1)
    target = np.minimum(num_pool, np.floor(spec.pre_anchor_scale * num_anchor).astype(np.int64))
    remaining = np.maximum(target - num_anchor, 0)
    states = []
    steps = spec.num_states
    for step in range(steps):
        states.append(anchor | (candidates & (rank < remaining[:, None])))
        steps_left = steps - step
        remaining = remaining - (remaining + steps_left - 1) // steps_left
    return states


def _progressive_states(spec: TrajectorySpec, seed: int, sample_index, epoch, pool) -> list[np.ndarray]:
    """progressive_memory: Bernoulli(ratio(0)) of the maskable tokens, then reveals in a uniformly random order
    down to ``int(n * ratio(s))`` masked at step ``s`` (never masking more than were drawn)."""
    b, l = pool.shape
    num_pool = pool.sum(axis=1)
    first = (hashed_uniform(seed, _STREAM_PROGRESSIVE, sample_index, epoch, l) < spec.schedule_ratio(0)) & pool
    scores = np.where(first, hashed_uniform(seed, _STREAM_REVEAL, sample_index, epoch, l), np.inf)
    order = np.argsort(scores, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(l), (b, l)), axis=1)
    drawn = first.sum(axis=1)
    revealed = np.zeros(b, dtype=np.int64)
    states = [first]
    for step in range(1, spec.num_states):
        target = (num_pool * spec.schedule_ratio(step)).astype(np.int64)  # int(): truncation, as the reference
        revealed = np.maximum(revealed, drawn - target)
        states.append(first & (rank >= revealed[:, None]))
    return states


def _first_in_order(scores: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``[b, l]``: true on the ``count[i]`` positions of row ``i`` with the smallest scores."""
    order = np.argsort(scores, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(scores.shape[1]), scores.shape), axis=1)
    return rank < count[:, None]
