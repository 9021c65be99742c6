"""Nothing a user has is lost or run behind their back: reruns never mix two runs, ``--overwrite`` never deletes a
run or a dataset, files from elsewhere run no code, every reader checks the manifest, bad input is one line
with exit status 2, and the tools say what they do (held-out losses, first-use preparation, plots).

Ctrl-C is in ``test_interrupts``; planted pickles in the train state and RNG files in ``test_checkpoint``; a
model folder's code in ``test_hf``."""

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from launch.pretrain_cli import main as pretrain
from tests.helpers import ROOT, read_metrics, tiny_options


@pytest.fixture(scope="module")
def run(tmp_path_factory, prepared_corpus):
    """A finished 3-step tiny run (with held-out evaluation every 3 steps) and its data."""
    out = tmp_path_factory.mktemp("safety") / "run"
    data = prepared_corpus()
    assert pretrain([*tiny_options({"eval.every": 3, "eval.num_samples": 8}), "--data.path", str(data),
                     "--train.steps", "3", "--train.out_dir", str(out)]) == 0
    return out, data


def _copy(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def _one_line(err: str, prog: str = "memdlm-pretrain") -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def _rehash(folder, name):
    from parallel.checkpoint.manifest import describe_files

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"].update(describe_files(folder, [name]))
    (folder / "manifest.json").write_text(json.dumps(manifest))


class _Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


# -- reruns never mix two runs --------------------------------------------------------------------------------
@pytest.mark.fast
def test_resume_false_on_a_run_is_refused_and_overwrite_moves_the_run_aside(run, tmp_path, capsys):
    out = _copy(run[0], tmp_path)
    before = sorted(p.name for p in out.iterdir())
    args = [*tiny_options(), "--data.path", str(run[1]), "--train.out_dir", str(out), "--train.resume", "false",
            "--train.steps", "2"]
    assert pretrain(args) == 2
    assert "already holds a run" in _one_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == before and len(read_metrics(out)) == 3
    assert pretrain([*args, "--train.overwrite", "true"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and len(read_metrics(aside[0])) == 3, "the old run, whole, beside the new one"
    assert (aside[0] / "checkpoints" / "step_000003").is_dir()
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000002"]


# -- --overwrite never deletes a run, a dataset or a stranger's folder --------------------------------------------
@pytest.mark.fast
def test_export_overwrite_replaces_only_its_own_output(run, tmp_path, capsys):
    from launch.hf_cli import export_main

    out, data = _copy(run[0], tmp_path), run[1]
    assert export_main([str(out), str(out), "--overwrite"]) == 2
    assert "is a training run" in _one_line(capsys.readouterr().err, "memdlm-export-hf")
    assert len(read_metrics(out)) == 3 and (out / "DONE").is_file()
    dataset = tmp_path / "data"
    shutil.copytree(data, dataset)
    assert export_main([str(out), str(dataset), "--overwrite"]) == 2
    assert "is a prepared dataset" in capsys.readouterr().err and (dataset / "manifest.json").is_file()
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("mine")
    assert export_main([str(out), str(stranger), "--overwrite"]) == 2
    assert "a folder this tool did not write" in capsys.readouterr().err and (stranger / "todo.txt").is_file()
    export = tmp_path / "export"
    assert export_main([str(out), str(export)]) == 0
    assert export_main([str(out), str(export)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert export_main([str(out), str(export), "--overwrite"]) == 0, "its own earlier output is replaced"


@pytest.mark.fast
def test_prepare_overwrite_replaces_only_a_dataset(run, tmp_path, capsys):
    from launch.prepare_cli import main as prepare

    out = _copy(run[0], tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    command = ["--input", str(text), "--seq-len", "32", "--vocab-size", "300", "--no-progress", "--num-workers", "0"]
    assert prepare([*command, "--output", str(out), "--overwrite"]) == 2
    assert "is a training run" in _one_line(capsys.readouterr().err, "memdlm-prepare-data")
    assert len(read_metrics(out)) == 3 and (out / "checkpoints").is_dir()
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("mine")
    assert prepare([*command, "--output", str(stranger)]) == 2, "a folder that is not empty is never written into"
    assert (stranger / "todo.txt").read_text() == "mine"
    data = tmp_path / "data"
    assert prepare([*command, "--output", str(data)]) == 0
    assert prepare([*command, "--output", str(data), "--overwrite"]) == 0


# -- files from elsewhere run no code ------------------------------------------------------------------------------
@pytest.mark.fast
def test_a_planted_checkpoint_metadata_is_refused_by_every_reader(run, tmp_path, capsys):
    import pickle

    from launch.generate_cli import main as generate
    from launch.hf_cli import export_main

    out = _copy(run[0], tmp_path)
    folder = out / "checkpoints" / "step_000003"
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))  # DCP pickles its metadata as it is
    _rehash(folder, ".metadata")
    assert export_main([str(out), str(tmp_path / "export")]) == 2
    assert "is not checkpoint metadata this trainer reads" in _one_line(capsys.readouterr().err, "memdlm-export-hf")
    assert generate([str(out), "--prompt", "ROMEO:", "--gen.length", "4", "--gen.steps", "4"]) == 2
    assert "is not checkpoint metadata" in _one_line(capsys.readouterr().err, "memdlm-generate")
    assert pretrain([*tiny_options(), "--data.path", str(run[1]), "--train.out_dir", str(out),
                     "--train.steps", "4"]) == 2
    assert "is not checkpoint metadata" in _one_line(capsys.readouterr().err)
    assert not marker.exists()


@pytest.mark.fast
def test_a_dataset_declaring_a_pickle_column_is_refused(run, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(run[1], data)
    index_file = data / "mds" / "index.json"
    index = json.loads(index_file.read_text())
    index["shards"][0]["column_encodings"][0] = "pkl"
    index_file.write_text(json.dumps(index))
    assert pretrain([*tiny_options(), "--data.path", str(data), "--data.verify_hashes", "false",
                     "--train.out_dir", str(tmp_path / "out"), "--train.steps", "1"]) == 2
    assert "only the integer-array columns" in _one_line(capsys.readouterr().err)


@pytest.mark.fast
def test_every_reader_checks_the_checkpoint_hashes(run, tmp_path, capsys):
    from launch.eval_cli import eval_main
    from launch.generate_cli import main as generate

    out = _copy(run[0], tmp_path)
    tensor_file = next((out / "checkpoints" / "step_000003").glob("*.distcp"))
    damaged = bytearray(tensor_file.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    tensor_file.write_bytes(bytes(damaged))
    prompt = ["--prompt", "ROMEO:", "--gen.length", "4", "--gen.steps", "4"]
    assert generate([str(out), *prompt]) == 2
    assert "does not match its sha256" in _one_line(capsys.readouterr().err, "memdlm-generate")
    assert eval_main([str(out), "--task", "loglik", "--prompt", "A", "--continuation", "B"]) == 2
    assert "does not match its sha256" in capsys.readouterr().err
    assert generate([str(out), *prompt, "--no-verify"]) == 0, "sizes only, on request"


# -- bad input: one line, exit status 2 ----------------------------------------------------------------------------
@pytest.mark.fast
def test_an_out_dir_that_cannot_be_made_is_one_line(tmp_path, prepared_corpus, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    base = [*tiny_options(), "--data.path", str(prepared_corpus()), "--train.steps", "1"]
    assert pretrain([*base, "--train.out_dir", str(blocker / "run")]) == 2
    assert "a file stands where the directory" in _one_line(capsys.readouterr().err)
    assert pretrain([*base, "--train.out_dir", "/sys/memdlm-run"]) == 2
    assert "--train.out_dir /sys/memdlm-run cannot be written" in _one_line(capsys.readouterr().err)


@pytest.mark.fast
def test_a_failed_start_leaves_no_lock_and_no_directory_behind(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain([*tiny_options(), "--data.path", str(tmp_path / "missing.txt"), "--train.out_dir", str(out)]) == 2
    assert "does not exist" in _one_line(capsys.readouterr().err)
    assert not out.exists()
    out.mkdir()
    assert pretrain([*tiny_options(), "--data.path", str(tmp_path / "missing.txt"), "--train.out_dir", str(out)]) == 2
    assert list(out.iterdir()) == [], "the run.lock of a failed start is removed"


@pytest.mark.fast
def test_niah_options_are_checked(tmp_path, capsys):
    from launch.eval_cli import niah_main

    tokenizer = str(ROOT / "tests" / "helpers")  # not a tokenizer: never reached for bad options
    cases = [(["--kinds", "single,needles"], "unknown kind(s) ['needles']"),
             (["--lengths", "12x"], "expected comma-separated token counts"),
             (["--lengths", "0"], "expected positive token counts")]
    for options, message in cases:
        assert niah_main(["--tokenizer", tokenizer, "--output", str(tmp_path / "n.jsonl"), *options]) == 2
        assert message in _one_line(capsys.readouterr().err, "memdlm-niah")


@pytest.mark.fast
def test_niah_refuses_lengths_shorter_than_the_needles_and_unwritable_output(run, tmp_path, capsys):
    from launch.eval_cli import niah_main

    tokenizer = str(run[1] / "tokenizer.json")
    assert niah_main(["--tokenizer", tokenizer, "--output", str(tmp_path / "n.jsonl"), "--lengths", "5"]) == 2
    assert "--lengths 5: a single example needs at least" in _one_line(capsys.readouterr().err, "memdlm-niah")
    assert niah_main(["--tokenizer", tokenizer, "--output", str(tmp_path / "no" / "n.jsonl"), "--lengths", "256",
                      "--per-cell", "1"]) == 2
    assert "cannot be written" in _one_line(capsys.readouterr().err, "memdlm-niah")


@pytest.mark.fast
def test_messages_say_what_a_folder_is(run, tmp_path, capsys):
    from launch.hf_cli import export_main
    from pretrain.train.factory import check_run_layout

    folder = tmp_path / "notes"
    folder.mkdir()
    assert export_main([str(folder), str(tmp_path / "export")]) == 2
    assert "is neither a run directory (no checkpoints/) nor a checkpoint folder" in capsys.readouterr().err
    checkpoint = run[0] / "checkpoints" / "step_000003"
    assert pretrain([*tiny_options(), "--model.init_from", str(checkpoint)]) == 2
    assert "it is a checkpoint of this trainer: export it with memdlm-export-hf" in capsys.readouterr().err
    from launch.config_cli import build_config

    with pytest.raises(Exception) as refused:
        check_run_layout(build_config(["--parallel.tensor_parallel_size", "2"]), 3)
    assert "3x1" not in str(refused.value) and "no tensor x pipeline split" in str(refused.value)


@pytest.mark.slow
def test_a_usage_error_in_the_ranks_is_one_line_under_nproc_per_node(run, tmp_path):
    """Raised by the ranks themselves (the run directory's step), after the launcher's pre-flight passed."""
    out = _copy(run[0], tmp_path)
    result = subprocess.run([sys.executable, "-m", "launch.pretrain_cli", "--nproc-per-node", "2", *tiny_options(),
                             "--data.path", str(run[1]), "--train.out_dir", str(out), "--train.steps", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "already holds a checkpoint at step 3" in _one_line(result.stderr)


@pytest.mark.fast
def test_the_launcher_checks_before_starting_ranks(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launch.pretrain_cli", "--nproc-per-node", "2", *tiny_options(),
                             "--data.path", str(tmp_path / "missing.txt"), "--train.out_dir", str(tmp_path / "o")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "does not exist" in _one_line(result.stderr)
    assert "torch.distributed.run" not in result.stderr and not (tmp_path / "o").exists()


# -- Slurm ---------------------------------------------------------------------------------------------------------
@pytest.mark.fast
def test_the_slurm_script_gives_each_rank_its_cpus(tmp_path, capsys):
    from launch.launch_cli import main as launch

    train = ["--model.num_layers", "4", "--train.global_batch_size", "16", "--train.micro_batch_size", "2"]
    out = tmp_path / "fixed"
    assert launch(["slurm", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "16", "--", *train,
                   "--train.out_dir", str(out)]) == 0
    script = (out / "slurm" / "job.sbatch").read_text()
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--cpus-per-task=16" in srun and "--kill-on-bad-exit=1" in srun
    setup = "\n".join(line for line in script.splitlines() if "CPUS" in line or "THREADS" in line)
    threads = subprocess.run(["bash", "-c", setup + "\necho $OMP_NUM_THREADS"], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], "SLURM_CPUS_PER_TASK": "16"}).stdout.strip()
    assert threads == "4", "16 CPUs for 4 ranks"
    elastic = tmp_path / "elastic"
    assert launch(["slurm", "--nodes", "2", "--min-nodes", "1", "--", *train, "--train.out_dir", str(elastic)]) == 0
    script = (elastic / "slurm" / "job.sbatch").read_text()
    assert "--kill-on-bad-exit=0" in next(line for line in script.splitlines() if line.startswith("srun "))
    capsys.readouterr()


# -- what the tools say ----------------------------------------------------------------------------------------------
@pytest.mark.fast
def test_held_out_losses_are_shown_and_a_resumed_summary_counts_its_own_steps(run, tmp_path, capsys):
    out = _copy(run[0], tmp_path)
    args = [*tiny_options({"eval.every": 3, "eval.num_samples": 8}), "--data.path", str(run[1]),
            "--train.out_dir", str(out)]
    assert pretrain([*args, "--train.steps", "6"]) == 0
    text = capsys.readouterr().out
    assert "step 6: held-out loss" in text and "with inference-time adaptation" in text
    summary = text[text.index("Summary:"):]
    assert "for 3 steps (steps 4-6, resumed from" in summary
    assert "Held-out at step 6: held-out loss" in summary


@pytest.mark.fast
def test_first_use_preparation_is_announced(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i}: to be, or not to be, that is the question." for i in range(400)))
    assert pretrain([*tiny_options(), "--data.path", str(text), "--data.cache_dir", str(tmp_path / "cache"),
                     "--train.steps", "1", "--train.out_dir", str(tmp_path / "run")]) == 0
    assert "for training (first use): tokenizing and packing into" in capsys.readouterr().out


CLIS = {"memdlm-prepare-data": ("launch.prepare_cli", "main"), "memdlm-generate": ("launch.generate_cli", "main"),
        "memdlm-eval": ("launch.eval_cli", "eval_main"), "memdlm-niah": ("launch.eval_cli", "niah_main"),
        "memdlm-export-hf": ("launch.hf_cli", "export_main"), "memdlm-import-hf": ("launch.hf_cli", "import_main"),
        "memdlm-launch": ("launch.launch_cli", "main"), "memdlm-plot": ("launch.plot_cli", "main"),
        "memdlm-pretrain": ("launch.pretrain_cli", "main")}


@pytest.mark.fast
@pytest.mark.parametrize("cli", list(CLIS))
def test_help_needs_no_torch(cli):
    module, function = CLIS[cli]
    probe = (f"import sys; from {module} import {function} as m\n"
             f"try:\n    m(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("no torch"), result.stdout[-500:] + result.stderr[-2000:]


@pytest.mark.fast
@pytest.mark.parametrize("cli", [c for c in CLIS if c != "memdlm-pretrain"])
def test_every_option_says_what_it_does_and_its_default(cli, monkeypatch):
    module, function = CLIS[cli]
    parsers = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        getattr(importlib.import_module(module), function)(["x"])
    actions = list(parsers[0]._actions)
    for sub in [a for a in actions if isinstance(a, argparse._SubParsersAction)]:
        for parser in sub.choices.values():
            actions += parser._actions
    for action in actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, (cli, action.option_strings)
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in action.help.lower(), (cli, action.option_strings, action.help)


@pytest.mark.fast
def test_plot_writes_a_figure_per_quantity(run, tmp_path):
    from launch.plot_cli import main as plot

    assert plot([str(run[0]), "--output", str(tmp_path / "plots")]) == 0
    written = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert written == ["inner_losses.png", "loss.png", "lr_grad_norm.png", "mfu.png", "tokens_per_s.png"]
    assert all((tmp_path / "plots" / name).stat().st_size > 5000 for name in written)
    assert plot([str(tmp_path)]) == 2
