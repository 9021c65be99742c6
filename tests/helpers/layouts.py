"""The parallel layouts the tests compare with one process, and the comparison itself.

The layout model has 4 layers of width 64 (4 heads, so TP2 and PP2 both split it; fast weights on the last
layer, so they sit on the last pipeline stage) and trains 3 steps of 8 sequences."""

from __future__ import annotations

import torch

from tests.helpers import options
from tests.helpers.ranks import run_ranks

LAYOUT_MODEL = {
    "model.vocab_size": 512, "model.hidden_size": 64, "model.num_layers": 4, "model.num_heads": 4,
    "model.ffn_hidden_size": 128, "model.seq_len": 32, "memory.layer_fraction": 0.25,
    "train.steps": 3, "train.global_batch_size": 8, "optim.warmup_steps": 1, "optim.lr": 1e-3,
    # AdamW divides by sqrt(v) + eps: with eps = 1e-8, an element whose gradient is ~1e-8 (rare
    # tokens' embedding rows) turns float noise of 1e-7 into an O(lr) difference. A larger eps keeps
    # the comparison about the layouts rather than that amplification.
    "optim.eps": 1e-6,
    "data.num_workers": 0, "logging.wandb": False, "logging.progress_bar": False, "train.num_threads": 1,
}
LAYOUT_OPTIONS = options(LAYOUT_MODEL)

TP2 = ["--parallel.tensor_parallel_size", "2"]
PP2 = ["--parallel.pipeline_parallel_size", "2"]


def sequence(size: int) -> list[str]:
    return ["--parallel.sequence_parallel_size", str(size)]


def zero(stage: int) -> list[str]:
    return ["--parallel.zero_stage", str(stage)]


def experts(size: int) -> list[str]:
    return ["--parallel.expert_parallel_size", str(size)]


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
    "sp2": (2, sequence(2) + micro(4)),
    "sp4": (4, sequence(4) + micro(8)),
    "tp2-sp2": (4, TP2 + sequence(2) + micro(4)),
    "dp2-sp2-zero1": (4, sequence(2) + zero(1) + micro(2)),
    "dp2-sp2-zero3": (4, sequence(2) + zero(3) + micro(4)),
    # expert parallelism (mixture-of-experts models only)
    "dp2-ep2-zero0": (2, experts(2) + zero(0) + micro(2)),
    "dp2-ep2-zero1": (2, experts(2) + zero(1) + micro(2)),
    "dp2-ep2-zero2": (2, experts(2) + zero(2) + micro(4)),
    "sp2-ep2": (2, sequence(2) + experts(2) + micro(4)),
    "dp4-ep2-zero1": (4, experts(2) + zero(1) + micro(2)),
    "dp4-ep4-zero2": (4, experts(4) + zero(2) + micro(2)),
    "tp2-dp2-ep2-zero1": (4, TP2 + experts(2) + zero(1) + micro(2)),
    "pp2-dp2-ep2": (4, PP2 + experts(2) + micro(2)),
}


def _train_each(rank, world, runs):
    """Train each ``(name, args)`` in turn on these ranks; the losses of each, by name."""
    from launch.config_cli import build_config
    from parallel.megatron import parallel_state
    from pretrain.train.trainer import train

    losses = {}
    for name, args in runs:
        losses[name] = train(build_config(args)).losses
        parallel_state.destroy_model_parallel()  # the next layout builds its own groups
    return losses


def run_layouts(names, root, data, extra=()):
    """Train the layouts ``names`` (all of one world size) in one spawned group on the prepared dataset
    ``data`` (with the options ``extra`` added); (losses of each rank, final weights) by name."""
    from parallel.checkpoint.reading import read_weights

    worlds = {LAYOUTS[name][0] for name in names}
    assert len(worlds) == 1, names
    runs = [(name, [*LAYOUT_OPTIONS, *LAYOUTS[name][1], *extra, "--train.out_dir", str(root / name), "--data.path",
                    str(data)]) for name in names]
    if worlds == {1}:
        return {name: ([losses] , read_weights(root / name / "checkpoints" / "step_000003"))
                for name, losses in _train_each(0, 1, runs).items()}
    by_rank = run_ranks(_train_each, worlds.pop(), runs)
    return {name: ([losses[name] for losses in by_rank],
                   read_weights(root / name / "checkpoints" / "step_000003"))
            for name in names}


def relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def initial_weight(name, like):
    """The untrained value of a weight of the layout model (initialised from (seed 1234, name))."""
    from pretrain.model.transformer import _name_seed

    generator = torch.Generator().manual_seed(_name_seed(1234, name))
    return torch.empty(like[name].shape).normal_(0.0, 0.02 / (2 * 4) ** 0.5 if "down" in name else 0.02,
                                                 generator=generator)


def assert_same_training(result, reference):
    """Every rank's 3 losses and every final weight equal the single-process run's to 1e-5 (relative)."""
    losses, weights = result
    ref_losses, ref_weights = reference
    for rank_losses in losses:
        assert len(rank_losses) == 3
        for ours, theirs in zip(rank_losses, ref_losses[0]):
            assert abs(ours - theirs) / abs(theirs) < 1e-5, (rank_losses, ref_losses[0])
    assert set(weights) == set(ref_weights)
    moved = [relative(ref_weights[k], initial_weight(k, ref_weights)) for k in ["layers.3.attention.qkv.weight"]]
    assert all(m > 1e-4 for m in moved), "training must have moved the weights for this to mean anything"
    for name in ref_weights:
        assert relative(weights[name], ref_weights[name]) < 1e-5, name
