"""The FLOP meter: the model-FLOPs formula against a count by hand, and the executed count against
torch's FLOP counter on real steps."""

import numpy as np
import pytest

from benchmarks.common import count_flops
from data_pipeline.masking import build_masked_batch
from parallel.collectives import LossNormalizer
from pretrain.config import MemoryConfig, ModelConfig, RunConfig, TrainConfig
from pretrain.train.flops import executed_flops, model_flops_per_token

pytestmark = pytest.mark.fast  # in-process: part of the edit loop's tier (-m fast)

TINY = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=48, seq_len=16)


def test_model_flops_per_token_by_hand():
    # Per layer: qkv 32x96, out 32x32, gate/up 32x48, down 48x32 -> 3072 + 1024 + 3 * 1536 = 8704 weights;
    # head 32 x 64 = 2048. Attention: 12 x 2 layers x 16 positions x 32 = 12288 (the full 16 x 16 matrix).
    assert model_flops_per_token(TINY) == 6 * (2 * 8704 + 2048) + 12288
    gqa = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=1, ffn_hidden_size=48,
                      seq_len=16)
    assert model_flops_per_token(gqa) == 6 * (32 * 48 + 1024 + 4608 + 2048) + 12 * 16 * 32  # qkv = (4 + 2) x 8


CASES = {
    "mdlm": dict(enabled=False),
    "memdlm": dict(),
    "k3": dict(masking_strategy="pmc", num_inner_steps=3),
    "attention-sites": dict(target_modules="qkv,out,gate,up,down", lora_rank=4),
    "two-layers": dict(layer_fraction=1.0, target_modules="up,down,out"),
    "dense-unshared": dict(adapter="full", share_anchor_prefix=False),
}


@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
@pytest.mark.parametrize("case", list(CASES))
def test_executed_flops_equal_torchs_flop_counter(topology, case, recompute):
    from pretrain.train.factory import build_bilevel_step, build_model

    memory = MemoryConfig(**{"layer_fraction": 0.5, **CASES[case]})
    cfg = RunConfig(model=TINY, memory=memory, train=TrainConfig(recompute=recompute))
    step = build_bilevel_step(cfg, build_model(cfg, topology), topology, 63)
    ids = np.random.default_rng(0).integers(0, 63, size=(4, 16))
    batch = build_masked_batch(ids, np.arange(4), seed=0, epoch=0, num_inner_steps=memory.num_inner_steps,
                               pre_anchor_scale=1.5)
    normalizer = LossNormalizer.of([batch.maskable])
    counted = count_flops(lambda: step(batch, normalizer, 0).loss.backward())
    rows = batch.row_counts if memory.enabled else batch.row_counts[-1:]
    assert executed_flops(TINY, memory, 4, rows, recompute) == counted


VARIANTS = {
    "progressive-k3": dict(masking_strategy="progressive_memory", num_inner_steps=3),
    "pre-only-newly-revealed": dict(masking_strategy="pre_only", num_inner_steps=1, inner_loss_mask="newly_revealed"),
    "no-progressive": dict(masking_strategy="no_progressive", num_inner_steps=1),
    "distill": dict(inner_loss="distill"),
    "distill-hidden": dict(inner_loss="distill_hidden", masking_strategy="progressive_memory"),
    "epochs-2": dict(inner_epochs=2),
    "leak-free": dict(leak_free=True, masking_strategy="pmc", num_inner_steps=3),
    "base-weight": dict(base_weight=0.5),
    "base-weight-leak-free": dict(base_weight=0.5, leak_free=True),
    "base-weight-unshared": dict(base_weight=0.5, share_anchor_prefix=False),
    "pad-inner": dict(pad_unmask="inner"),
    "probability-off": dict(probability=0.5),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_executed_flops_of_every_variant_equal_torchs_flop_counter(topology, variant):
    from pretrain.memdlm.bilevel import uses_memory_at
    from pretrain.train.factory import build_bilevel_step, build_model

    memory = MemoryConfig(**{"layer_fraction": 0.5, **VARIANTS[variant]})
    cfg = RunConfig(model=TINY, memory=memory)
    step = build_bilevel_step(cfg, build_model(cfg, topology), topology, 63)
    ids = np.random.default_rng(0).integers(0, 63, size=(4, 16))
    padding = np.ones((4, 16), dtype=bool)
    padding[1, 12:] = False
    batch = build_masked_batch(ids, np.arange(4), seed=0, epoch=0, key_padding_mask=padding,
                               trajectory=memory.trajectory)
    normalizer = LossNormalizer.of([batch.maskable])
    step_number = 1 if variant == "probability-off" else 0  # with probability 0.5 and seed 0, step 1 has none
    memory_step = uses_memory_at(memory, 0, step_number)
    assert memory_step == (variant != "probability-off")
    counted = count_flops(lambda: step(batch, normalizer, step_number).loss.backward())
    assert executed_flops(TINY, memory, 4, batch.row_counts, uses_memory=memory_step) == counted


TINY_MOE = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=48, seq_len=16,
                       moe_num_experts=4, moe_top_k=2, moe_ffn_hidden_size=24, moe_shared_ffn_hidden_size=40,
                       moe_shared_expert_gate=True, moe_score="sigmoid")
MOE_CASES = {
    "mdlm": dict(enabled=False),
    "memdlm": dict(),
    "both-layers": dict(layer_fraction=1.0, target_modules="up,down,out", masking_strategy="pmc", num_inner_steps=2),
    "gate-only-dense-delta": dict(target_modules="gate", adapter="full", share_anchor_prefix=False,
                                  moe_targets="shared"),
    "routed-only-both-layers": dict(layer_fraction=1.0, moe_targets="routed", masking_strategy="pmc",
                                    num_inner_steps=2),
    "routed-gate-up": dict(layer_fraction=1.0, moe_targets="routed", target_modules="gate,up"),
    "routed-down-distill": dict(moe_targets="routed", target_modules="down", inner_loss="distill"),
}


@pytest.mark.parametrize("recompute", ["none", "full"])
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_executed_flops_of_a_mixture_of_experts_equal_torchs_flop_counter(topology, case, recompute):
    """Routed experts run on the tokens routed to them (top-k of each), the router and the shared expert on all:
    the count by formula equals torch's on real steps, with fast weights on the routed experts (each routed row
    meets every sequence's pair) and the shared expert."""
    from pretrain.train.factory import build_bilevel_step, build_model

    memory = MemoryConfig(**{"layer_fraction": 0.5, **MOE_CASES[case]})
    cfg = RunConfig(model=TINY_MOE, memory=memory, train=TrainConfig(recompute=recompute))
    step = build_bilevel_step(cfg, build_model(cfg, topology), topology, 63)
    ids = np.random.default_rng(0).integers(0, 63, size=(4, 16))
    batch = build_masked_batch(ids, np.arange(4), seed=0, epoch=0, trajectory=memory.trajectory)
    normalizer = LossNormalizer.of([batch.maskable])
    counted = count_flops(lambda: step(batch, normalizer, 0).loss.backward())
    rows = batch.row_counts if memory.enabled else batch.row_counts[-1:]
    assert executed_flops(TINY_MOE, memory, 4, rows, recompute) == counted


def test_model_flops_of_a_mixture_of_experts_count_the_active_parameters():
    # Per layer: attention 32x96 + 32x32 = 4096; MLP: router 32x4 = 128, 2 of 4 experts x 3 x 32 x 24 = 4608,
    # shared 3 x 32 x 40 = 3840 and its gate 32 -> 8608 active (of 13216); head 2048; attention 12 x 2 x 16 x 32.
    assert model_flops_per_token(TINY_MOE) == 6 * (2 * (4096 + 8608) + 2048) + 12288
