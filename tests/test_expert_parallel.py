"""Expert parallelism: what its ranks exchange in a step, and what it refuses.

Training at EP2 and EP4 with ZeRO 0-2, tensor and sequence parallelism against one process, and resuming across
expert-parallel sizes, are in tests/test_moe.py (slow tier); the plan's figures at EP layouts in tests/test_plan.py.
"""

import numpy as np
import pytest

from tests.helpers.ranks import run_ranks

MODEL = dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64, seq_len=16,
             moe_num_experts=4, moe_top_k=2, moe_ffn_hidden_size=32, moe_shared_ffn_hidden_size=32,
             moe_first_dense_layers=1)


def _config(memory_enabled: bool):
    from pretrain.config import MemoryConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig

    memory = MemoryConfig(enabled=memory_enabled, layer_fraction=0.5, masking_strategy="pmc", num_inner_steps=2)
    return RunConfig(model=ModelConfig(**MODEL), memory=memory,
                     train=TrainConfig(global_batch_size=8, micro_batch_size=2, seed=3),
                     parallel=ParallelConfig(expert_parallel_size=2, zero_stage=1))


def _count(rank, world):
    """One DP4 x EP2 step's collectives per group and operation, memory on and off."""
    from data_pipeline.masking import build_masked_batch
    from parallel.megatron import parallel_state
    from parallel.topology import initialize_topology
    from tests.helpers.traffic import count_second_step

    results = {}
    for memory in (True, False):
        cfg = _config(memory)
        topology = initialize_topology("cpu", 1, 1, MODEL["num_layers"], expert_parallel_size=2)
        ids = np.random.default_rng(topology.data_parallel_rank).integers(0, 255, size=(2, MODEL["seq_len"]))
        batch = build_masked_batch(ids, np.arange(2) + 2 * topology.data_parallel_rank, seed=5, epoch=0,
                                   trajectory=cfg.memory.trajectory)
        calls, sizes, step, _ = count_second_step(cfg, topology, batch, lambda t: {
            "data": t.data_parallel_group, "expert": t.expert_parallel_group,
            "expert_data": t.expert_data_parallel_group})
        fast = step.initial_fast_weights(batch, 1)
        routed = [t for site in step.plan.sites if site.routed for t in fast.tensors[site.name]] if fast else []
        results[memory] = (calls, sizes, [tuple(t.shape) for t in routed], step.num_inner_steps)
        parallel_state.destroy_model_parallel()
    return results


@pytest.mark.slow
def test_the_inner_loop_talks_to_the_expert_ranks_only():
    """Memory on adds, per inner step, the dispatch all-to-alls of the tail's MoE layer (forward and backward) and
    one all-reduce of each routed fast-weight tensor's per-sequence squared norm (for the clip) over the expert
    group; data-parallel and expert-data-parallel traffic is that of plain MDLM."""
    for rank, by_memory in enumerate(run_ranks(_count, 4)):
        calls_on, bytes_on, routed, inner_steps = by_memory[True]
        calls_off, bytes_off, *_ = by_memory[False]
        assert inner_steps == 2 and len(routed) == 6  # A and B of each routed projection
        assert all(shape[:2] == (4, 2) for shape in routed)  # 2 sequences x 2 ranks, 2 of 4 experts here
        for group in ("data", "expert_data"):
            assert calls_on[group] == calls_off[group] and bytes_on[group] == bytes_off[group], (rank, group)
        added = bytes_on["expert"].get("all_reduce", 0) - bytes_off["expert"].get("all_reduce", 0)
        assert added == inner_steps * len(routed) * 4 * 4, (rank, added)  # 4 sequences' fp32 squares per tensor
        assert calls_on["expert"]["all_to_all_single"] > calls_off["expert"]["all_to_all_single"] > 0
        if rank == 0:
            print(f"DP4 x EP2, memory on: expert group {calls_on['expert']} {bytes_on['expert']}; memory off: "
                  f"{calls_off['expert']} {bytes_off['expert']}; data group {bytes_on['data']}")


@pytest.mark.fast
@pytest.mark.parametrize("args,world,message", [
    (["--parallel.zero_stage", "3"], 4, "ZeRO 3 does not partition expert-parallel experts"),
    (["--model.moe_num_experts", "6"], 4, "must divide --model.moe_num_experts 6 and the 4 data x sequence ranks; "
                                          "sizes that do: 1, 2"),
    ([], 6, "the 6 data x sequence ranks; sizes that do: 1, 2"),
    (["--model.moe_num_experts", "0"], 4, "the model has no routed experts"),
])
def test_layouts_expert_parallelism_cannot_run_are_refused(args, world, message):
    from launch.config_cli import build_config
    from parallel.layout import LayoutError
    from pretrain.config import ConfigError
    from pretrain.train.factory import check_run_layout

    base = ["--model.num_layers", "2", "--model.moe_num_experts", "4", "--model.moe_shared_ffn_hidden_size", "64",
            "--parallel.expert_parallel_size", "4", "--train.global_batch_size", "24", "--train.micro_batch_size", "2"]
    with pytest.raises((ConfigError, LayoutError), match=message):
        check_run_layout(build_config(base + args), world)
