"""Process groups, layout checks and sharing a replica's micro-batches across its ranks."""

import numpy as np
import pytest
import torch

from common.errors import UsageError
from data_pipeline.masking import MaskedBatch, build_masked_batch
from parallel.layout import LayoutError, stage_layers
from tests.helpers.ranks import run_ranks


def _batch(seed: int, b: int = 2, l: int = 8, states: int = 2, padded: bool = False) -> MaskedBatch:
    ids = np.random.default_rng(seed).integers(0, 50, size=(b, l))
    padding = None
    if padded:
        padding = np.ones((b, l), dtype=bool)
        padding[0, 5:] = False
    batch = build_masked_batch(ids, np.arange(b) + 100 * seed, seed=seed, epoch=3, num_inner_steps=states + 1,
                               pre_anchor_scale=1.5, key_padding_mask=padding)
    batch.segment_ids = torch.from_numpy(np.repeat(np.arange(2), l // 2)[None].repeat(b, 0)).int()
    batch.epoch = torch.full((b,), 3, dtype=torch.int64)
    batch.num_skipped = 7
    return batch


def assert_same_batch(a: MaskedBatch, b: MaskedBatch) -> None:
    for name in ("input_ids", "maskable", "t", "anchor_mask", "inner_masks", "sample_index", "segment_ids",
                 "epoch"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (a.key_padding_mask is None) == (b.key_padding_mask is None)
    if a.key_padding_mask is not None:
        assert torch.equal(a.key_padding_mask, b.key_padding_mask)
    assert a.num_skipped == b.num_skipped and a.row_counts == b.row_counts
    for name in ("inner_maskable", "inner_anchor_mask"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), name


@pytest.mark.fast
@pytest.mark.parametrize("padded", [False, True])
def test_packed_batch_round_trips_exactly(padded):
    batch = _batch(1, padded=padded)
    ints, floats = batch.pack()
    assert (tuple(ints.shape), tuple(floats.shape)) == MaskedBatch.packed_shapes(2, 8, 2)
    assert_same_batch(MaskedBatch.unpack(ints, floats, num_states=2), batch)


@pytest.mark.fast
def test_a_batch_with_separate_inner_masks_round_trips_exactly():
    from data_pipeline.trajectory import TrajectorySpec

    ids = np.random.default_rng(0).integers(0, 50, size=(2, 8))
    padding = np.ones((2, 8), dtype=bool)
    padding[0, 5:] = False
    batch = build_masked_batch(ids, np.arange(2), seed=1, epoch=0, key_padding_mask=padding,
                               trajectory=TrajectorySpec("pmc", num_inner_steps=3, pad_mode="inner"))
    batch.segment_ids = torch.zeros(2, 8, dtype=torch.int32)
    batch.epoch = torch.zeros(2, dtype=torch.int64)
    ints, floats = batch.pack()
    assert (tuple(ints.shape), tuple(floats.shape)) == MaskedBatch.packed_shapes(2, 8, 2, separate_inner=True)
    assert_same_batch(MaskedBatch.unpack(ints, floats, num_states=2), batch)


@pytest.mark.fast
def test_stage_layers_split_evenly():
    assert [stage_layers(8, 4, r) for r in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_layers(6, 1, 0) == range(6)


BASE = ["--model.vocab_size", "256", "--model.hidden_size", "32", "--model.num_layers", "4", "--model.num_heads",
        "2", "--model.ffn_hidden_size", "64", "--model.seq_len", "16", "--train.global_batch_size", "8",
        "--train.micro_batch_size", "2"]


@pytest.mark.fast
@pytest.mark.parametrize("world, args, message", [
    (2, ["--parallel.tensor_parallel_size", "3"],
     "--parallel.tensor_parallel_size 3 x --parallel.pipeline_parallel_size 1 = 3 does not divide the world size 2; "
     "possible tensor x pipeline sizes: 1x1, 1x2, 2x1"),
    (2, ["--parallel.pipeline_parallel_size", "2", "--model.num_layers", "3"],
     "3 layers do not split into 2 equal stages; possible pipeline sizes for 3 layers: 1, 3"),
    (2, ["--parallel.tensor_parallel_size", "2", "--model.num_heads", "3", "--model.hidden_size", "48"],
     "--parallel.tensor_parallel_size 2 does not divide --model.num_heads 3; tensor-parallel sizes this model "
     "allows: 1"),
    (2, ["--train.global_batch_size", "6", "--train.micro_batch_size", "2"],
     "--train.global_batch_size 6 is not a multiple of --train.micro_batch_size 2 x 2 data-parallel ranks"),
    (2, ["--parallel.pipeline_parallel_size", "2", "--train.global_batch_size", "2"],
     "2 pipeline stages need at least 2 micro-batches per rank and step, this layout has 1"),
    (2, ["--parallel.pipeline_parallel_size", "2", "--memory.layer_fraction", "0.75"],
     "puts fast weights on layers [1, 4) but the last of 2 pipeline stages holds [2, 4); fast weights must sit on "
     "the last stage"),
])
def test_bad_layouts_are_refused_with_sizes_that_work(world, args, message):
    from launch.config_cli import build_config
    from pretrain.train.factory import check_run_layout

    with pytest.raises(LayoutError) as refused:
        check_run_layout(build_config(BASE + args), world)
    assert message in str(refused.value)


@pytest.mark.fast
def test_the_launcher_refuses_a_bad_layout_before_starting_ranks(capsys):
    from launch.pretrain_cli import main

    assert main(["--nproc-per-node", "2", *BASE, "--parallel.tensor_parallel_size", "3"]) == 2
    assert "does not divide the world size 2" in capsys.readouterr().err


@pytest.mark.fast
def test_zero_with_pipeline_stages_is_refused_at_parse_time():
    from launch.config_cli import build_config

    with pytest.raises(UsageError, match="ZeRO stage 1 cannot be combined with 2 pipeline stages"):
        build_config(["--parallel.zero_stage", "1", "--parallel.pipeline_parallel_size", "2"])


@pytest.mark.fast
def test_world_of_one(topology):
    assert (topology.world_size, topology.rank, topology.data_parallel_size) == (1, 0, 1)
    assert topology.reads_data and topology.is_main and topology.data_source_rank == 0


# -- four ranks: groups in megatron's order, and each replica's batch on all its ranks -------------
def _groups_and_broadcast(rank, world):
    import torch.distributed as dist

    from parallel.collectives import broadcast_batch
    from parallel.megatron import parallel_state
    from parallel.topology import initialize_topology

    seen = {}
    for name, tensor, pipeline in (("tp2-dp2", 2, 1), ("tp2-pp2", 2, 2)):
        topology = initialize_topology("cpu", tensor, pipeline, 4)
        groups = {
            "tensor": dist.get_process_group_ranks(topology.tensor_parallel_group),
            "data": dist.get_process_group_ranks(topology.data_parallel_group),
            "pipeline": dist.get_process_group_ranks(topology.pipeline_parallel_group),
            "replica": dist.get_process_group_ranks(topology.model_parallel_group),
        }
        local = _batch(seed=10 + topology.data_parallel_rank, padded=True) if topology.reads_data else None
        shared = broadcast_batch(local, (2, 8, 2), topology.data_source_rank, topology.model_parallel_group,
                                 topology.device)
        seen[name] = (groups, topology.reads_data, topology.data_source_rank, topology.data_parallel_rank,
                      shared.pack())
        parallel_state.destroy_model_parallel()
    return seen


def test_groups_follow_megatron_order_and_replicas_share_one_batch():
    results = run_ranks(_groups_and_broadcast, 4)
    tp_dp = [r["tp2-dp2"] for r in results]
    assert [g["tensor"] for g, *_ in tp_dp] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [g["data"] for g, *_ in tp_dp] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [reads for _, reads, *_ in tp_dp] == [True, False, True, False]
    assert [source for _, _, source, *_ in tp_dp] == [0, 0, 2, 2]
    for rank, (_, _, _, data_rank, (ints, floats)) in enumerate(tp_dp):
        assert_same_batch(MaskedBatch.unpack(ints, floats), _batch(seed=10 + data_rank, padded=True))
    tp_pp = [r["tp2-pp2"] for r in results]
    assert [g["pipeline"] for g, *_ in tp_pp] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(g["replica"] == [0, 1, 2, 3] for g, *_ in tp_pp)
    assert [reads for _, reads, *_ in tp_pp] == [True, False, False, False]
    for _, _, source, _, (ints, floats) in tp_pp:
        assert source == 0
        assert_same_batch(MaskedBatch.unpack(ints, floats), _batch(seed=10, padded=True))
