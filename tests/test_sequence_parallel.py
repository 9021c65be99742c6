"""Sequence parallelism: what its ranks exchange, how a batch is padded for it, and what it refuses.

Training at SP2 and SP4 (and TP2 x SP2, DP2 x SP2 with ZeRO 1 and 3, a padded length, memory variants, model
family options) against one process is in tests/test_parallel_layouts.py (slow tier); SP2 -> SP1 and
SP2 -> SP4 checkpoints with held-out losses in tests/test_reshard.py (default tier).
"""

import numpy as np
import pytest
import torch

from tests.helpers.ranks import run_ranks

MODEL = dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64, seq_len=16)


def _config(memory_enabled: bool, sequence: int = 2):
    from pretrain.config import MemoryConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig

    memory = MemoryConfig(enabled=memory_enabled, layer_fraction=0.5, masking_strategy="pmc", num_inner_steps=2)
    return RunConfig(model=ModelConfig(**MODEL), memory=memory,
                     train=TrainConfig(global_batch_size=4, micro_batch_size=2, seed=3),
                     parallel=ParallelConfig(sequence_parallel_size=sequence))


def _batch(cfg, data_rank):
    from data_pipeline.masking import build_masked_batch

    ids = np.random.default_rng(data_rank).integers(0, 255, size=(2, MODEL["seq_len"]))
    return build_masked_batch(ids, np.arange(2 * data_rank, 2 * data_rank + 2), seed=5, epoch=0,
                              trajectory=cfg.memory.trajectory)


def _count(rank, world):
    """One DP2 x SP2 step's collectives per group and operation, memory on and off."""
    from parallel.megatron import parallel_state
    from parallel.topology import initialize_topology
    from tests.helpers.traffic import count_second_step

    results = {}
    for memory in (True, False):
        cfg = _config(memory)
        topology = initialize_topology("cpu", 1, 1, MODEL["num_layers"], sequence_parallel_size=2)
        batch = _batch(cfg, topology.data_parallel_rank)
        calls, sizes, step, stats = count_second_step(cfg, topology, batch, lambda t: {
            "data": t.data_parallel_group, "sequence": t.sequence_parallel_group, "gradient": t.gradient_group})
        fast = step.initial_fast_weights(batch.padded_to(2), 1)
        fast_bytes = sum(t.numel() * t.element_size() for t in fast.leaves()) if fast is not None else 0
        results[memory] = (calls, sizes, fast_bytes, step.num_inner_steps, [float(s.loss) for s in stats],
                           [float(s.grad_norm) for s in stats])
        parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def counts():
    return run_ranks(_count, 4)


def test_the_inner_loop_talks_to_the_sequence_ranks_only(counts):
    """Memory on adds, per inner step, one all-reduce of the fast-weight gradients (their size) over the sequence's
    ranks, plus that step's attention all-to-alls; data-parallel and gradient traffic is that of plain MDLM."""
    for rank, by_memory in enumerate(counts):
        calls_on, bytes_on, fast_bytes, inner_steps, _, _ = by_memory[True]
        calls_off, bytes_off, *_ = by_memory[False]
        assert inner_steps == 2 and fast_bytes > 0
        for group in ("data", "gradient"):
            assert calls_on[group] == calls_off[group] and bytes_on[group] == bytes_off[group], (rank, group)
        added = bytes_on["sequence"].get("all_reduce", 0) - bytes_off["sequence"].get("all_reduce", 0)
        # (the step's statistics, added up over the sequence's ranks too, have one size with memory on and off)
        assert added == inner_steps * fast_bytes, (rank, added, fast_bytes)
        assert calls_on["sequence"]["all_to_all_single"] > calls_off["sequence"]["all_to_all_single"] > 0
    calls, bytes_, fast_bytes, *_ = counts[0][True]
    print(f"DP2 x SP2, memory on: sequence group {calls['sequence']} {bytes_['sequence']}, fast weights "
          f"{fast_bytes} bytes per inner step; data group {bytes_['data']}; gradient group {bytes_['gradient']}")


def test_losses_and_gradient_norms_are_those_of_one_process(counts, topology):
    """Two steps at DP2 x SP2 (ZeRO 0: DeepSpeed keeps no norm, the engine measures it) give one process's losses
    and gradient norms on the same global batch, memory on and off."""
    from pretrain.train.factory import build_bilevel_step, build_engine, build_model

    for memory in (True, False):
        cfg = _config(memory, sequence=1)
        model = build_model(cfg, topology)
        engine = build_engine(cfg, model, build_bilevel_step(cfg, model, topology, 255), topology)
        batches = [_batch(cfg, data_rank) for data_rank in range(2)]
        stats = [engine.train_step(batches, step=step, lr=1e-3) for step in range(2)]
        expected = [float(s.loss) for s in stats] + [float(s.grad_norm) for s in stats]
        for by_memory in counts:
            *_, losses, norms = by_memory[memory]
            for ours, theirs in zip(losses + norms, expected):
                assert ours == pytest.approx(theirs, rel=1e-5), (memory, losses, norms, stats)


def test_padding_for_sequence_parallelism_changes_no_count():
    from data_pipeline.masking import build_masked_batch

    ids = np.random.default_rng(0).integers(0, 255, size=(3, 30))
    batch = build_masked_batch(ids, np.arange(3), seed=1, epoch=0, num_inner_steps=2)
    padded = batch.padded_to(4)
    assert padded.input_ids.shape == (3, 32) and padded.inner_masks.shape[-1] == 32
    assert padded.padded_to(4) is padded and batch.padded_to(3) is batch
    for name in ("maskable", "anchor_mask"):
        assert torch.equal(getattr(padded, name)[:, :30], getattr(batch, name))
        assert not getattr(padded, name)[:, 30:].any()
    assert torch.equal(padded.inner_masks[..., :30], batch.inner_masks) and not padded.inner_masks[..., 30:].any()
    assert padded.key_padding_mask[:, :30].all() and not padded.key_padding_mask[:, 30:].any()
    assert (padded.segment_ids[:, 30:] == -1).all() and (padded.segment_ids[:, :30] >= 0).all()
    assert padded.anchor_rows() == batch.anchor_rows()
    attention = padded.attention_mask(within_documents=True)[:, 0]
    assert attention[:, :30, :30].all() and not attention[:, :30, 30:].any() and attention[:, 30:, 30:].all()


@pytest.mark.parametrize("args, message", [
    (["--parallel.sequence_parallel_size", "4"], "does not divide the 2 key/value heads"),
    (["--parallel.sequence_parallel_size", "2", "--parallel.pipeline_parallel_size", "2"], "pipeline_parallel_size 1"),
    (["--parallel.sequence_parallel_size", "2", "--train.compile", "true"], "--train.compile false"),
])
def test_layouts_sequence_parallelism_cannot_run_are_refused(args, message):
    from launch.config_cli import build_config
    from parallel.layout import LayoutError
    from pretrain.train.factory import check_run_layout

    base = ["--model.num_heads", "2", "--model.hidden_size", "32", "--model.num_layers", "2",
            "--train.global_batch_size", "4", "--train.micro_batch_size", "1"]
    with pytest.raises(LayoutError, match=message):
        check_run_layout(build_config(base + args), 4)


def test_a_world_sequence_parallelism_does_not_divide_is_refused():
    from launch.config_cli import build_config
    from parallel.layout import LayoutError
    from pretrain.train.factory import check_run_layout

    with pytest.raises(LayoutError, match="sequence_parallel_size 2 x .* does not divide the world size 3"):
        check_run_layout(build_config(["--parallel.sequence_parallel_size", "2"]), 3)
