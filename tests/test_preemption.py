"""Stop on a signal: the flag, and the trainer saving at the step it stopped and resuming from there."""

import os
import signal

import pytest

from launch.config_cli import build_config
from launch.preemption import stop_on_signals


@pytest.mark.fast
def test_a_signal_sets_the_flag_and_the_handlers_come_back():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    with stop_on_signals() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop() and stop.signal_name == "SIGUSR1"
        # A second signal (torchrun may forward one twice) is only counted: a save in progress goes on.
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGUSR1" and stop.count == 2
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_stop_request_saves_that_step_and_the_rerun_continues_exactly(topology, tmp_path, tiny):
    from pretrain.train.trainer import train

    common = [*tiny(), "--train.steps", "3"]
    straight = train(build_config([*common, "--train.out_dir", str(tmp_path / "straight")]))

    calls = []

    def stop_after_first_step():
        calls.append(1)
        return len(calls) >= 1

    out = tmp_path / "stopped"
    stopped = train(build_config([*common, "--train.out_dir", str(out)]), stop_after_first_step)
    assert stopped.stopped_early and stopped.steps_done == 1
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000001"
    resumed = train(build_config([*common, "--train.out_dir", str(out)]))
    assert not resumed.stopped_early and resumed.steps_done == 3
    assert stopped.losses + resumed.losses == straight.losses
