"""Ctrl-C as a terminal sends it: SIGINT to the whole process group of ``memdlm-pretrain`` (its loader
workers included, and under ``--nproc-per-node`` the torchrun agent). The run saves the last completed step,
whatever ``--checkpoint.every`` is, exits 130 and resumes from there; a second Ctrl-C that cuts a save short
leaves the previous checkpoint intact."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, read_metrics
from tests.helpers.layouts import LAYOUT_OPTIONS
from tests.helpers.processes import kill_everything, steps_logged


def _start(args, nproc: int | None = None) -> subprocess.Popen:
    """``memdlm-pretrain ARGS`` as the leader of a new process group, as a shell starts a job."""
    launch = ["--nproc-per-node", str(nproc)] if nproc else []
    return subprocess.Popen([sys.executable, "-m", "launch.pretrain_cli", *launch, *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _interrupt_after(run: subprocess.Popen, out, steps: int, timeout: float = 180) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while steps_logged(out) < steps:
        if run.poll() is not None or time.monotonic() > deadline:
            kill_everything(run)
            raise AssertionError(f"the run ended or stalled before step {steps}:\n{run.stdout.read()[-3000:]}")
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    try:
        output, _ = run.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        kill_everything(run)
        raise
    return run.returncode, output


def _checkpoints(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def test_ctrl_c_saves_the_last_completed_step_and_the_rerun_resumes(tmp_path, tiny):
    out = tmp_path / "run"
    args = [*tiny({"data.num_workers": 1}), "--train.steps", "400", "--train.out_dir", str(out)]
    code, output = _interrupt_after(_start(args), out, 3)
    assert code == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    saved = _checkpoints(out)
    done = len(read_metrics(out))
    assert saved == [f"step_{done:06d}"], (saved, done)  # the step in flight finished and was saved
    assert "interrupt: finishing this step" in output and "stopped early at step" in output
    again = subprocess.run([sys.executable, "-m", "launch.pretrain_cli", *args[:-4], "--train.steps", str(done + 2),
                            "--train.out_dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / saved[0]}" in again.stdout
    assert [m["step"] for m in read_metrics(out)] == list(range(1, done + 3))


@pytest.mark.fast
def test_a_second_ctrl_c_during_a_save_leaves_the_previous_checkpoint(topology, tmp_path, monkeypatch):
    """The second Ctrl-C raises KeyboardInterrupt wherever the save is; it is simulated inside the DCP write."""
    import torch.distributed.checkpoint as dcp

    from launch.config_cli import build_config
    from launch.preemption import stop_on_signals
    from parallel.checkpoint.manifest import check_checkpoint
    from pretrain.train.trainer import train
    from tests.helpers import tiny_options
    from tests.helpers.data import prepare_small_corpus

    data = prepare_small_corpus(tmp_path / "data")
    out = tmp_path / "run"
    args = [*tiny_options(), "--data.path", str(data), "--train.out_dir", str(out), "--checkpoint.every", "2"]
    train(build_config([*args, "--train.steps", "2"]))
    assert _checkpoints(out) == ["step_000002"]

    with stop_on_signals(announce=False) as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag() and flag.interrupted
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)

    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt  # the second Ctrl-C, arriving while the tensors are written

    monkeypatch.setattr(dcp, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        train(build_config([*args, "--train.steps", "4"]))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert check_checkpoint(out / "checkpoints" / "step_000002") is None
    assert _checkpoints(out) == ["step_000002"], "the cut save stays in its staging folder"


@pytest.mark.slow
def test_ctrl_c_under_nproc_per_node_saves_and_resumes(tmp_path, prepared_corpus):
    out = tmp_path / "run"
    args = [*LAYOUT_OPTIONS, "--parallel.tensor_parallel_size", "2", "--train.micro_batch_size", "4",
            "--train.steps", "400", "--train.out_dir", str(out), "--data.path", str(prepared_corpus())]
    code, output = _interrupt_after(_start(args, nproc=2), out, 3)
    assert code == 130, output[-3000:]
    saved = _checkpoints(out)
    done = len(read_metrics(out))
    assert saved == [f"step_{done:06d}"], (saved, done, output[-3000:])
    assert "interrupted; the newest checkpoint is" in output
    again = subprocess.run([sys.executable, "-m", "launch.pretrain_cli", "--nproc-per-node", "2", *args[:-6],
                            "--train.steps", str(done + 2), "--train.out_dir", str(out), "--data.path",
                            str(prepared_corpus())], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out)] == list(range(1, done + 3))
