"""What crosses data-parallel ranks, and what stays local (real DeepSpeed engines on gloo)."""

import numpy as np
import pytest
import torch

from tests.helpers.ranks import run_ranks

MODEL = dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64, seq_len=16)


def _batch(seed, first_index, b=2):
    from data_pipeline.masking import build_masked_batch

    ids = np.random.default_rng(seed).integers(0, 255, size=(b, MODEL["seq_len"]))
    return build_masked_batch(ids, np.arange(first_index, first_index + b), seed=seed, epoch=0,
                              num_inner_steps=2, pre_anchor_scale=1.5)


def _config(memory_enabled: bool = True, zero_stage: int = 0):
    from pretrain.config import MemoryConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig

    return RunConfig(model=ModelConfig(**MODEL), memory=MemoryConfig(enabled=memory_enabled, layer_fraction=0.5),
                     train=TrainConfig(global_batch_size=4, micro_batch_size=2, seed=3),
                     parallel=ParallelConfig(zero_stage=zero_stage))


class RecordingStep:
    """The real step, keeping the fast weights its inner loop wrote (the engine sees a step object)."""

    def __init__(self, step):
        self.step = step
        self.num_inner_steps = step.num_inner_steps
        self.last = None

    def __call__(self, batch, normalizer, step):
        self.last = self.step(batch, normalizer, step, record_fast_weights=True)
        return self.last

    def __getattr__(self, name):  # what else the factory reads of a step (sites, mask token, autocast...)
        return getattr(self.step, name)


def _engine(memory_enabled: bool, zero_stage: int, record: bool = False):
    """The factory's parts for a DP run, optionally with a recording step."""
    from parallel.comm_accounting import install
    from parallel.topology import initialize_topology
    from pretrain.train.factory import build_bilevel_step, build_engine, build_model

    install()  # before DeepSpeed caches any collective
    cfg = _config(memory_enabled, zero_stage)
    topology = initialize_topology("cpu", 1, 1, MODEL["num_layers"])
    model = build_model(cfg, topology)
    step = build_bilevel_step(cfg, model, topology, 255)
    if record:
        step = RecordingStep(step)
    return build_engine(cfg, model, step, topology), topology, step


def _count_one_step(rank, memory_enabled, zero_stage):
    from parallel.comm_accounting import counting

    engine, topology, _ = _engine(memory_enabled, zero_stage)
    batch = _batch(seed=rank, first_index=2 * rank)
    engine.train_step([batch], step=0, lr=1e-3)  # warm-up: DeepSpeed sets up buckets on its first step
    with counting({"data": topology.data_parallel_group, "world": torch.distributed.group.WORLD}) as counter:
        engine.train_step([batch], step=1, lr=1e-3)
    return dict(counter.calls["data"]), counter.bytes["data"], dict(counter.calls["world"])


def _fast_weights_after_inner_loop(rank):
    engine, _, recorder = _engine(True, 1, record=True)
    batch = _batch(seed=10 + rank, first_index=2 * rank)
    engine.train_step([batch], step=0, lr=1e-3)
    final = recorder.last.fast_weight_history[-1]
    return {name: tuple(t.clone() for t in tensors) for name, tensors in final.items()}


def _data_parallel_checks(rank, world):
    """Everything this file checks on 2 ranks, in one spawned group: the data-parallel collectives of
    one step with memory on and off (ZeRO 0 and 2), and the fast weights each rank's inner loop wrote."""
    counts = {(zero_stage, memory): _count_one_step(rank, memory, zero_stage)
              for zero_stage in (0, 2) for memory in (True, False)}
    return counts, _fast_weights_after_inner_loop(rank)


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_data_parallel_checks, 2)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_inner_loop_adds_no_data_parallel_traffic(zero_stage, two_ranks):
    on = [counts[(zero_stage, True)] for counts, _ in two_ranks]
    off = [counts[(zero_stage, False)] for counts, _ in two_ranks]
    for rank in range(2):
        calls_on, bytes_on, _ = on[rank]
        calls_off, bytes_off, _ = off[rank]
        assert calls_on == calls_off and bytes_on == bytes_off, (on[rank], off[rank])
        # The outer gradient reduction itself is there: at least the parameters' bytes.
        assert bytes_on >= 4 * sum(
            n for n in (256 * 32 * 2, 2 * (4 * 32 * 32 + 3 * 32 * 64))
        ) // (2 if zero_stage >= 2 else 1)
    print(f"zero {zero_stage}: DP collectives per step {on[0][0]}, {on[0][1]} bytes (memory on and off)")


def _single_process_fast_weights(rank):
    """What one process computes for rank ``rank``'s micro-batch, with the same global normaliser."""
    from parallel.collectives import LossNormalizer
    from parallel.topology import initialize_topology
    from pretrain.train.factory import build_bilevel_step, build_model

    topology = initialize_topology("cpu")
    cfg = _config()
    step = build_bilevel_step(cfg, build_model(cfg, topology), topology, 255)
    batches = [_batch(seed=10 + r, first_index=2 * r) for r in range(2)]
    result = step(batches[rank], LossNormalizer.of([b.maskable for b in batches]), 0, record_fast_weights=True)
    return result.fast_weight_history[-1]


def test_fast_weights_stay_on_their_rank(topology, two_ranks):
    ranks = [fast for _, fast in two_ranks]
    names = list(ranks[0])
    assert names and set(ranks[1]) == set(names)
    differs = any(not torch.allclose(a, b) for name in names for a, b in zip(ranks[0][name], ranks[1][name]))
    assert differs, "ranks with different data must write different memories"
    for rank in range(2):
        expected = _single_process_fast_weights(rank)
        for name in names:
            for ours, theirs in zip(ranks[rank][name], expected[name]):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
