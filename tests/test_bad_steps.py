"""Bad steps never corrupt a run: a non-finite gradient on one rank (or a loss spike) skips the update on
every rank with weights, AdamW state and the learning-rate schedule bit-unchanged; too many in a row roll
back to the newest good checkpoint; past the budget the run stops with a message. And the hang watchdog."""

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from launch.config_cli import build_config
from parallel.checkpoint.reading import read_tensors
from tests.helpers import read_metrics
from tests.helpers.ranks import run_ranks

# Every step checkpointed and kept, so a skipped step can be compared bit for bit with the one before.
GUARDED = {"memory.layer_fraction": 0.5, "eval.every": 0, "checkpoint.every": 1, "checkpoint.keep": 20,
           "optim.warmup_steps": 1}


@pytest.fixture
def base(tiny):
    return tiny(GUARDED)


def poison(steps: set[int], ranks: set[int], factor: float = float("nan")):
    """Multiply the loss (hence every gradient) of the given steps on the given ranks by ``factor``."""
    import torch.distributed as dist

    from pretrain.memdlm.bilevel import BilevelStep

    original = BilevelStep.__call__

    def call(self, batch, normalizer, step, **kwargs):
        result = original(self, batch, normalizer, step, **kwargs)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if step in steps and rank in ranks:
            result.loss = result.loss * factor
        return result

    BilevelStep.__call__ = call
    return original


def _everything(folder):
    return dict(read_tensors(folder, prefix=""))


def _train_poisoned(rank, world, args, steps, ranks, factor=float("nan")):
    from pretrain.memdlm.bilevel import BilevelStep
    from pretrain.train.trainer import train

    original = poison(steps, ranks, factor)
    try:
        return train(build_config(args)).losses
    finally:
        BilevelStep.__call__ = original
        from parallel.megatron import parallel_state

        parallel_state.destroy_model_parallel()


def _check_skipped(out, bad_step):
    """Step ``bad_step`` (0-based) was skipped: the checkpoint after it equals the one before, bit for bit,
    and the schedule did not advance (the next step's learning rate is the skipped step's)."""
    before, after = (_everything(out / "checkpoints" / f"step_{n:06d}") for n in (bad_step, bad_step + 1))
    assert sorted(before) == sorted(after) and any(k.endswith("exp_avg") for k in before)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    records = {r["step"]: r for r in read_metrics(out)}
    assert "skipped_update" in records[bad_step + 1] and "non-finite" in records[bad_step + 1]["skipped_update"]
    assert records[bad_step + 2]["lr"] == records[bad_step + 1]["lr"] != records[bad_step]["lr"]
    assert all("skipped_update" not in r for s, r in records.items() if s != bad_step + 1)
    later = _everything(out / "checkpoints" / f"step_{bad_step + 2:06d}")
    assert any(not torch.equal(after[k], later[k]) for k in after), "the next good step must train again"


def test_a_nan_gradient_skips_the_update_in_one_process(topology, tmp_path, base):
    out = tmp_path / "run"
    _train_poisoned(0, 1, [*base, "--train.steps", "5", "--train.out_dir", str(out)], {2}, {0})
    _check_skipped(out, 2)
    assert json.loads((out / "DONE").read_text())["step"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["0", "1"])
def test_a_nan_gradient_on_one_rank_skips_the_update_on_every_rank(tmp_path, zero, base):
    """ZeRO 0: the guard's all-reduce decides; ZeRO 1: DeepSpeed's own norm check skips, the guard reports it."""
    out = tmp_path / "run"
    args = [*base, "--train.steps", "5", "--train.out_dir", str(out), "--parallel.zero_stage", zero]
    losses = run_ranks(_train_poisoned, 2, args, {2}, {1})
    assert losses[0][:2] == losses[1][:2]
    _check_skipped(out, 2)


def test_bad_steps_in_a_row_roll_back_and_the_budget_stops_the_run(topology, tmp_path, base):
    from pretrain.train.resilience import TrainingStopped

    out = tmp_path / "run"
    args = [*base, "--train.steps", "7", "--train.out_dir", str(out), "--guard.max_bad_steps_in_row", "2"]
    _train_poisoned(0, 1, args, {3, 4}, {0})
    records = {r["step"]: r for r in read_metrics(out)}
    assert records[5]["rolled_back_to"] == "step_000004" and "skipped_update" in records[4]
    assert records[6]["lr"] == records[4]["lr"]  # steps 4 and 5 were skipped: the schedule waited
    assert "skipped_update" not in records[6] and json.loads((out / "DONE").read_text())["step"] == 7

    budget = tmp_path / "budget"
    with pytest.raises(TrainingStopped, match="max_bad_steps 1"):
        _train_poisoned(0, 1, [*base, "--train.steps", "7", "--train.out_dir", str(budget),
                               "--guard.max_bad_steps", "1"], {1, 3}, {0})
    assert not (budget / "DONE").exists()


@pytest.mark.slow
def test_a_loss_spike_is_skipped(topology, tmp_path, base):
    out = tmp_path / "run"
    args = [*base, "--train.steps", "24", "--train.out_dir", str(out), "--guard.spike_zscore", "6",
            "--guard.spike_window", "20", "--checkpoint.every", "0"]
    _train_poisoned(0, 1, args, {22}, {0}, factor=100.0)
    records = {r["step"]: r for r in read_metrics(out)}
    assert [s for s, r in records.items() if "skipped_update" in r] == [23]
    assert "loss spike" in records[23]["skipped_update"] and records[24]["lr"] == records[23]["lr"]


BLOCKING = """
import time, sys
from launch.config_cli import build_config
from pretrain.memdlm.bilevel import BilevelStep
from pretrain.train.trainer import train

original = BilevelStep.__call__
def call(self, batch, normalizer, step, **kwargs):
    if step == 2:
        time.sleep(600)  # a rank that never finishes its step
    return original(self, batch, normalizer, step, **kwargs)
BilevelStep.__call__ = call
train(build_config(sys.argv[1:]))
"""


@pytest.mark.slow
def test_the_watchdog_dumps_the_stacks_and_exits_when_a_step_hangs(tmp_path, base):
    args = [*base, "--train.steps", "4", "--train.out_dir", str(tmp_path / "run"), "--guard.step_timeout_s", "8"]
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(BLOCKING), *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "Timeout" in result.stderr and "in call" in result.stderr and "time.sleep" not in result.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_000002").is_dir()  # the steps before the hang were kept
    assert time.monotonic() - started < 120
