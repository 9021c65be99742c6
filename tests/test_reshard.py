"""A checkpoint saved at one layout resumes at another, and training continues exactly.

Each pair trains 3 steps at layout A (a 6-step run stopped after step 3, so the learning-rate
schedule is the 6-step one), then resumes at layout B to step 6. The six losses and the final
weights must equal six uninterrupted single-process steps to a relative error below 1e-5.
Runs of one world size share one spawned group of ranks.

The held-out evaluation (``--eval.every 3``: after step 3 at layout A and step 6 at layout B, with and
without inference-time adaptation) must also give the single-process figures at every layout.
"""

from pathlib import Path

import pytest

from parallel.checkpoint.reading import read_weights
from tests.helpers import read_metrics
from tests.helpers.layouts import LAYOUT_OPTIONS, LAYOUTS, relative
from tests.helpers.ranks import run_ranks

STEPS = ["--train.steps", "6", "--eval.every", "3", "--eval.num_samples", "12", "--eval.micro_batch_size", "4"]

PAIRS = {  # name: (layout A, layout B)
    "dp2-zero1 -> single": ("dp2-zero1", "single"),
    "single -> tp2-dp2-zero2": ("single", "tp2-dp2-zero2"),
    "tp2 -> pp2": ("tp2", "pp2"),
    "dp2-zero3 -> dp2-zero1": ("dp2-zero3", "dp2-zero1"),
    "pp2 -> dp2-zero3": ("pp2", "dp2-zero3"),
    # Sequence parallelism: trained at SP2, resumed at SP1 and at SP4.
    "sp2 -> single": ("sp2", "single"),
    "sp2 -> sp4": ("sp2", "sp4"),
}
# The pairs that resume on four ranks (the longest to run on two cores) and ZeRO 3 -> 1 are in the slow tier, with
# their own reference run; the default tier keeps every kind of change (ZeRO 1 and 3, TP, PP, SP, one and two ranks).
SLOW_PAIRS = ("single -> tp2-dp2-zero2", "sp2 -> sp4", "dp2-zero3 -> dp2-zero1")


class StopAfter:
    def __init__(self, steps: int):
        self.steps, self.calls = steps, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.steps


def _train_each(rank, world, runs):
    """``(key, layout, folder, stop after)`` in turn on these ranks; each run's losses by key."""
    from launch.config_cli import build_config
    from parallel.megatron import parallel_state
    from pretrain.train.trainer import train

    losses = {}
    for key, layout, folder, data, stop in runs:
        args = [*LAYOUT_OPTIONS, *STEPS, *LAYOUTS[layout][1], "--train.out_dir", folder, "--data.path", data]
        summary = train(build_config(args), StopAfter(stop) if stop else (lambda: False))
        losses[key] = (summary.losses, summary.resumed_from.name if summary.resumed_from else None)
        parallel_state.destroy_model_parallel()
    return losses


def _run(world, runs):
    """World size 1 runs in this process; larger ones in one spawned group of ranks."""
    if world == 1:
        return _train_each(0, 1, runs)
    return run_ranks(_train_each, world, runs)[0]


def _reshard(root: Path, data: str, pairs: list[str]):
    """Every pair's losses (A then B) and final weights, plus the uninterrupted reference.

    Runs go in the order their checkpoints need, grouped by world size: 1 (the reference and the
    one-process A), 2 (every two-rank A, then the two-rank B that resume from them), 1, 4."""
    folders = {name: str(root / name.replace(" ", "").replace(">", "")) for name in pairs}

    def run(name, phase):
        layout = PAIRS[name][phase]
        return (f"{name}/{phase}", layout, folders[name], data, 3 if phase == 0 else 0)

    def worlds(phase, world):
        return [run(name, phase) for name in pairs if LAYOUTS[PAIRS[name][phase]][0] == world]

    losses = _run(1, [("reference", "single", str(root / "reference"), data, 0)] + worlds(0, 1))
    for phase, world in ((0, 2), (1, 2), (1, 1), (0, 4), (1, 4)):
        if worlds(phase, world):
            losses.update(_run(world, worlds(phase, world)))
    reference = (losses["reference"][0], read_weights(root / "reference" / "checkpoints" / "step_000006"))
    results = {}
    for name in pairs:
        first, _ = losses[f"{name}/0"]
        second, resumed_from = losses[f"{name}/1"]
        assert resumed_from == "step_000003", (name, resumed_from)
        results[name] = (first + second, read_weights(f"{folders[name]}/checkpoints/step_000006"),
                         _eval_losses(folders[name]))
    return (reference[0], reference[1], _eval_losses(root / "reference")), results


@pytest.fixture(scope="module")
def resharded(tmp_path_factory, prepared_corpus):
    pairs = [name for name in PAIRS if name not in SLOW_PAIRS]
    return _reshard(tmp_path_factory.mktemp("reshard"), str(prepared_corpus()), pairs)


@pytest.fixture(scope="module")
def resharded_slow(tmp_path_factory, prepared_corpus):
    return _reshard(tmp_path_factory.mktemp("reshard4"), str(prepared_corpus()), list(SLOW_PAIRS))


def _results(request, pair):
    return request.getfixturevalue("resharded_slow" if pair in SLOW_PAIRS else "resharded")


PAIR_PARAMS = [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_PAIRS else name for name in PAIRS]


def _eval_losses(folder) -> dict:
    records = read_metrics(Path(folder))
    return {(r["step"], key): r[key] for r in records for key in ("eval_loss", "eval_adapted_loss") if key in r}


@pytest.mark.parametrize("pair", PAIR_PARAMS)
def test_resume_at_another_layout_continues_exactly(request, pair):
    (ref_losses, ref_weights, _), results = _results(request, pair)
    losses, weights, _ = results[pair]
    assert len(losses) == 6
    for ours, theirs in zip(losses, ref_losses):
        assert abs(ours - theirs) / abs(theirs) < 1e-5, (pair, losses, ref_losses)
    assert set(weights) == set(ref_weights)
    for name in ref_weights:
        assert relative(weights[name], ref_weights[name]) < 1e-5, (pair, name)


@pytest.mark.parametrize("pair", PAIR_PARAMS)
def test_held_out_losses_are_the_same_at_every_layout(request, pair):
    (_, _, reference), results = _results(request, pair)
    ours = results[pair][2]
    assert sorted(reference) == sorted(ours) == [(step, key) for step in (3, 6)
                                                 for key in ("eval_adapted_loss", "eval_loss")]
    for key, value in reference.items():
        assert abs(ours[key] - value) / value < 1e-5, (pair, key, ours[key], value)
    assert reference[(6, "eval_loss")] != reference[(3, "eval_loss")], "training must move the held-out loss"
