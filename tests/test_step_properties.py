"""Properties of the bi-level step that must hold exactly (or to float tolerance)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.masking import build_masked_batch
from parallel.collectives import LossNormalizer
from pretrain.config import DiffusionConfig, MemoryConfig, ModelConfig
from pretrain.memdlm.bilevel import BilevelStep
from pretrain.model.fast_weights import build_fast_weight_plan, clip_per_sequence
from pretrain.model.transformer import DiffusionTransformer

pytestmark = pytest.mark.fast  # in-process: part of the edit loop's tier (-m fast)

CFG = ModelConfig(vocab_size=64, hidden_size=64, num_layers=4, num_heads=4, ffn_hidden_size=96, seq_len=24)
MASK_ID = 63


def make_model(seed=0):
    return DiffusionTransformer(CFG, seed=seed)


def make_batch(b=8, num_inner_steps=2, seed=1, first_index=0):
    ids = np.random.default_rng(seed).integers(0, MASK_ID, size=(b, CFG.seq_len))
    return build_masked_batch(ids, np.arange(first_index, first_index + b), seed=seed, epoch=0,
                              num_inner_steps=num_inner_steps, pre_anchor_scale=1.5)


def loss_and_grads(model, memory, batches, diffusion=DiffusionConfig(), step=3):
    """Sum of the step's losses over ``batches`` (one global batch) and the accumulated gradients."""
    model.zero_grad(set_to_none=True)
    stepper = BilevelStep(model, build_fast_weight_plan(CFG, memory), memory, diffusion, MASK_ID, seed=5)
    normalizer = LossNormalizer.of([b.maskable for b in batches])
    total = 0.0
    for batch in batches:
        result = stepper(batch, normalizer, step=step)
        result.loss.backward()
        total = total + result.loss.detach()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_memory_with_zero_inner_lr_is_plain_mdlm_to_the_last_bit(topology):
    model = make_model()
    batch = make_batch()
    plain_loss, plain_grads = loss_and_grads(model, MemoryConfig(enabled=False), [batch])
    memory_loss, memory_grads = loss_and_grads(model, MemoryConfig(inner_lr=0.0), [batch])
    assert torch.equal(plain_loss, memory_loss)
    for name in plain_grads:
        assert torch.equal(plain_grads[name], memory_grads[name]), name
    # ...and a real inner step does change the result.
    changed_loss, _ = loss_and_grads(model, MemoryConfig(), [batch])
    assert not torch.equal(changed_loss, plain_loss)


@pytest.mark.parametrize("normalization", ["token", "sequence", "batch"])
@pytest.mark.parametrize("loss_weight", ["inverse_t", "uniform"])
def test_memory_disabled_matches_a_plain_mdlm_written_here(topology, normalization, loss_weight):
    """Plain MDLM from its definition: full logits, weight w(t), the chosen normalisation."""
    model = make_model()
    batch = make_batch()
    diffusion = DiffusionConfig(normalization=normalization, loss_weight=loss_weight)
    loss, grads = loss_and_grads(model, MemoryConfig(enabled=False), [batch], diffusion)
    model.zero_grad(set_to_none=True)
    x_t = torch.where(batch.anchor_mask, MASK_ID, batch.input_ids)
    logits = model(x_t)  # [b, l, vocab]
    ce = F.cross_entropy(logits.reshape(-1, CFG.vocab_size), batch.input_ids.reshape(-1), reduction="none")
    weight = 1.0 / batch.t.float() if loss_weight == "inverse_t" else torch.ones(batch.num_sequences)
    per_sequence = (ce.view_as(x_t) * batch.anchor_mask).sum(1) * weight
    if normalization == "token":
        reference = per_sequence.sum() / batch.maskable.sum()
    elif normalization == "sequence":
        reference = (per_sequence / batch.maskable.sum(1)).sum() / batch.num_sequences
    else:
        reference = per_sequence.sum() / batch.num_sequences
    reference.backward()
    torch.testing.assert_close(loss.float(), reference.detach(), rtol=1e-5, atol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_shared_prefix_fusion_equals_separate_forwards(topology):
    model = make_model()
    batch = make_batch()
    fused_loss, fused = loss_and_grads(model, MemoryConfig(share_anchor_prefix=True), [batch])
    separate_loss, separate = loss_and_grads(model, MemoryConfig(share_anchor_prefix=False), [batch])
    torch.testing.assert_close(fused_loss, separate_loss, rtol=1e-6, atol=0)
    for name in fused:
        torch.testing.assert_close(fused[name], separate[name], rtol=1e-5, atol=1e-7, msg=name)


def test_micro_batching_does_not_change_the_step(topology):
    """Per-sequence fast weights and global normalisation: 1 x 8 equals 2 x 4 and 8 x 1."""
    model = make_model()
    batch = make_batch(b=8)
    whole_loss, whole = loss_and_grads(model, MemoryConfig(), [batch])
    for size in (4, 1):
        parts = [batch.select(slice(i, i + size)) for i in range(0, 8, size)]
        split_loss, split = loss_and_grads(model, MemoryConfig(), parts)
        torch.testing.assert_close(split_loss, whole_loss, rtol=1e-5, atol=0)
        for name in whole:
            torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7, msg=f"{size}: {name}")


def test_inner_loop_gives_base_weights_no_gradient(topology):
    model = make_model()
    memory = MemoryConfig(masking_strategy="pmc", num_inner_steps=3)
    stepper = BilevelStep(model, build_fast_weight_plan(CFG, memory), memory, DiffusionConfig(), MASK_ID)
    batch = make_batch(num_inner_steps=3)
    result = stepper(batch, LossNormalizer.of([batch.maskable]), step=0, record_fast_weights=True)
    assert all(p.grad is None for p in model.parameters()), "the inner loop must not touch .grad"
    assert len(result.inner_loss_sums) == 3 and len(result.fast_weight_history) == 3
    # Fast weights are not parameters of the model, so no optimizer can hold them.
    param_ids = {id(p) for p in model.parameters()}
    assert not any(id(t) in param_ids for site in result.fast_weight_history[-1].values() for t in site)


def test_fast_weight_reset_is_kaiming_uniform_and_depends_on_seed_and_step(topology):
    plan = build_fast_weight_plan(CFG, MemoryConfig())
    phi = plan.initial(3, seed=1, step=7, device="cpu", dtype=torch.float32)
    assert [s.layer for s in plan.sites] == [3, 3, 3], "last 10% of 4 layers -> the last layer"
    for site in plan.sites:
        a, b = phi.get(site.name)
        bound = 1.0 / np.sqrt(site.in_features)
        assert a.shape == (3, 32, site.in_features) and b.shape == (3, site.out_features, 32)
        assert torch.equal(b, torch.zeros_like(b))
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
        assert torch.equal(a[0], a[2]), "every sequence starts from the same A_0"
    again = plan.initial(3, seed=1, step=7, device="cpu", dtype=torch.float32)
    other = plan.initial(3, seed=1, step=8, device="cpu", dtype=torch.float32)
    name = plan.sites[0].name
    assert torch.equal(again.get(name)[0], phi.get(name)[0])
    assert not torch.equal(other.get(name)[0], phi.get(name)[0])


def test_clipping_scales_only_tensors_above_the_clip():
    torch.manual_seed(0)
    grad = torch.randn(4, 8, 16)
    grad[1] *= 1e-3  # below the clip
    grad[3] = 0.0  # zero gradient stays zero
    norms_before = grad.flatten(1).norm(dim=1)
    clipped = clip_per_sequence(grad.clone(), clip=1.0)
    norms_after = clipped.flatten(1).norm(dim=1)
    for i in (0, 2):
        assert norms_before[i] > 1.0
        assert norms_after[i] == pytest.approx(1.0, rel=1e-6)
        torch.testing.assert_close(clipped[i] / norms_after[i], grad[i] / norms_before[i])
    assert torch.equal(clipped[1], grad[1]), "a tensor under the clip is untouched, bit for bit"
    assert torch.equal(clipped[3], grad[3])


def test_bf16_autocast_step_tracks_fp32(topology):
    """The bf16 path (GPU's default) on CPU autocast: same loss and gradients to bf16 precision."""
    model = make_model()
    batch = make_batch()
    memory = MemoryConfig()
    loss32, grads32 = loss_and_grads(model, memory, [batch])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, grads16 = loss_and_grads(model, memory, [batch])
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=3e-2, atol=0)
    total32 = torch.cat([g.flatten() for g in grads32.values()])
    total16 = torch.cat([g.flatten() for g in grads16.values()])
    assert float((total16 - total32).norm() / total32.norm()) < 0.1


def test_gpu_row_padding_changes_nothing_but_rounding(topology, monkeypatch):
    """On GPUs the gathered rows are padded to a multiple of 128 with zero-scale rows (sizes known on the
    host); the loss and gradients are those of the exact gather."""
    from pretrain.model import rows as objective

    model = make_model()
    batch = make_batch(b=4)
    exact_loss, exact = loss_and_grads(model, MemoryConfig(), [batch])
    monkeypatch.setitem(objective.ROW_BUCKET, "cpu", 128)
    padded_loss, padded = loss_and_grads(model, MemoryConfig(), [batch])
    assert any(n % 128 for n in batch.row_counts), "the fixture must need padding"
    torch.testing.assert_close(padded_loss, exact_loss, rtol=1e-6, atol=0)
    for name in exact:
        torch.testing.assert_close(padded[name], exact[name], rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recomputation_changes_nothing(topology, recompute):
    """Activation recomputation of the prefix gives the same loss and gradients, bit for bit."""
    model = make_model()
    batch = make_batch()
    plain_loss, plain = loss_and_grads(model, MemoryConfig(layer_fraction=0.25), [batch])
    model.zero_grad(set_to_none=True)
    memory = MemoryConfig(layer_fraction=0.25)
    stepper = BilevelStep(model, build_fast_weight_plan(CFG, memory), memory, DiffusionConfig(), MASK_ID, seed=5,
                          recompute=recompute)
    result = stepper(batch, LossNormalizer.of([batch.maskable]), step=3)
    result.loss.backward()
    assert torch.equal(result.loss.detach(), plain_loss)
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, plain[name]), name


@pytest.mark.parametrize("fast_dtype", ["fp32", "bf16"])
def test_bf16_training_keeps_fp32_masters_state_and_fast_weights(topology, fast_dtype):
    """--train.precision bf16: bf16 compute (CPU autocast here), fp32 weights, gradients and AdamW state;
    fast weights fp32 unless --memory.dtype bf16; the loss tracks fp32's."""
    from pretrain.config import RunConfig, TrainConfig
    from pretrain.train.factory import build_training

    losses, fast = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = RunConfig(model=CFG, memory=MemoryConfig(layer_fraction=0.25, dtype=fast_dtype),
                        train=TrainConfig(global_batch_size=8, micro_batch_size=8, precision=precision))
        parts = build_training(cfg, topology, MASK_ID, allow_cpu_autocast=True)
        step = parts.bilevel

        def recording(batch, normalizer, index, _step=step):
            result = _step(batch, normalizer, index, record_fast_weights=True)
            fast[precision] = result.fast_weight_history[-1]
            return result

        recording.num_inner_steps = step.num_inner_steps
        parts.engine.step_fn = recording
        # megatron's linear layers bring autocast back in their backward on CUDA only; on the CPU the
        # whole step (backward too) runs inside CPU autocast here, as it effectively does on a GPU.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            stats = parts.engine.train_step([make_batch()], 0, 1e-3)
        losses[precision] = stats.host().loss
        assert all(p.dtype == torch.float32 for p in parts.model.parameters())
        state = parts.engine.optimizer.optimizer.state
        assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
        expected = torch.bfloat16 if fast_dtype == "bf16" else torch.float32
        assert all(t.dtype == expected for site in fast[precision].values() for t in site)
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 2e-2
