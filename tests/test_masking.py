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
    pre = batch.inner_masks[0].numpy()
    n = batch.maskable.numpy().sum(1)
    k = anchor.sum(1)
    assert np.all(anchor <= pre), "the anchor mask must be a subset of the pre-anchor mask"
    assert np.array_equal(pre.sum(1), np.minimum(n, np.floor(scale * k).astype(int)))


def test_prompt_and_padding_never_masked():
    batch, maskable, padding = make_batch(num_inner_steps=4)
    forbidden = ~(maskable & padding)
    assert not (batch.anchor_mask.numpy() & forbidden).any()
    for state in batch.inner_masks.numpy():
        assert not (state & forbidden).any()
    assert np.array_equal(batch.maskable.numpy(), maskable & padding)


def test_trajectory_reveals_evenly_and_nests():
    batch, _, _ = make_batch(num_inner_steps=4, scale=2.0)
    states = list(batch.inner_masks.numpy()) + [batch.anchor_mask.numpy()]
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
        assert part.inner_masks[:, row].equal(whole.inner_masks[:, original])
        assert part.t[row] == whole.t[original]
    other_epoch = build_masked_batch(ids, index, seed=3, epoch=2, num_inner_steps=3, pre_anchor_scale=1.5)
    other_seed = build_masked_batch(ids, index, seed=4, epoch=1, num_inner_steps=3, pre_anchor_scale=1.5)
    assert not other_epoch.anchor_mask.equal(whole.anchor_mask)
    assert not other_seed.anchor_mask.equal(whole.anchor_mask)


def _trajectory_batch(trajectory, b=256, l=64, padded=True):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 100, size=(b, l))
    maskable = np.arange(l)[None, :] >= rng.integers(0, l // 4, size=b)[:, None]
    real = np.arange(l)[None, :] < rng.integers(l // 2, l + 1, size=b)[:, None] if padded else None
    batch = build_masked_batch(ids, np.arange(b) + 5, seed=9, epoch=0, maskable=maskable, key_padding_mask=real,
                               trajectory=trajectory)
    return batch, maskable, real


def test_progressive_memory_states_follow_the_schedule_exactly():
    """80% drawn, then down to int(n * ratio(s)) masked (the reference's double arithmetic: for n = 30 and a
    final ratio 0.2 that is 5, not 6), each state inside the one before, the anchor unrelated."""
    from data_pipeline.trajectory import TrajectorySpec

    for k in (2, 3, 4):
        spec = TrajectorySpec(strategy="progressive_memory", num_inner_steps=k, prompt_mask_ratio=0.2)
        batch, maskable, real = _trajectory_batch(spec)
        states = batch.inner_masks.numpy()
        pool = maskable & real
        n = pool.sum(1)
        assert states.shape[0] == k and not (states & ~pool).any()
        assert abs(states[0].sum() / n.sum() - 0.8) < 0.02, "a Bernoulli(0.8) draw"
        for s in range(1, k):
            target = (n * (0.8 + (0.2 - 0.8) * s / (k - 1))).astype(np.int64)
            assert np.array_equal(states[s].sum(1), np.minimum(states[0].sum(1), target)), s
            assert not (states[s] & ~states[s - 1]).any(), "revealing only"
    assert int(30 * (0.8 + (0.2 - 0.8) * 1 / 1)) == 5


def test_strategies_carry_their_states_and_count_the_scored_rows():
    from data_pipeline.trajectory import ANCHOR, TrajectorySpec

    for spec, states in [(TrajectorySpec(), 1), (TrajectorySpec("pmc", num_inner_steps=4), 3),
                         (TrajectorySpec("pmc", num_inner_steps=1), 1),
                         (TrajectorySpec(strategy="pre_only", num_inner_steps=1), 1),
                         (TrajectorySpec(strategy="no_progressive", num_inner_steps=1), 0)]:
        batch, _, _ = _trajectory_batch(spec)
        assert batch.inner_masks.shape[0] == states
    pmc = _trajectory_batch(TrajectorySpec("pmc", num_inner_steps=3))[0]
    pre_only = _trajectory_batch(TrajectorySpec(strategy="pre_only", num_inner_steps=1))[0]
    two = _trajectory_batch(TrajectorySpec("pmc", num_inner_steps=2))[0]
    assert np.array_equal(pre_only.inner_masks[0].numpy(), two.inner_masks[0].numpy()), "the same pre-anchor state"
    for loss_mask, leak_free in [("student_masked", False), ("newly_revealed", False), ("newly_revealed", True)]:
        spec = TrajectorySpec("pmc", num_inner_steps=3, loss_mask=loss_mask, leak_free=leak_free)
        batch = _trajectory_batch(spec)[0]
        masks, anchor = batch.inner_masks.numpy(), batch.anchor_mask.numpy()
        chain = [masks[0], masks[1], anchor]
        expected = []
        for step in spec.steps():
            current = anchor if step.state == ANCHOR else masks[step.state]
            scored = current
            if loss_mask == "newly_revealed" and step.state != ANCHOR:
                scored = current & ~chain[step.state + 1]
            if leak_free:
                scored = scored & ~anchor
            expected.append(int(scored.sum()))
        assert list(batch.row_counts[:-1]) == expected and batch.row_counts[-1] == int(anchor.sum())
        assert len(expected) == (2 if leak_free else 3), "leak-free drops the anchor step"
    assert pmc.row_counts[-1] == int(pmc.anchor_mask.sum())


def test_padding_modes():
    from data_pipeline.trajectory import TrajectorySpec

    both, maskable, real = _trajectory_batch(TrajectorySpec())
    assert not (both.maskable.numpy() & ~real).any() and both.key_padding_mask is not None
    none, _, _ = _trajectory_batch(TrajectorySpec(pad_mode="none"))
    assert np.array_equal(none.maskable.numpy(), maskable) and none.key_padding_mask is None
    assert (none.anchor_mask.numpy() & ~real).any(), "padding is masked like any token"
    inner, _, _ = _trajectory_batch(TrajectorySpec(pad_mode="inner"))
    assert np.array_equal(inner.maskable.numpy(), maskable) and inner.key_padding_mask is None
    pool = inner.inner_maskable.numpy()
    assert np.array_equal(pool, maskable & real)
    assert np.array_equal(inner.inner_anchor_mask.numpy(), inner.anchor_mask.numpy() & pool)
    assert not (inner.inner_masks.numpy() & ~pool).any(), "the inner states leave padding out"


@pytest.mark.fast
def test_the_scalar_hash_equals_the_vectorised_one():
    """The validation split draws one value per document with plain integers; it must be NumPy's draw, bit for
    bit, or a split would change with the code path."""
    import random

    from data_pipeline.masking import hashed_uniform, hashed_uniform_one

    rng = random.Random(0)
    for _ in range(3000):
        seed, stream, index = rng.randrange(1 << 40), rng.randrange(20), rng.randrange(1 << 50)
        epoch = rng.randrange(99)
        expected = hashed_uniform(seed, stream, np.array([index]), epoch, 1)[0, 0]
        assert hashed_uniform_one(seed, stream, index, epoch) == expected
