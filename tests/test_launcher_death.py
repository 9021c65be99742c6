"""The launcher dies under its ranks (a file of its own so that pytest-xdist runs it beside the other
fault tests)."""

import os
import signal

import pytest

from tests.test_faults import TP2, agent_and_ranks, assert_gone, kill_everything, start, steps_logged, wait_for


@pytest.mark.slow  # test_faults keeps the torchrun agent's death in the default tier
def test_ranks_stop_when_the_launcher_dies(tmp_path):
    """``kill -9`` of ``memdlm-pretrain --nproc-per-node``: its torchrun agent gets SIGTERM and stops
    the ranks (they would otherwise go on training and writing checkpoints on their own)."""
    out = tmp_path / "run"
    run = start([*TP2, "--train.steps", "1000"], out, tmp_path / "cache")
    wait_for(lambda: steps_logged(out) >= 1, run)
    _, ranks = agent_and_ranks(run)
    os.kill(run.pid, signal.SIGKILL)
    assert_gone(ranks, "launcher killed")
    kill_everything(run)
