"""What crosses data-parallel ranks, and what stays local (real DeepSpeed engines on gloo)."""

import numpy as np
import pytest
import torch

from tests.dist_utils import run_ranks

MODEL = dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64, seq_len=16)


def _batch(seed, first_index, b=2):
    from data_pipeline.masking import build_masked_batch

    ids = np.random.default_rng(seed).integers(0, 255, size=(b, MODEL["seq_len"]))
    return build_masked_batch(ids, np.arange(first_index, first_index + b), seed=seed, epoch=0,
                              num_inner_steps=2, pre_anchor_scale=1.5)


def _engine(memory_enabled: bool, zero_stage: int):
    """The trainer's pieces for a DP run: topology, model, step, DeepSpeed engine."""
    import contextlib

    from parallel.comm_accounting import install
    from parallel.deepspeed_engine import DeepSpeedEngine
    from parallel.topology import initialize_topology
    from pretrain.bilevel import BilevelStep
    from pretrain.config import MemoryConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from pretrain.fast_weights import build_fast_weight_plan
    from pretrain.model import DiffusionTransformer

    install()  # before DeepSpeed caches any collective
    cfg = RunConfig(model=ModelConfig(**MODEL), memory=MemoryConfig(enabled=memory_enabled, layer_fraction=0.5),
                    train=TrainConfig(global_batch_size=4, micro_batch_size=2),
                    parallel=ParallelConfig(zero_stage=zero_stage))
    topology = initialize_topology("cpu", 1, 1, MODEL["num_layers"])
    model = DiffusionTransformer(cfg.model, seed=3)
    plan = build_fast_weight_plan(cfg.model, cfg.memory)
    step_fn = BilevelStep(model, plan, cfg.memory, cfg.diffusion, 255)
    return DeepSpeedEngine(model, step_fn, cfg, topology, contextlib.nullcontext), topology, step_fn


def _count_one_step(rank, world, memory_enabled, zero_stage):
    from parallel.comm_accounting import counting

    engine, topology, _ = _engine(memory_enabled, zero_stage)
    batch = _batch(seed=rank, first_index=2 * rank)
    engine.train_step([batch], step=0, lr=1e-3)  # warm-up: DeepSpeed sets up buckets on its first step
    with counting({"data": topology.data_parallel_group, "world": torch.distributed.group.WORLD}) as counter:
        engine.train_step([batch], step=1, lr=1e-3)
    return dict(counter.calls["data"]), counter.bytes["data"], dict(counter.calls["world"])


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_inner_loop_adds_no_data_parallel_traffic(zero_stage):
    on = run_ranks(_count_one_step, 2, True, zero_stage)
    off = run_ranks(_count_one_step, 2, False, zero_stage)
    for rank in range(2):
        calls_on, bytes_on, _ = on[rank]
        calls_off, bytes_off, _ = off[rank]
        assert calls_on == calls_off and bytes_on == bytes_off, (on[rank], off[rank])
        # The outer gradient reduction itself is there: at least the parameters' bytes.
        assert bytes_on >= 4 * sum(
            n for n in (256 * 32 * 2, 2 * (4 * 32 * 32 + 3 * 32 * 64))
        ) // (2 if zero_stage >= 2 else 1)
    print(f"zero {zero_stage}: DP collectives per step {on[0][0]}, {on[0][1]} bytes (memory on and off)")


def _fast_weights_after_inner_loop(rank, world):
    engine, _, _ = _engine(True, 1)
    engine.module.record_fast_weights = True
    batch = _batch(seed=10 + rank, first_index=2 * rank)
    engine.train_step([batch], step=0, lr=1e-3)
    final = engine.module.last_result.fast_weight_history[-1]
    return {name: tuple(t.clone() for t in tensors) for name, tensors in final.items()}


def _single_process_fast_weights(rank):
    """What one process computes for rank ``rank``'s micro-batch, with the same global normaliser."""
    from parallel.topology import initialize_topology
    from pretrain.bilevel import BilevelStep
    from pretrain.config import DiffusionConfig, MemoryConfig, ModelConfig
    from pretrain.fast_weights import build_fast_weight_plan
    from pretrain.model import DiffusionTransformer
    from pretrain.objective import LossNormalizer

    initialize_topology("cpu")
    cfg, memory = ModelConfig(**MODEL), MemoryConfig(layer_fraction=0.5)
    model = DiffusionTransformer(cfg, seed=3)
    step = BilevelStep(model, build_fast_weight_plan(cfg, memory), memory, DiffusionConfig(), 255)
    batches = [_batch(seed=10 + r, first_index=2 * r) for r in range(2)]
    result = step(batches[rank], LossNormalizer.of([b.maskable for b in batches]), 0, 1234, record_fast_weights=True)
    return result.fast_weight_history[-1]


def test_fast_weights_stay_on_their_rank(topology):
    ranks = run_ranks(_fast_weights_after_inner_loop, 2)
    names = list(ranks[0])
    assert names and set(ranks[1]) == set(names)
    differs = any(not torch.allclose(a, b) for name in names for a, b in zip(ranks[0][name], ranks[1][name]))
    assert differs, "ranks with different data must write different memories"
    for rank in range(2):
        expected = _single_process_fast_weights(rank)
        for name in names:
            for ours, theirs in zip(ranks[rank][name], expected[name]):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def _train_expecting_refusal(rank, world, args):
    from launch.config_cli import build_config
    from pretrain.config import ConfigError
    from pretrain.trainer import train

    try:
        train(build_config(args))
    except ConfigError as err:
        return str(err)
    return None


@pytest.mark.parametrize("world, args, message", [
    (2, ["--parallel.tensor_parallel_size", "3"],
     "--parallel.tensor_parallel_size 3 x --parallel.pipeline_parallel_size 1 = 3 does not divide the world size 2"),
    (2, ["--parallel.pipeline_parallel_size", "2", "--model.num_layers", "3"],
     "3 layers do not split into 2 equal stages; possible pipeline sizes for 3 layers: 1, 3"),
    (2, ["--parallel.tensor_parallel_size", "2", "--model.num_heads", "3", "--model.hidden_size", "48"],
     "--parallel.tensor_parallel_size 2 does not divide --model.num_heads 3"),
    (2, ["--train.global_batch_size", "6", "--train.micro_batch_size", "2"],
     "--train.global_batch_size 6 is not a multiple of --train.micro_batch_size 2 x 2 data-parallel ranks"),
    (2, ["--parallel.pipeline_parallel_size", "2", "--memory.layer_fraction", "0.75"],
     "fast weights must sit on the last stage"),
])
def test_bad_layouts_are_refused(world, args, message, tmp_path):
    base = ["--model.vocab_size", "256", "--model.hidden_size", "32", "--model.num_layers", "4", "--model.num_heads",
            "2", "--model.ffn_hidden_size", "64", "--model.seq_len", "16", "--train.global_batch_size", "8",
            "--train.micro_batch_size", "2", "--logging.wandb", "false", "--train.out_dir", str(tmp_path / "out"),
            "--data.cache_dir", str(tmp_path / "cache")]
    results = run_ranks(_train_expecting_refusal, world, base + args)
    for text in results:
        assert text is not None and message in text, text


def test_zero_with_pipeline_stages_is_refused_at_parse_time():
    from launch.config_cli import build_config
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match="ZeRO stage 1 cannot be combined with 2 pipeline stages"):
        build_config(["--parallel.zero_stage", "1", "--parallel.pipeline_parallel_size", "2"])
