"""The launcher dies under its ranks (a file of its own so that pytest-xdist runs it beside the other
fault tests)."""

import os
import signal

from tests.helpers.layouts import LAYOUT_OPTIONS
from tests.helpers.processes import agent_and_ranks, assert_gone, kill_everything, start, steps_logged, wait_for

TP2 = [*LAYOUT_OPTIONS, "--parallel.tensor_parallel_size", "2", "--train.micro_batch_size", "4"]


# In the default tier: the launcher's death under its ranks (test_faults, slow, kills the torchrun agent
# itself, mid-save, and checks that reruns give the uninterrupted losses).
def test_ranks_stop_when_the_launcher_dies(tmp_path, prepared_corpus):
    """``kill -9`` of ``memdlm-pretrain --nproc-per-node``: its torchrun agent gets SIGTERM and stops
    the ranks (they would otherwise go on training and writing checkpoints on their own)."""
    out = tmp_path / "run"
    run = start([*TP2, "--train.steps", "1000"], out, prepared_corpus())
    wait_for(lambda: steps_logged(out) >= 1, run)
    _, ranks = agent_and_ranks(run)
    os.kill(run.pid, signal.SIGKILL)
    assert_gone(ranks, "launcher killed")
    kill_everything(run)
