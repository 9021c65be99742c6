"""Every parallel layout trains the same model as one process (gloo, CPU, memory on).

Three optimizer steps on the same global batches: the losses and the final weights (the
sharded checkpoint's weights, read back at full size) must
match the single-process run to a relative error below 1e-5, for every parameter.

Layouts of one world size run one after another in the same spawned ranks (process groups
stay, megatron's parallel state is rebuilt for each), so process start-up is paid once per
group. All of them are in the slow tier (CI runs it after the default tier): by default,
``tests/test_reshard.py`` trains TP2, PP2, DP2 ZeRO 1 and 3 from scratch and TP2 x DP2 ZeRO 2 from a
checkpoint against the same single-process reference, which covers the same property.
"""

import pytest
import torch

from pretrain.checkpoint import read_weights
from tests.dist_utils import run_ranks

TINY = [
    "--model.vocab_size", "512", "--model.hidden_size", "64", "--model.num_layers", "4", "--model.num_heads", "4",
    "--model.ffn_hidden_size", "128", "--model.seq_len", "32", "--memory.layer_fraction", "0.25",
    "--train.steps", "3", "--train.global_batch_size", "8", "--optim.warmup_steps", "1", "--optim.lr", "1e-3",
    # AdamW divides by sqrt(v) + eps: with eps = 1e-8, an element whose gradient is ~1e-8 (rare
    # tokens' embedding rows) turns float noise of 1e-7 into an O(lr) difference. A larger eps keeps
    # the comparison about the layouts rather than that amplification.
    "--optim.eps", "1e-6",
    "--data.num_workers", "0", "--logging.wandb", "false", "--logging.progress_bar", "false",
    "--train.num_threads", "1",
]

TP2 = ["--parallel.tensor_parallel_size", "2"]
PP2 = ["--parallel.pipeline_parallel_size", "2"]


def zero(stage: int) -> list[str]:
    return ["--parallel.zero_stage", str(stage)]


def micro(size: int) -> list[str]:
    return ["--train.micro_batch_size", str(size)]


LAYOUTS = {  # name: (world size, options)
    "single": (1, micro(8)),
    "tp2": (2, TP2 + micro(4)),
    "pp2": (2, PP2 + micro(2)),
    "dp2-zero1": (2, zero(1) + micro(2)),
    "dp2-zero3": (2, zero(3) + micro(2)),
    "tp2-dp2-zero2": (4, TP2 + zero(2) + micro(2)),
    "dp2-zero0": (2, zero(0) + micro(2)),
    "dp2-zero2": (2, zero(2) + micro(4)),
    "pp2-gpipe": (2, PP2 + ["--parallel.pipeline_schedule", "gpipe"] + micro(2)),
    "tp2-pp2": (4, TP2 + PP2 + micro(2)),
    "tp2-pp2-dp2": (8, TP2 + PP2 + micro(2)),
}


def _train_each(rank, world, runs):
    """Train each ``(name, args)`` in turn on these ranks; the losses of each, by name."""
    from launch.config_cli import build_config
    from parallel.megatron import parallel_state
    from pretrain.trainer import train

    losses = {}
    for name, args in runs:
        losses[name] = train(build_config(args)).losses
        parallel_state.destroy_model_parallel()  # the next layout builds its own groups
    return losses


def run_layouts(names, root, cache_dir):
    """Train the layouts ``names`` (all of one world size) in one spawned group; (losses, weights) by name."""
    worlds = {LAYOUTS[name][0] for name in names}
    assert len(worlds) == 1, names
    runs = [(name, [*TINY, *LAYOUTS[name][1], "--train.out_dir", str(root / name), "--data.cache_dir",
                    str(cache_dir)]) for name in names]
    by_rank = run_ranks(_train_each, worlds.pop(), runs)
    return {name: ([losses[name] for losses in by_rank],
                   read_weights(root / name / "checkpoints" / "step_000003"))
            for name in names}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    return run_layouts(["single"], tmp_path_factory.mktemp("single"), cache_dir)["single"]


def relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def assert_same_training(result, reference):
    losses, weights = result
    ref_losses, ref_weights = reference
    for rank_losses in losses:
        assert len(rank_losses) == 3
        for ours, theirs in zip(rank_losses, ref_losses[0]):
            assert abs(ours - theirs) / abs(theirs) < 1e-5, (rank_losses, ref_losses[0])
    assert set(weights) == set(ref_weights)
    moved = [relative(ref_weights[k], load_initial(k, ref_weights)) for k in ["layers.3.mlp.gate.weight"]]
    assert all(m > 1e-4 for m in moved), "training must have moved the weights for this to mean anything"
    for name in ref_weights:
        assert relative(weights[name], ref_weights[name]) < 1e-5, name


def load_initial(name, like):
    """The untrained value of a weight (the model is initialised from (seed, name))."""
    from pretrain.model import _name_seed

    generator = torch.Generator().manual_seed(_name_seed(1234, name))
    return torch.empty(like[name].shape).normal_(0.0, 0.02 / (2 * 4) ** 0.5 if "down" in name else 0.02,
                                                 generator=generator)


def _check_group(names, reference, cache_dir, root):
    results = run_layouts(names, root, cache_dir)
    for name in names:
        try:
            assert_same_training(results[name], reference)
        except AssertionError as err:
            raise AssertionError(f"layout {name}: {err}") from err


@pytest.mark.slow
def test_two_rank_layouts_train_the_single_process_model(reference, cache_dir, tmp_path):
    _check_group(["tp2", "pp2", "dp2-zero1", "dp2-zero3"], reference, cache_dir, tmp_path)


@pytest.mark.slow
def test_tp2_dp2_zero2_trains_the_single_process_model(reference, cache_dir, tmp_path):
    _check_group(["tp2-dp2-zero2"], reference, cache_dir, tmp_path)


@pytest.mark.slow
def test_more_two_rank_layouts_train_the_single_process_model(reference, cache_dir, tmp_path):
    _check_group(["dp2-zero0", "dp2-zero2", "pp2-gpipe"], reference, cache_dir, tmp_path)


@pytest.mark.slow
def test_tp2_pp2_trains_the_single_process_model(reference, cache_dir, tmp_path):
    _check_group(["tp2-pp2"], reference, cache_dir, tmp_path)


@pytest.mark.slow
def test_tp2_pp2_dp2_on_eight_ranks(reference, cache_dir, tmp_path):
    _check_group(["tp2-pp2-dp2"], reference, cache_dir, tmp_path)
