"""Every parallel layout trains the same model as one process (gloo, CPU, memory on).

Three optimizer steps on the same global batches: the losses and the final weights (the
checkpoint's full-size model.safetensors, gathered across tensor and pipeline ranks) must
match the single-process run to a relative error below 1e-5, for every parameter.
"""

import pytest
import torch
from safetensors.torch import load_file

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


def _train(rank, world, args):
    from launch.config_cli import build_config
    from pretrain.trainer import train

    summary = train(build_config(args))
    return summary.losses


def run_layout(world, extra, out_dir, cache_dir):
    args = [*TINY, *extra, "--train.out_dir", str(out_dir), "--data.cache_dir", str(cache_dir)]
    losses = run_ranks(_train, world, args)
    weights = load_file(str(out_dir / "checkpoints" / "step_000003" / "model.safetensors"))
    return losses, weights


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    return run_layout(1, ["--train.micro_batch_size", "8"], tmp_path_factory.mktemp("single"), cache_dir)


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


LAYOUTS = {
    "tp2": (2, ["--parallel.tensor_parallel_size", "2", "--train.micro_batch_size", "4"]),
    "dp2-zero0": (2, ["--parallel.zero_stage", "0", "--train.micro_batch_size", "2"]),
    "dp2-zero1": (2, ["--parallel.zero_stage", "1", "--train.micro_batch_size", "2"]),
    "dp2-zero2": (2, ["--parallel.zero_stage", "2", "--train.micro_batch_size", "4"]),
    "dp2-zero3": (2, ["--parallel.zero_stage", "3", "--train.micro_batch_size", "2"]),
    "tp2-dp2-zero2": (4, ["--parallel.tensor_parallel_size", "2", "--parallel.zero_stage", "2",
                          "--train.micro_batch_size", "2"]),
    "pp2": (2, ["--parallel.pipeline_parallel_size", "2", "--train.micro_batch_size", "2"]),
    "pp2-gpipe": (2, ["--parallel.pipeline_parallel_size", "2", "--parallel.pipeline_schedule", "gpipe",
                      "--train.micro_batch_size", "2"]),
    "tp2-pp2": (4, ["--parallel.tensor_parallel_size", "2", "--parallel.pipeline_parallel_size", "2",
                    "--train.micro_batch_size", "2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_the_single_process_model(layout, reference, cache_dir, tmp_path):
    world, extra = LAYOUTS[layout]
    assert_same_training(run_layout(world, extra, tmp_path / layout, cache_dir), reference)


def test_tp2_pp2_dp2_on_eight_ranks(reference, cache_dir, tmp_path):
    extra = ["--parallel.tensor_parallel_size", "2", "--parallel.pipeline_parallel_size", "2",
             "--train.micro_batch_size", "2"]
    assert_same_training(run_layout(8, extra, tmp_path / "tp2-pp2-dp2", cache_dir), reference)
