"""The production bi-level step against the unfused float64 transcription in reference_step.py."""

import numpy as np
import pytest
import torch

from data_pipeline.masking import build_masked_batch
from parallel.collectives import LossNormalizer
from pretrain.config import DiffusionConfig, MemoryConfig, ModelConfig
from pretrain.memdlm.bilevel import BilevelStep
from pretrain.model.fast_weights import build_fast_weight_plan
from pretrain.model.transformer import DiffusionTransformer
from tests.helpers.reference_step import reference_step

pytestmark = pytest.mark.fast  # in-process: part of the edit loop's tier (-m fast)

TINY = ModelConfig(vocab_size=48, hidden_size=32, num_layers=3, num_heads=2, ffn_hidden_size=40, seq_len=16)
MASK_ID = 47


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tiny_batch(num_inner_steps: int, seed: int = 3, padded: bool = False):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, MASK_ID, size=(4, TINY.seq_len))
    maskable = np.ones_like(ids, dtype=bool)
    maskable[1, :5] = False  # a prompt that is never masked
    padding = None
    if padded:  # sequences 2 and 3 end early; their tail is padding
        padding = np.ones_like(ids, dtype=bool)
        padding[2, 11:] = False
        padding[3, 7:] = False
    batch = build_masked_batch(ids, np.arange(4) + 10, seed=seed, epoch=0, num_inner_steps=num_inner_steps,
                               pre_anchor_scale=1.5, maskable=maskable, key_padding_mask=padding)
    assert batch.anchor_mask.any(1).all(), "every sequence should have a masked token in this fixture"
    return batch


def float64_model(cfg: ModelConfig) -> DiffusionTransformer:
    """The tiny model in float64, its norm weights moved off 1 so that their gradients are checked too."""
    torch.manual_seed(0)
    model = DiffusionTransformer(cfg, dtype=torch.float64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def assert_matches_oracle(result, model, reference, phi0, num_inner_steps: int, moved=None) -> None:
    """phi_1..phi_K, the loss and every gradient of the production step equal the oracle's (1e-6 relative); the
    sites in ``moved`` (default: all) were moved by the inner loop (A stays put on step 1, where B is still 0)."""
    ref_loss, ref_history, ref_grads = reference
    assert len(result.fast_weight_history) == num_inner_steps == len(ref_history)
    for k, (ours, theirs) in enumerate(zip(result.fast_weight_history, ref_history)):
        for name in theirs:
            for mine, ref in zip(ours[name], theirs[name]):
                assert relative_error(mine, ref) < 1e-6, f"phi_{k + 1} {name}"
        for name in theirs if moved is None else moved:
            assert any(not torch.equal(r, r0) for r, r0 in zip(theirs[name], phi0[name])), name
    assert relative_error(result.loss.detach(), ref_loss) < 1e-6
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert relative_error(param.grad, ref_grads[name]) < 1e-6, name


@pytest.mark.parametrize(
    "memory_kwargs",
    [
        {},  # our defaults: pre_only (K=1), LoRA r=32 on gate/up/down, clip 1.0
        {"masking_strategy": "pmc", "num_inner_steps": 2},  # the paper's recipe
        # two adapted layers, attention inside the tail
        {"masking_strategy": "pmc", "num_inner_steps": 3, "layer_fraction": 0.67},
        {"adapter": "full", "inner_grad_clip": 0.0},
        {"target_modules": "qkv,out,down", "lora_rank": 4, "lora_alpha": 8.0, "inner_lr": 0.5},
        {"share_anchor_prefix": False, "inner_loss_weight": "uniform", "inner_grad_clip": 0.05},
        {"padded": True},
        {"recompute": "full", "layer_fraction": 0.34},
        {"recompute": "selective", "masking_strategy": "pmc", "num_inner_steps": 3, "padded": True},
    ],
    ids=["default", "paper-pmc-k2", "k3-two-layers", "full-noclip", "attention-targets", "unshared-uniform-tightclip",
         "padded", "recompute-full", "recompute-selective"],
)
def test_step_matches_unfused_float64_reference(topology, memory_kwargs):
    memory_kwargs = dict(memory_kwargs)
    padded = memory_kwargs.pop("padded", False)
    recompute = memory_kwargs.pop("recompute", "none")
    memory = MemoryConfig(**memory_kwargs)
    model = float64_model(TINY)
    plan = build_fast_weight_plan(TINY, memory)
    step = BilevelStep(model, plan, memory, DiffusionConfig(), MASK_ID, seed=11, recompute=recompute)
    batch = tiny_batch(memory.num_inner_steps, padded=padded)
    batch.t = batch.t.to(torch.float64)
    normalizer = LossNormalizer.of([batch.maskable])

    result = step(batch, normalizer, step=5, record_fast_weights=True)
    result.loss.backward()

    phi0 = plan.initial(4, seed=11, step=5, device="cpu", dtype=torch.float64).clone_values()
    weights = {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    reference = reference_step(weights, TINY, memory, batch, MASK_ID, phi0, normalizer.num_maskable)
    assert_matches_oracle(result, model, reference, phi0, memory.num_inner_steps)


TINY_MOE = ModelConfig(vocab_size=48, hidden_size=32, num_layers=3, num_heads=2, ffn_hidden_size=40, seq_len=16,
                       moe_num_experts=4, moe_top_k=2, moe_ffn_hidden_size=24, moe_shared_ffn_hidden_size=16,
                       moe_score="sigmoid", moe_norm_topk=True, moe_routed_scaling=1.5, moe_first_dense_layers=1)


@pytest.mark.parametrize("memory_kwargs", [
    {"layer_fraction": 0.67},  # both MoE layers, routed experts and the shared expert (the reference's placement)
    {"layer_fraction": 0.34, "moe_targets": "routed", "masking_strategy": "pmc", "num_inner_steps": 2},
    {"layer_fraction": 0.34, "moe_targets": "shared", "target_modules": "qkv,gate,down"},
], ids=["routed-and-shared", "routed-pmc-k2", "shared-and-attention"])
def test_moe_step_matches_unfused_float64_reference(topology, memory_kwargs):
    """One bi-level step of a mixture-of-experts model (expert biases choosing, per-sequence LoRA pairs on every
    routed expert) against every expert run on every token in the oracle."""
    memory = MemoryConfig(**memory_kwargs)
    model = float64_model(TINY_MOE)
    with torch.no_grad():
        model.routing.bias.copy_(0.2 * torch.randn_like(model.routing.bias))
    plan = build_fast_weight_plan(TINY_MOE, memory)
    routed = [site.name for site in plan.sites if site.routed]
    assert bool(routed) == ("routed" in memory.moe_target_set)
    step = BilevelStep(model, plan, memory, DiffusionConfig(), MASK_ID, seed=11)
    batch = tiny_batch(memory.num_inner_steps)
    batch.t = batch.t.to(torch.float64)
    normalizer = LossNormalizer.of([batch.maskable])
    result = step(batch, normalizer, step=5, record_fast_weights=True)
    result.loss.backward()

    phi0 = plan.initial(4, seed=11, step=5, device="cpu", dtype=torch.float64).clone_values()
    weights = {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for layer in range(1, 3):
        weights[f"layers.{layer}.mlp.expert_bias"] = model.routing.bias[layer - 1].double()
    reference = reference_step(weights, TINY_MOE, memory, batch, MASK_ID, phi0, normalizer.num_maskable)
    # every routed expert's pair moved for some sequence
    assert_matches_oracle(result, model, reference, phi0, memory.num_inner_steps, moved=routed)


def test_reference_detects_a_wrong_inner_step(topology):
    """The comparison can fail: an inner lr off by 10% moves the outer gradient beyond 1e-6."""
    memory = MemoryConfig()
    torch.manual_seed(0)
    model = DiffusionTransformer(TINY, dtype=torch.float64)
    plan = build_fast_weight_plan(TINY, memory)
    batch = tiny_batch(2)
    batch.t = batch.t.to(torch.float64)
    normalizer = LossNormalizer.of([batch.maskable])
    BilevelStep(model, plan, memory, DiffusionConfig(), MASK_ID, seed=11)(batch, normalizer, 5).loss.backward()
    phi0 = plan.initial(4, seed=11, step=5, device="cpu", dtype=torch.float64).clone_values()
    weights = {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    wrong = MemoryConfig(inner_lr=0.11)
    _, _, ref_grads = reference_step(weights, TINY, wrong, batch, MASK_ID, phi0, normalizer.num_maskable)
    worst = max(relative_error(p.grad, ref_grads[n]) for n, p in model.named_parameters())
    assert worst > 1e-4


VARIANTS = {  # the reference code's variants (and ours) against the oracle
    "pmc-newly-revealed-k3": {"masking_strategy": "pmc", "num_inner_steps": 3, "inner_loss_mask": "newly_revealed"},
    "pmc-k1": {"masking_strategy": "pmc", "num_inner_steps": 1},
    "pre-only": {"masking_strategy": "pre_only", "num_inner_steps": 1},
    "pre-only-newly-revealed": {"masking_strategy": "pre_only", "num_inner_steps": 1,
                                "inner_loss_mask": "newly_revealed"},
    "no-progressive": {"masking_strategy": "no_progressive", "num_inner_steps": 1},
    "progressive": {"masking_strategy": "progressive_memory"},
    "progressive-k3-newly-revealed": {"masking_strategy": "progressive_memory", "num_inner_steps": 3,
                                      "inner_loss_mask": "newly_revealed"},
    "distill-t2": {"inner_loss": "distill", "distill_temperature": 2.0},
    "distill-reverse-progressive": {"inner_loss": "distill_reverse", "masking_strategy": "progressive_memory"},
    "distill-hidden-mse": {"inner_loss": "distill_hidden"},
    "distill-hidden-cosine-compat": {"inner_loss": "distill_hidden", "distill_hidden_type": "cosine",
                                     "reference_compat": True},
    "epochs-2": {"inner_epochs": 2},
    "leak-free-k3": {"masking_strategy": "pmc", "num_inner_steps": 3, "leak_free": True},
    "base-weight": {"base_weight": 0.7},
    "compat-weights": {"reference_compat": True},
    "pad-none": {"pad_unmask": "none", "padded": True},
    "pad-inner": {"pad_unmask": "inner", "padded": True},
    "dropout": {"inner_dropout": 0.2},
    "probability-on": {"probability": 0.5, "step": 1},
    "probability-off": {"probability": 0.5, "step": 2},
    "everything": {"masking_strategy": "progressive_memory", "num_inner_steps": 3, "inner_loss": "distill",
                   "inner_loss_mask": "newly_revealed", "inner_epochs": 2, "base_weight": 0.5, "leak_free": True,
                   "inner_dropout": 0.1, "padded": True, "pad_unmask": "inner"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_memory_variant_matches_the_oracle(topology, variant):
    from pretrain.memdlm.bilevel import OUTER_PASS, uses_memory_at

    memory_kwargs = dict(VARIANTS[variant])
    padded = memory_kwargs.pop("padded", False)
    step_number = memory_kwargs.pop("step", 5)
    memory = MemoryConfig(**memory_kwargs)
    model = float64_model(TINY)
    plan = build_fast_weight_plan(TINY, memory)
    step = BilevelStep(model, plan, memory, DiffusionConfig(), MASK_ID, seed=11)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, MASK_ID, size=(4, TINY.seq_len))
    maskable = np.ones_like(ids, dtype=bool)
    maskable[1, :5] = False
    padding = None
    if padded:
        padding = np.ones_like(ids, dtype=bool)
        padding[2, 11:] = False
        padding[3, 7:] = False
    batch = build_masked_batch(ids, np.arange(4) + 10, seed=3, epoch=0, maskable=maskable, key_padding_mask=padding,
                               trajectory=memory.trajectory)
    batch.t = batch.t.to(torch.float64)
    normalizer = LossNormalizer.of([batch.maskable])
    memory_step = uses_memory_at(memory, 11, step_number)
    if "probability" in memory_kwargs:
        assert memory_step == (variant == "probability-on"), "the fixture needs a step with and one without"

    result = step(batch, normalizer, step=step_number, record_fast_weights=True)
    result.loss.backward()

    initial = plan.initial(4, seed=11, step=step_number, device="cpu", dtype=torch.float64)
    dropout = {}
    if memory.inner_dropout > 0:
        initial.dropout = (memory.inner_dropout, 11, step_number, batch.sample_index)
        for pass_id in [*range(2 * memory.inner_steps_per_step), OUTER_PASS]:
            at = initial.for_pass(pass_id)
            dropout[pass_id] = {site.name: at.dropout_mask(site, (4, TINY.seq_len, site.in_features), "cpu",
                                                           torch.float64) for site in plan.sites}
    phi0 = initial.clone_values()
    weights = {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    ref_loss, ref_history, ref_grads = reference_step(weights, TINY, memory, batch, MASK_ID, phi0,
                                                      normalizer.num_maskable, memory_step=memory_step,
                                                      dropout=dropout)
    expected_steps = memory.inner_steps_per_step if memory_step else 0
    assert len(result.fast_weight_history) == expected_steps == len(ref_history), variant
    for k, (ours, theirs) in enumerate(zip(result.fast_weight_history, ref_history)):
        for name in theirs:
            for mine, ref in zip(ours[name], theirs[name]):
                assert relative_error(mine, ref) < 1e-6, f"phi_{k + 1} {name}"
    assert relative_error(result.loss.detach(), ref_loss) < 1e-6
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert relative_error(param.grad, ref_grads[name]) < 1e-6, name
    if memory_step and expected_steps:
        moved = [not torch.equal(r, r0) for name in phi0 for r, r0 in zip(ref_history[-1][name], phi0[name])]
        assert any(moved), "the inner loop must move the fast weights for the comparison to mean anything"
