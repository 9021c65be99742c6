"""Real faults on real processes: kill -9 of a whole 2-rank run in the middle of a save, a torchrun
agent and a launcher that die under their ranks, a second run on a live run's directory, and reruns
of the same command that must continue as if nothing happened."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import ROOT
from tests.test_cli import read_metrics
from tests.test_parallel_layouts import TINY

TP2 = [*TINY, "--train.steps", "6", "--parallel.tensor_parallel_size", "2", "--train.micro_batch_size", "4"]


def start(args, out_dir: Path, cache_dir: Path) -> subprocess.Popen:
    """``memdlm-pretrain --nproc-per-node 2`` in its own session, as a user would start it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "launch.pretrain_cli", "--nproc-per-node", "2", *args,
               "--train.out_dir", str(out_dir), "--data.cache_dir", str(cache_dir)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0, tick: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the condition held:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the run")
        time.sleep(tick)


def family(process: subprocess.Popen) -> list[psutil.Process]:
    """The launcher, torchrun's agent and the ranks (each rank sits in a session of its own)."""
    root = psutil.Process(process.pid)
    return [root, *root.children(recursive=True)]


def kill_everything(process: subprocess.Popen) -> None:
    members = family(process)
    for member in members:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(members, timeout=30)
    process.wait()


def steps_logged(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_kill_9_agent_death_and_reruns_give_the_uninterrupted_losses(tmp_path, capsys):
    """One 6-step run on 2 ranks (tensor parallel), checkpointing every step, hit twice:

    1. every process killed with SIGKILL while step 2 is being saved;
    2. rerun; while it lives a second run on the directory is refused; then torchrun's agent is
       killed with SIGKILL: the ranks must follow within seconds (no orphan keeps training);
    3. rerun to the end: the losses are the uninterrupted run's, step for step.
    """
    from launch.config_cli import build_config
    from launch.pretrain_cli import main
    from pretrain.trainer import train

    cache = tmp_path / "cache"
    reference = train(build_config([*TINY, "--train.steps", "6", "--train.micro_batch_size", "8",
                                    "--train.out_dir", str(tmp_path / "reference"), "--data.cache_dir", str(cache)]))
    out = tmp_path / "run"
    args = [*TP2, "--checkpoint.every", "1"]
    checkpoints = out / "checkpoints"

    # 1. Killed while saving step 2.
    run = start(args, out, cache)
    wait_for(lambda: (checkpoints / ".staging_step_000002").exists(), run)
    kill_everything(run)
    mid_save = (checkpoints / ".staging_step_000002").exists()
    assert mid_save or (checkpoints / "step_000002" / "manifest.json").exists()

    # 2. Rerun; the directory is held; the agent dies.
    run = start(args, out, cache)
    wait_for(lambda: steps_logged(out) >= 3, run)
    second = [*args, "--parallel.tensor_parallel_size", "1", "--train.out_dir", str(out), "--data.cache_dir", str(cache)]
    assert main(second) == 2
    assert "is in use by a live run" in capsys.readouterr().err
    agent, ranks = agent_and_ranks(run)
    agent.send_signal(signal.SIGKILL)
    assert_gone(ranks, "agent killed")
    kill_everything(run)
    output = run.stdout.read()
    if mid_save:  # the unfinished save was passed over, with a message
        assert "ignoring .staging_step_000002: a save that did not finish" in output, output[-3000:]

    # 3. Rerun to the end.
    run = start(args, out, cache)
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output[-3000:]
    assert "resumed from" in output and "tensor 2 x pipeline 1 x data 1" in output
    assert output.count("Summary:") == 1, "rank 0 alone reports"
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    losses = [m["loss"] for m in read_metrics(out)]
    for ours, theirs in zip(losses, reference.losses):
        assert abs(ours - theirs) / abs(theirs) < 1e-5, (losses, reference.losses)


def agent_and_ranks(run: subprocess.Popen):
    members = family(run)
    agent = next(m for m in members if "torch.distributed.run" in " ".join(m.cmdline()))
    ranks = agent.children()
    assert len(ranks) == 2 and all("launch.pretrain_cli" in " ".join(r.cmdline()) for r in ranks)
    return agent, ranks


def assert_gone(ranks, what: str, timeout: float = 20.0) -> None:
    started = time.monotonic()
    _, alive = psutil.wait_procs(ranks, timeout=timeout)
    assert not alive, f"{what}: ranks still running after {timeout} s"
    print(f"{what}: both ranks gone after {time.monotonic() - started:.1f} s")

