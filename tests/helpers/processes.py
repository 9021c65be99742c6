"""Real runs as a user starts them (``memdlm-pretrain --nproc-per-node 2`` in a session of its own), and
what the fault tests do to them: wait for a condition, find the agent and the ranks, kill, check they died."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.helpers import ROOT


def start(args, out_dir: Path, data: Path) -> subprocess.Popen:
    """``memdlm-pretrain --nproc-per-node 2 ARGS`` on the prepared dataset ``data``, in its own session."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "launch.pretrain_cli", "--nproc-per-node", "2", *args,
               "--train.out_dir", str(out_dir), "--data.path", str(data)]
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
