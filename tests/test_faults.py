"""Real faults on real processes: kill -9 of a whole 2-rank run in the middle of a save, a torchrun
agent and a launcher that die under their ranks, a second run on a live run's directory, and reruns
of the same command that must continue as if nothing happened."""

import signal

import pytest

from tests.helpers import read_metrics
from tests.helpers.layouts import LAYOUT_OPTIONS
from tests.helpers.processes import agent_and_ranks, assert_gone, kill_everything, start, steps_logged, wait_for

TP2 = [*LAYOUT_OPTIONS, "--train.steps", "6", "--parallel.tensor_parallel_size", "2", "--train.micro_batch_size", "4"]


@pytest.mark.slow  # about a minute on two cores; test_launcher_death keeps a launcher's death in the default tier
def test_kill_9_agent_death_and_reruns_give_the_uninterrupted_losses(tmp_path, capsys, prepared_corpus):
    """One 6-step run on 2 ranks (tensor parallel), checkpointing every step, hit twice:

    1. every process killed with SIGKILL while step 2 is being saved;
    2. rerun; while it lives a second run on the directory is refused; then torchrun's agent is
       killed with SIGKILL: the ranks must follow within seconds (no orphan keeps training);
    3. rerun to the end: the losses are the uninterrupted run's, step for step.
    """
    from launch.config_cli import build_config
    from launch.pretrain_cli import main
    from pretrain.train.trainer import train

    data = prepared_corpus()
    reference = train(build_config([*LAYOUT_OPTIONS, "--train.steps", "6", "--train.micro_batch_size", "8",
                                    "--train.out_dir", str(tmp_path / "reference"), "--data.path", str(data)]))
    out = tmp_path / "run"
    args = [*TP2, "--checkpoint.every", "1"]
    checkpoints = out / "checkpoints"

    # 1. Killed while saving step 2.
    run = start(args, out, data)
    wait_for(lambda: (checkpoints / ".staging_step_000002").exists(), run)
    kill_everything(run)
    mid_save = (checkpoints / ".staging_step_000002").exists()
    assert mid_save or (checkpoints / "step_000002" / "manifest.json").exists()

    # 2. Rerun; the directory is held; the agent dies.
    run = start(args, out, data)
    wait_for(lambda: steps_logged(out) >= 3, run)
    agent, ranks = agent_and_ranks(run)
    for rank in ranks:  # paused (SIGSTOP), so that a loaded machine cannot let the run finish before the kill
        rank.suspend()
    second = [*args, "--parallel.tensor_parallel_size", "1", "--train.out_dir", str(out), "--data.path", str(data)]
    assert main(second) == 2
    assert "is in use by a live run" in capsys.readouterr().err
    agent.send_signal(signal.SIGKILL)
    for rank in ranks:
        rank.resume()
    assert_gone(ranks, "agent killed")
    kill_everything(run)
    output = run.stdout.read()
    if mid_save:  # the unfinished save was passed over, with a message
        assert "ignoring .staging_step_000002: a save that did not finish" in output, output[-3000:]

    # 3. Rerun to the end.
    run = start(args, out, data)
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output[-3000:]
    assert "resumed from" in output and "tensor 2 x pipeline 1 x data 1" in output
    assert output.count("Summary:") == 1, "rank 0 alone reports"
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    losses = [m["loss"] for m in read_metrics(out)]
    for ours, theirs in zip(losses, reference.losses):
        assert abs(ours - theirs) / abs(theirs) < 1e-5, (losses, reference.losses)
