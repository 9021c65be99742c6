"""Mask invariants, checked exactly on every sample of a large batch."""

import numpy as np
import pytest

from data_pipeline.masking import build_masked_batch

pytestmark = pytest.mark.fast  # in-process: part of the edit loop's tier (-m fast)


def make_batch(num_inner_steps=2, scale=1.5, b=512, l=64, seed=7, with_prompt=True, with_padding=True):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, size=(b, l))
    maskable = np.ones((b, l), dtype=bool)
    padding = None
    if with_prompt:
        prompt_len = rng.integers(0, l // 2, size=b)
        maskable &= np.arange(l)[None, :] >= prompt_len[:, None]
    if with_padding:
        real_len = rng.integers(l // 2, l + 1, size=b)
        padding = np.arange(l)[None, :] < real_len[:, None]
    batch = build_masked_batch(ids, np.arange(b) * 3 + 1, seed=seed, epoch=2, num_inner_steps=num_inner_steps,
                               pre_anchor_scale=scale, maskable=maskable, key_padding_mask=padding)
    return batch, maskable, padding


@pytest.mark.parametrize("scale", [1.0, 1.5, 2.0, 3.7])
def test_pre_anchor_count_and_subset(scale):
    batch, _, _ = make_batch(scale=scale)
    anchor = batch.anchor_mask.numpy()
    pre = batch.pre_anchor_masks[0].numpy()
    n = batch.maskable.numpy().sum(1)
    k = anchor.sum(1)
    assert np.all(anchor <= pre), "the anchor mask must be a subset of the pre-anchor mask"
    assert np.array_equal(pre.sum(1), np.minimum(n, np.floor(scale * k).astype(int)))


def test_prompt_and_padding_never_masked():
    batch, maskable, padding = make_batch(num_inner_steps=4)
    forbidden = ~(maskable & padding)
    assert not (batch.anchor_mask.numpy() & forbidden).any()
    for state in batch.pre_anchor_masks.numpy():
        assert not (state & forbidden).any()
    assert np.array_equal(batch.maskable.numpy(), maskable & padding)


def test_trajectory_reveals_evenly_and_nests():
    batch, _, _ = make_batch(num_inner_steps=4, scale=2.0)
    states = list(batch.pre_anchor_masks.numpy()) + [batch.anchor_mask.numpy()]
    counts = np.stack([s.sum(1) for s in states])  # [K, b]
    for noisier, cleaner in zip(states, states[1:]):
        assert np.all(cleaner <= noisier)
    extra = counts[0] - counts[-1]
    # ceil(remaining / steps left) revealed per step: 3 steps from x_pre to x_t
    first = -(-extra // 3)
    second = -(-(extra - first) // 2)
    assert np.array_equal(counts[0] - counts[1], first)
    assert np.array_equal(counts[1] - counts[2], second)
    assert np.array_equal(counts[2] - counts[3], extra - first - second)


def test_empirical_mask_rate_matches_t():
    batch, _, _ = make_batch(b=4096, l=128, with_prompt=False, with_padding=False)
    t = batch.t.numpy()
    assert t.min() >= 1e-3 and t.max() <= 1.0
    k = batch.anchor_mask.numpy().sum(1)
    # Each sequence's count is Binomial(128, t_i): the standardized total is ~N(0, 1).
    z = (k.sum() - (128 * t).sum()) / np.sqrt((128 * t * (1 - t)).sum())
    assert abs(z) < 4
    # Per-bin agreement too, so a rate that is right only on average fails.
    for lo in np.arange(0, 1, 0.1):
        picked = (t >= lo) & (t < lo + 0.1)
        assert abs(k[picked].mean() / 128 - t[picked].mean()) < 0.02
    # t itself is uniform on [eps, 1].
    assert abs(t.mean() - 0.5) < 0.02 and abs(np.mean(t < 0.25) - 0.25) < 0.03


def test_masks_are_a_function_of_seed_index_epoch_only():
    ids = np.random.default_rng(1).integers(0, 50, size=(6, 32))
    index = np.array([5, 9, 100, 7, 3, 42])
    whole = build_masked_batch(ids, index, seed=3, epoch=1, num_inner_steps=3, pre_anchor_scale=1.5)
    # The same samples in another order and another grouping give the same masks.
    order = np.array([4, 2, 0, 5, 1, 3])
    part = build_masked_batch(ids[order[:3]], index[order[:3]], seed=3, epoch=1, num_inner_steps=3,
                              pre_anchor_scale=1.5)
    for row, original in enumerate(order[:3]):
        assert part.anchor_mask[row].equal(whole.anchor_mask[original])
        assert part.pre_anchor_masks[:, row].equal(whole.pre_anchor_masks[:, original])
        assert part.t[row] == whole.t[original]
    other_epoch = build_masked_batch(ids, index, seed=3, epoch=2, num_inner_steps=3, pre_anchor_scale=1.5)
    other_seed = build_masked_batch(ids, index, seed=4, epoch=1, num_inner_steps=3, pre_anchor_scale=1.5)
    assert not other_epoch.anchor_mask.equal(whole.anchor_mask)
    assert not other_seed.anchor_mask.equal(whole.anchor_mask)
