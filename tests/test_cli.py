"""The ``memdlm-pretrain`` entry point: one real run in a subprocess (console script, wandb, summary),
one real torchrun launch, and the rest through ``launch.pretrain_cli.main`` in this process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config_cli import _field_table, build_config
from launch.pretrain_cli import main
from tests.helpers import BUNDLED_CORPUS, ROOT, read_metrics, tiny_options
from tests.helpers.wandb_reader import history_rows


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run_cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "launch.pretrain_cli", *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


def wandb_history(out_dir: Path) -> list[dict]:
    (run_file,) = (out_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return history_rows(run_file)


def test_short_run_writes_metrics_checkpoint_and_wandb(tmp_path, cache_dir):
    """The bundled corpus, prepared on first use, a loader worker and an offline wandb run."""
    out = tmp_path / "run"
    options = tiny_options({"data.num_workers": 1, "logging.wandb": True})
    result = run_cli(*options, "--train.steps", "3", "--train.out_dir", str(out), "--data.cache_dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert "Summary:" in result.stdout and "loss went from" in result.stdout

    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert {"step", "loss", "inner_losses", "tokens_per_s"} <= set(m)
        assert len(m["inner_losses"]) == 1 and all(v > 0 for v in m["inner_losses"])  # pre_only: one inner step
        assert m["loss"] > 0 and m["tokens_per_s"] > 0

    history = wandb_history(out)
    assert [row["loss"] for row in history] == pytest.approx([m["loss"] for m in metrics], rel=1e-12)
    assert all("inner_loss/0" in row for row in history)

    checkpoint = out / "checkpoints" / "step_000003"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model"]["hidden_size"] == 32 and config["memory"]["lora_rank"] == 32
    from parallel.checkpoint.manifest import check_checkpoint
    from parallel.checkpoint.reading import read_weights

    assert check_checkpoint(checkpoint) is None, "complete, and every file matches the manifest"
    weights = read_weights(checkpoint)
    assert weights["embedding.weight"].shape == (512, 32)
    assert not any("fast" in name or "lora" in name for name in weights), "fast weights are never saved"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000003"


@pytest.mark.fast
def test_memory_off_logs_no_inner_losses(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    assert main([*tiny(), "--train.steps", "2", "--memory.enabled", "false", "--train.out_dir", str(out)]) == 0
    assert "plain MDLM (memory off)" in capsys.readouterr().out
    assert [m["inner_losses"] for m in read_metrics(out)] == [[], []]
    assert not (out / "wandb").exists()


@pytest.mark.fast
def test_resume_continues_exactly(tmp_path, tiny):
    """Stop after 2 steps, resume to 4: the same metrics as one uninterrupted 4-step run."""
    common = tiny()
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--train.steps", "4", "--train.out_dir", str(straight)]) == 0
    assert main([*common, "--train.steps", "2", "--train.out_dir", str(split)]) == 0
    assert main([*common, "--train.steps", "4", "--train.out_dir", str(split)]) == 0
    assert [m["loss"] for m in read_metrics(split)] == [m["loss"] for m in read_metrics(straight)]
    assert [m["step"] for m in read_metrics(split)] == [1, 2, 3, 4]


@pytest.mark.fast
def test_help_lists_every_field(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in _field_table():
        assert f"--{option} " in text, option
    assert "--nproc-per-node N" in text


@pytest.mark.fast
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
        (["--nproc-per-node", "two"], "--nproc-per-node expects a positive integer, got 'two'"),
    ],
)
def test_bad_input_fails_with_a_message(tmp_path, args, message, capsys):
    assert main([*args, "--train.out_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("memdlm-pretrain: error: ")
    assert "Traceback" not in err


def test_empty_or_short_corpus_fails_with_a_message(tmp_path, cache_dir, capsys):
    quiet = tiny_options()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["--data.path", str(empty), "--train.out_dir", str(tmp_path / "a")]) == 2
    assert f"--data.path: {empty} is empty" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.\n\nThat is the question.\n")
    assert main([*quiet, "--model.seq_len", "512", "--data.path", str(short), "--train.out_dir", str(tmp_path / "b"),
                 "--data.cache_dir", str(cache_dir)]) == 2
    assert "fewer samples than one micro-batch per rank" in capsys.readouterr().err


def test_prepared_dataset_with_another_sequence_length_is_refused(tmp_path, prepared_corpus, capsys):
    data = prepared_corpus(seq_len=64)
    quiet = tiny_options()
    assert main([*quiet, "--data.path", str(data), "--train.out_dir", str(tmp_path / "out")]) == 2
    assert ("packed into sequences of 64 tokens but --model.seq_len is 32; use --model.seq_len 64"
            in capsys.readouterr().err)
    assert main([*quiet, "--model.seq_len", "64", "--data.path", str(data), "--data.format", "mds",
                 "--train.steps", "2", "--train.out_dir", str(tmp_path / "ok")]) == 0
    assert len(read_metrics(tmp_path / "ok")) == 2


@pytest.mark.fast
def test_a_format_the_dataset_lacks_is_refused(tmp_path, capsys):
    from launch.prepare_cli import main as prepare_main

    data = tmp_path / "mds_only"
    text = tmp_path / "corpus.txt"
    text.write_text(BUNDLED_CORPUS.read_text()[:40_000])
    assert prepare_main(["--input", str(text), "--output", str(data), "--seq-len", "32", "--vocab-size", "512",
                         "--no-progress", "--format", "mds"]) == 0
    capsys.readouterr()
    assert main([*tiny_options(), "--data.path", str(data), "--data.format", "webdataset",
                 "--train.out_dir", str(tmp_path / "wds")]) == 2
    assert "was not prepared in that format (it has: mds)" in capsys.readouterr().err


def test_trains_on_a_prepared_webdataset_directory(tmp_path, tiny):
    out = tmp_path / "run"
    assert main([*tiny(), "--data.format", "webdataset", "--train.steps", "2", "--train.out_dir", str(out)]) == 0
    assert [m["skipped_samples"] for m in read_metrics(out)] == [0, 0]


@pytest.mark.slow  # tests/test_faults.py launches through --nproc-per-node four times by default
def test_nproc_per_node_launches_data_parallel_ranks(tmp_path, tiny):
    out = tmp_path / "dp"
    args = [*tiny(), "--train.steps", "2", "--parallel.zero_stage", "1", "--train.out_dir", str(out)]
    result = run_cli("--nproc-per-node", "2", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Summary:") == 1, "rank 0 alone reports"
    assert "data 2 (ZeRO 1)" in result.stdout
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    # One process picks the two ranks' checkpoint up and continues.
    from pretrain.train.trainer import train

    summary = train(build_config([*args, "--train.steps", "4"]))
    assert summary.resumed_from.name == "step_000002"
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
