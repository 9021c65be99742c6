"""End-to-end runs of the real ``memdlm-pretrain`` entry point in subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.config_cli import _field_table
from tests.conftest import ROOT
from tests.wandb_reader import history_rows

TINY = [
    "--model.vocab_size", "512", "--model.hidden_size", "32", "--model.num_layers", "2",
    "--model.num_heads", "2", "--model.ffn_hidden_size", "64", "--model.seq_len", "32",
    "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--data.num_workers", "1",
    "--logging.progress_bar", "false", "--train.num_threads", "1",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run_cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "launch.pretrain_cli", *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def wandb_history(out_dir: Path) -> list[dict]:
    (run_file,) = (out_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return history_rows(run_file)


def test_short_run_writes_metrics_checkpoint_and_wandb(tmp_path, cache_dir):
    out = tmp_path / "run"
    result = run_cli(*TINY, "--train.steps", "3", "--train.out_dir", str(out), "--data.cache_dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert "Summary:" in result.stdout and "loss went from" in result.stdout

    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert {"step", "loss", "inner_losses", "tokens_per_s"} <= set(m)
        assert len(m["inner_losses"]) == 2 and all(v > 0 for v in m["inner_losses"])
        assert m["loss"] > 0 and m["tokens_per_s"] > 0

    history = wandb_history(out)
    assert [row["loss"] for row in history] == pytest.approx([m["loss"] for m in metrics], rel=1e-12)
    assert all("inner_loss/1" in row for row in history)

    checkpoint = out / "checkpoints" / "step_000003"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model"]["hidden_size"] == 32 and config["memory"]["lora_rank"] == 32
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "model.safetensors"))
    assert weights["embedding.weight"].shape == (512, 32)
    assert not any("fast" in name or "lora" in name for name in weights), "fast weights are never saved"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000003"


def test_memory_off_logs_no_inner_losses(tmp_path, cache_dir):
    out = tmp_path / "run"
    result = run_cli(*TINY, "--train.steps", "2", "--memory.enabled", "false", "--logging.wandb", "false",
                     "--train.out_dir", str(out), "--data.cache_dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert [m["inner_losses"] for m in read_metrics(out)] == [[], []]
    assert not (out / "wandb").exists()


def test_resume_continues_exactly(tmp_path, cache_dir):
    """Stop after 2 steps, resume to 4: the same losses as one uninterrupted 4-step run."""
    common = [*TINY, "--logging.wandb", "false", "--data.cache_dir", str(cache_dir)]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(*common, "--train.steps", "4", "--train.out_dir", str(straight)).returncode == 0
    assert run_cli(*common, "--train.steps", "2", "--train.out_dir", str(split)).returncode == 0
    resumed = run_cli(*common, "--train.steps", "4", "--train.out_dir", str(split))
    assert resumed.returncode == 0, resumed.stderr
    assert [m["loss"] for m in read_metrics(split)] == [m["loss"] for m in read_metrics(straight)]
    a = torch.load(straight / "checkpoints" / "step_000004" / "trainer_state.pt", weights_only=False)
    b = torch.load(split / "checkpoints" / "step_000004" / "trainer_state.pt", weights_only=False)
    assert a["step"] == b["step"] == 4


def test_help_lists_every_field():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in _field_table():
        assert f"--{option} " in result.stdout, option
    for required in ("--train.steps", "--train.seed", "--train.out_dir", "--memory.enabled",
                     "--train.global_batch_size", "--train.micro_batch_size"):
        assert required in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.stepz", "3"], "unknown option --train.stepz; did you mean --train.steps?"),
        (["--train.steps", "abc"], "--train.steps expects an integer, got 'abc'"),
        (["--memory.enabled", "maybe"], "--memory.enabled expects true or false"),
        (["--train.micro_batch_size", "3"], "--train.micro_batch_size: 3 does not divide --train.global_batch_size"),
        (["--model.seq_len", "1"], "--model.seq_len: a sequence needs at least 2 tokens"),
        (["--model.num_heads", "3"], "--model.num_heads: 3 heads do not divide hidden_size"),
        (["--memory.target_modules", "gate,mlp"], "--memory.target_modules: unknown module(s) ['mlp']"),
        (["--data.path", "/nonexistent/corpus.txt"], "--data.path: /nonexistent/corpus.txt does not exist"),
    ],
)
def test_bad_input_fails_with_a_message(tmp_path, args, message):
    result = run_cli(*args, "--train.out_dir", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_or_short_corpus_fails_with_a_message(tmp_path, cache_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_cli("--data.path", str(empty), "--train.out_dir", str(tmp_path / "a"))
    assert result.returncode == 2 and f"--data.path: {empty} is empty" in result.stderr
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.\n\nThat is the question.\n")
    result = run_cli(*TINY, "--model.seq_len", "512", "--data.path", str(short), "--train.out_dir",
                     str(tmp_path / "b"), "--data.cache_dir", str(cache_dir))
    assert result.returncode == 2
    assert "fewer samples than one micro-batch per rank" in result.stderr
    assert "Traceback" not in result.stderr


def test_prepared_dataset_with_another_sequence_length_is_refused(tmp_path):
    data = tmp_path / "data"
    prepared = subprocess.run(
        [sys.executable, "-m", "launch.prepare_cli", "--input", str(ROOT / "data_pipeline" / "corpus" /
         "tinyshakespeare.txt"), "--output", str(data), "--seq-len", "64", "--vocab-size", "512", "--no-progress",
         "--format", "mds"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr
    result = run_cli(*TINY, "--data.path", str(data), "--train.out_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "packed into sequences of 64 tokens but --model.seq_len is 32; use --model.seq_len 64" in result.stderr
    trained = run_cli(*TINY, "--model.seq_len", "64", "--data.path", str(data), "--data.format", "mds",
                      "--train.steps", "2", "--logging.wandb", "false", "--train.out_dir", str(tmp_path / "ok"))
    assert trained.returncode == 0, trained.stderr
    assert len(read_metrics(tmp_path / "ok")) == 2
    missing = run_cli(*TINY, "--model.seq_len", "64", "--data.path", str(data), "--data.format", "webdataset",
                      "--train.out_dir", str(tmp_path / "wds"))
    assert missing.returncode == 2 and "was not prepared in that format (it has: mds)" in missing.stderr


def test_nproc_per_node_launches_data_parallel_ranks(tmp_path, cache_dir):
    out = tmp_path / "dp"
    args = [*TINY, "--train.steps", "2", "--parallel.zero_stage", "1", "--logging.wandb", "false",
            "--train.out_dir", str(out), "--data.cache_dir", str(cache_dir)]
    result = run_cli("--nproc-per-node", "2", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Summary:") == 1, "rank 0 alone reports"
    assert "data 2 (ZeRO 1)" in result.stdout
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    resumed = run_cli("--nproc-per-node", "2", *args, "--train.steps", "3")
    assert resumed.returncode == 0, "the same layout resumes"
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    other = run_cli(*TINY, "--train.steps", "4", "--logging.wandb", "false", "--train.out_dir", str(out),
                    "--data.cache_dir", str(cache_dir))
    assert other.returncode == 2
    assert "resume with the same --parallel.* options" in other.stderr


def test_trains_on_a_prepared_webdataset_directory(tmp_path, cache_dir):
    data = tmp_path / "wds"
    prepared = subprocess.run(
        [sys.executable, "-m", "launch.prepare_cli", "--input", str(ROOT / "data_pipeline" / "corpus" /
         "tinyshakespeare.txt"), "--output", str(data), "--seq-len", "32", "--vocab-size", "512", "--no-progress",
         "--format", "webdataset", "--samples-per-shard", "2000"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr
    out = tmp_path / "run"
    result = run_cli(*TINY, "--data.path", str(data), "--data.format", "webdataset", "--train.steps", "2",
                     "--logging.wandb", "false", "--train.out_dir", str(out))
    assert result.returncode == 0, result.stderr
    assert [m["skipped_samples"] for m in read_metrics(out)] == [0, 0]
