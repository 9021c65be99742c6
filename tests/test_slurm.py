"""The Slurm launcher on a real Slurm: two emulated nodes on this machine (``scripts/slurm_cluster.sh up``,
which ``.ci/run`` starts). Each test submits the sbatch script that ``memdlm-launch slurm`` writes and
compares the run's losses with one process training the same global batch.

Faults injected: USR1 to the batch shell (preemption), SIGTERM to one worker, the loss of one node's
torchrun agent and worker in an elastic run. Skipped, with the reason, where no Slurm cluster answers, unless
``MEMDLM_REQUIRE_SLURM=1`` (CI sets it): then a cluster that is not up fails every test.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import tiny_options

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

TINY = tiny_options({"memory.layer_fraction": 0.5, "eval.every": 0, "train.device": "cpu"})


def _slurm_up() -> str | None:
    if shutil.which("sbatch") is None:
        return "Slurm is not installed (scripts/slurm_cluster.sh up installs and starts it, as root)"
    try:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%N=%t"], capture_output=True, text=True, timeout=20)
    except subprocess.SubprocessError:
        return "sinfo does not answer"
    idle = [line for line in states.stdout.split() if line.endswith(("=idle", "=mix", "=alloc"))]
    if states.returncode != 0 or len(set(idle)) < 2:
        return f"no two-node Slurm cluster is up (sinfo: {states.stdout.strip() or states.stderr.strip()}); " \
               "start one with scripts/slurm_cluster.sh up"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    reason = _slurm_up()
    if reason and os.environ.get("MEMDLM_REQUIRE_SLURM") == "1":
        pytest.fail(f"MEMDLM_REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)


@pytest.fixture
def data(prepared_corpus):
    return prepared_corpus()


def _both_idle() -> bool:
    states = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20).stdout
    return states.split().count("idle") >= 2


def _submit(out: Path, data: Path, steps: int, *launch: str, extra=()) -> tuple[str, list[str]]:
    _wait_for(_both_idle, 60, "both nodes to be idle (an elastic job takes what is free)")
    args = [*TINY, "--train.steps", str(steps), "--train.out_dir", str(out), "--data.path", str(data), *extra]
    result = subprocess.run([sys.executable, "-m", "launch.launch_cli", "slurm", "--nodes", "2", "--cpus-per-task",
                             "1", *launch, "--submit", "--", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1].split()[2].rstrip(";"), args


def _job_state(job: str) -> tuple[str, int]:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    state = text.split("JobState=")[1].split()[0] if "JobState=" in text else "UNKNOWN"
    restarts = int(text.split("Restarts=")[1].split()[0]) if "Restarts=" in text else 0
    return state, restarts


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _finished(job: str, out: Path, timeout: float = 240) -> int:
    def done():
        state, restarts = _job_state(job)
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            raise AssertionError(f"job {job} ended {state}: " + _logs(out))
        return (restarts,) if state == "COMPLETED" else None
    try:
        return _wait_for(done, timeout, f"job {job} to complete")[0]
    except AssertionError:
        subprocess.run(["scancel", job], timeout=30)
        raise AssertionError(f"job {job} did not complete: " + _logs(out)) from None


def _logs(out: Path, tail: int = 2500) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text()[-tail:] for p in sorted((out / "slurm").glob("*.log")))


def _losses(out: Path) -> dict[int, float]:
    """step -> loss; a resumed run's steps replace the stopped run's (the last line of a step wins)."""
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses[record["step"]] = record["loss"]
    return losses


def _reference(tmp_path, args) -> list[float]:
    """One process, the same global batch (its own output directory)."""
    out = tmp_path / "reference"
    command = [sys.executable, "-m", "launch.pretrain_cli", *args, "--train.out_dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    losses = _losses(out)
    return [losses[s] for s in sorted(losses)]


def _assert_same(losses: dict[int, float], reference: list[float]):
    assert sorted(losses) == list(range(1, len(reference) + 1)), sorted(losses)
    for step, expected in enumerate(reference, 1):
        assert abs(losses[step] - expected) / abs(expected) < 1e-5, (step, losses[step], expected)


def _workers(out: Path) -> list[tuple[int, str]]:
    """(pid, command line) of this run's torchrun agents and ranks."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "launch.pretrain_cli" in command and str(out) in command and not command.startswith("srun"):
                found.append((int(proc.name), command))
    return found


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_submit_trains_across_two_nodes_like_one_process(tmp_path, data):
    out = tmp_path / "run"
    job, _ = _submit(out, data, 6)
    assert _finished(job, out) == 0
    assert "2 ranks = tensor 1 x pipeline 1 x data 2" in _logs(out, tail=10**7)
    assert (out / "DONE").is_file()
    _assert_same(_losses(out), _reference(tmp_path, [*TINY, "--train.steps", "6", "--data.path", str(data)]))


@pytest.mark.parametrize("fault", ["usr1-to-batch-shell", "sigterm-to-one-worker"])
def test_preemption_saves_requeues_and_the_run_equals_an_uninterrupted_one(tmp_path, fault, data):
    out = tmp_path / "run"
    steps = 80  # long enough that the signal arrives mid-run on a fast machine too
    job, _ = _submit(out, data, steps)
    _wait_for(lambda: _steps_logged(out) >= 3, 180, "the first steps")
    if fault == "usr1-to-batch-shell":
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    else:
        ranks = [pid for pid, command in _workers(out) if "torch.distributed.run" not in command]
        assert len(ranks) == 2, _workers(out)
        os.kill(ranks[-1], signal.SIGTERM)
    restarts = _finished(job, out, timeout=300)
    logs = _logs(out, tail=10**7)
    assert restarts == 1 and "requeueing" in logs, logs
    assert "stop requested: saving a checkpoint" in logs and "resumed from" in logs
    assert (out / "DONE").is_file() and not (out / "REQUEUE").exists()
    _assert_same(_losses(out), _reference(tmp_path, [*TINY, "--train.steps", str(steps), "--data.path", str(data)]))


def test_elastic_run_loses_a_node_and_finishes_on_the_other(tmp_path, data):
    out = tmp_path / "run"
    steps = 40
    job, _ = _submit(out, data, steps, "--min-nodes", "1", "--max-restarts", "2",
                     extra=("--checkpoint.every", "2"))
    _wait_for(lambda: _steps_logged(out) >= 4, 180, "the first steps")
    agents = [pid for pid, command in _workers(out) if "torch.distributed.run" in command]
    assert len(agents) == 2, _workers(out)
    # The agent that hosts the rendezvous store must survive (losing it ends the job, as documented).
    port = 29500 + int(job) % 20000
    listening = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    victim = next(pid for pid in agents if f"pid={pid}," not in listening)
    lost_at = _steps_logged(out)
    os.kill(victim, signal.SIGKILL)  # the node's agent; its rank dies with it (parent-death signal)
    _finished(job, out, timeout=300)
    logs = _logs(out, tail=10**7)
    assert "1 ranks = tensor 1 x pipeline 1 x data 1" in logs and "resumed from" in logs, logs
    assert (out / "DONE").is_file()
    losses = _losses(out)
    reference = _reference(tmp_path, [*TINY, "--train.steps", str(steps), "--data.path", str(data),
                                      "--checkpoint.every", "2"])
    _assert_same(losses, reference)
    assert lost_at < steps


def test_srun_python_one_task_per_rank(tmp_path, data):
    """``srun python -m launch.pretrain_cli``: rank and world from SLURM_*, no torchrun."""
    out = tmp_path / "run"
    args = [*TINY, "--train.steps", "6", "--train.out_dir", str(out), "--data.path", str(data)]
    _wait_for(_both_idle, 60, "both nodes to be idle")
    out.mkdir(parents=True)
    command = " ".join([sys.executable, "-m", "launch.pretrain_cli", *args])
    result = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                             f"--output={out}/slurm-%j.log", f"--chdir={os.getcwd()}",
                             f"--wrap=OMP_NUM_THREADS=1 srun {command}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    (out / "slurm").mkdir(exist_ok=True)
    _finished(job, out)
    log = next(out.glob("slurm-*.log")).read_text()
    assert "2 ranks = tensor 1 x pipeline 1 x data 2" in log, log[-3000:]
    _assert_same(_losses(out), _reference(tmp_path, [*TINY, "--train.steps", "6", "--data.path", str(data)]))


def test_slurm_prepare_parts_on_both_nodes_then_merge_equals_one_preparation(tmp_path):
    """``memdlm-launch slurm-prepare --parts 3 --submit``: an array of three parts (spread over the two nodes),
    then the merge job after them; the dataset is the one-process preparation's, shard for shard."""
    from data_pipeline.prepare import PrepareOptions, prepare_dataset
    from tests.helpers import BUNDLED_CORPUS

    folder = tmp_path / "in"
    folder.mkdir()
    text = BUNDLED_CORPUS.read_text()
    for i in range(5):
        (folder / f"{i}.txt").write_text(text[i * 40_000:(i + 1) * 40_000])
    common = dict(input=str(folder), seq_len=32, vocab_size=512, samples_per_shard=50, val_fraction=0.05,
                  progress=False, num_workers=0)
    prepare_dataset(PrepareOptions(output=str(tmp_path / "tok"), tokenizer_only=True, **common))
    tokenizer = str(tmp_path / "tok" / "tokenizer.json")
    single = prepare_dataset(PrepareOptions(output=str(tmp_path / "single"), tokenizer=tokenizer, **common))
    out = tmp_path / "parts"
    _wait_for(_both_idle, 60, "both nodes to be idle")
    result = subprocess.run(
        [sys.executable, "-m", "launch.launch_cli", "slurm-prepare", "--parts", "3", "--cpus-per-task", "1",
         "--submit", "--", "--input", str(folder), "--output", str(out), "--tokenizer", tokenizer, "--seq-len", "32",
         "--vocab-size", "512", "--samples-per-shard", "50", "--val-fraction", "0.05", "--num-workers", "0"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    merge_job = result.stdout.strip().splitlines()[-1].split("merge job ")[1].split(";")[0]
    _finished(merge_job, out, timeout=300)
    merged = json.loads((out / "manifest.json").read_text())
    assert {k: [s["sha256"] for s in v["shards"]] for k, v in merged["formats"].items()} == \
        {k: [s["sha256"] for s in v["shards"]] for k, v in single["formats"].items()}
    assert merged["validation"]["sha256"] == single["validation"]["sha256"]
    logs = sorted((out / "slurm").glob("prepare-*-part-*.log"))
    assert len(logs) == 3 and all("part " in p.read_text() for p in logs)
