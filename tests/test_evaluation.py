"""Held-out evaluation, conditional likelihood, the needle-in-a-haystack suite, the evaluation CLIs and
the lm-evaluation-harness model (a local two-question task, no downloads).

The held-out loss at every parallel layout (and across two runs) is checked in ``test_reshard``."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_pipeline.masking import build_masked_batch
from launch.config_cli import build_config
from parallel.collectives import LossNormalizer
from pretrain.eval.heldout import Evaluator, bits
from pretrain.eval.inference import load_for_inference
from pretrain.eval.likelihood import conditional_log_likelihood
from pretrain.eval.niah import KINDS, exact_match, make_suite
from tests.helpers import read_metrics
from tests.helpers.models import MASK, tiny_adaptation, tiny_model

SMALL = ["--model.vocab_size", "512", "--model.hidden_size", "64", "--model.num_layers", "2", "--model.num_heads",
         "4", "--model.ffn_hidden_size", "96", "--model.seq_len", "64", "--train.global_batch_size", "4",
         "--train.micro_batch_size", "4", "--data.num_workers", "0", "--logging.wandb", "false",
         "--logging.progress_bar", "false", "--memory.layer_fraction", "0.5", "--eval.every", "2",
         "--eval.num_samples", "8", "--eval.micro_batch_size", "4"]


def _batch(seed=5, padded=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, MASK, size=(3, 48))
    maskable = np.ones_like(ids, dtype=bool)
    maskable[0, :6] = False  # a prompt, never masked
    padding = None
    if padded:
        padding = np.ones_like(ids, dtype=bool)
        padding[2, 30:] = False
    return build_masked_batch(ids, np.arange(3), seed=seed, epoch=0, num_inner_steps=2, pre_anchor_scale=1.5,
                              maskable=maskable, key_padding_mask=padding)


def _by_hand(model, batch, fast=None) -> float:
    """sum over masked tokens of CE / t, divided by the maskable tokens (token normalisation)."""
    noised = torch.where(batch.anchor_mask, MASK, batch.input_ids)
    logits = model(noised, attention_mask=batch.key_padding_mask, fast=fast).detach().double()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.input_ids, reduction="none")
    return float((ce * batch.anchor_mask / batch.t.double()[:, None]).sum() / batch.maskable.sum())


FAMILY_OPTIONS = {"qkv_bias": True, "qk_norm": True, "head_dim": 8, "tie_embeddings": True,
                  "shifted_prediction": True, "rope_scaling": "llama3", "rope_original_max_positions": 8}


@pytest.mark.fast
@pytest.mark.parametrize("options", [{}, FAMILY_OPTIONS], ids=["plain", "family-options"])
def test_held_out_loss_is_the_mdlm_objective_computed_by_hand(topology, options):
    """The masked-row head, the loss and the adaptation (which run on gathered rows) equal the full logits'
    objective, also with Dream's shifted prediction (the logits of ``forward`` are shifted; the rows the head
    gathers are the predicting ones) and every other family option."""
    model = tiny_model(**options)
    adaptation = tiny_adaptation(model)
    batch, prompt = _batch(), _batch(seed=9)
    batch.t = batch.t.double()
    values = Evaluator(adaptation)(batch, LossNormalizer.of([batch.maskable]), prompt)
    assert abs(float(values[0]) - _by_hand(model, batch)) < 1e-10 * abs(float(values[0]))
    fast = adaptation.adapt(prompt)
    adapted = _by_hand(model, batch, fast)
    assert abs(float(values[1]) - adapted) < 1e-10 * abs(adapted)
    assert abs(adapted - float(values[0])) > 1e-6, "the adapted loss must differ for the comparison to mean anything"
    assert bits(float(values[0])) == pytest.approx(float(values[0]) / np.log(2))


@pytest.mark.fast
def test_conditional_likelihood_of_one_token_is_its_exact_log_probability(topology):
    """With one continuation token every Monte Carlo draw masks it: the estimate is exact."""
    model = tiny_model()
    adaptation = tiny_adaptation(model)
    prompt, token = [3, 4, 5, 6], 7
    with torch.no_grad():
        exact = model(torch.tensor([prompt + [MASK]])).double().log_softmax(-1)[0, -1, token]
    value = conditional_log_likelihood(model, adaptation, prompt, [token], MASK, num_samples=5, seed=1)
    assert value == pytest.approx(float(exact), rel=1e-9)
    many = [8, 9, 10, 11, 12]
    first = conditional_log_likelihood(model, adaptation, prompt, many, MASK, num_samples=16, seed=1)
    assert first == conditional_log_likelihood(model, adaptation, prompt, many, MASK, num_samples=16, seed=1)
    assert first != conditional_log_likelihood(model, adaptation, prompt, many, MASK, num_samples=16, seed=2)
    adapted = conditional_log_likelihood(model, adaptation, prompt, many, MASK, num_samples=16, seed=1, adapt=True)
    assert adapted != first and np.isfinite(adapted)


# -- needle in a haystack ----------------------------------------------------------------------------
def _words(text):  # a stand-in tokenizer: one id per whitespace-separated word
    return text.split()


@pytest.mark.fast
def test_niah_suite_is_deterministic_and_the_needles_are_where_the_metadata_says():
    suite = make_suite(_words, lengths=(128, 256), per_cell=3, seed=4)
    again = make_suite(_words, lengths=(128, 256), per_cell=3, seed=4)
    assert [e.to_json() for e in suite] == [e.to_json() for e in again]
    assert [e.to_json() for e in make_suite(_words, lengths=(128, 256), per_cell=3, seed=5)] != \
        [e.to_json() for e in suite]
    assert sorted({e.kind for e in suite}) == sorted(KINDS) and len(suite) == 3 * 2 * 3
    for example in suite:
        words = _words(example.prompt)
        assert example.context_tokens == len(words) <= example.target_tokens
        assert example.context_tokens > 0.8 * example.target_tokens
        assert len(example.needle_positions) == len(example.needles)
        for position, needle in zip(example.needle_positions, example.needles):
            assert words[position:position + len(_words(needle))] == _words(needle), example.kind
        value = example.answer.strip()
        assert exact_match(example.answer + " and more", example.answer) and not exact_match(" 1", example.answer)
        if example.kind == "vartrack":  # the chain starts at the value and ends at the asked variable
            assert example.needles[0].endswith(f"= {value}.")
            assert example.prompt.rsplit("VAR ", 1)[1].startswith(example.needles[-1].split()[1])
        if example.kind != "vartrack":
            key = example.prompt.rsplit("number for ", 1)[1].split(" ")[0].rstrip("?")
            assert f"The special magic number for {key} is {value}." in example.needles


def test_niah_answers_are_in_the_trained_vocabulary(trained):
    run, _ = trained
    model = load_for_inference(run, "cpu")
    for example in make_suite(model.encode, lengths=(256,), per_cell=2, seed=0):
        answer = model.encode(example.answer)
        assert model.decode(answer) == example.answer  # byte-level BPE: every answer is spelled exactly
        assert model.decode(model.encode(example.prompt)) == example.prompt


# -- a trained checkpoint: evaluation in training, the CLIs, lm-eval -------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared_corpus):
    from pretrain.train.trainer import train

    root = tmp_path_factory.mktemp("eval")
    summary = train(build_config([*SMALL, "--train.steps", "3", "--train.out_dir", str(root / "run"),
                                  "--data.path", str(prepared_corpus(seq_len=64))]))
    return root / "run", summary


def test_training_logs_held_out_losses_at_the_interval_and_the_end(trained):
    run, _ = trained
    records = read_metrics(run)
    evaluated = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(evaluated) == [2, 3]
    for record in evaluated.values():
        assert record["eval_bits_per_token"] == pytest.approx(record["eval_loss"] / np.log(2))
        assert np.isfinite(record["eval_adapted_loss"])
    assert evaluated[3]["eval_loss"] < evaluated[2]["eval_loss"] + 0.5


def _cli(*args, timeout=300):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_eval_cli_reports_held_out_loss_equal_to_training(trained, prepared_corpus, capsys):
    """The standalone held-out loss (one process, eval seed 0, 8 samples) equals the one logged at the end."""
    run, _ = trained
    records = read_metrics(run)
    logged = [r for r in records if "eval_loss" in r][-1]
    data = prepared_corpus(seq_len=64)
    from launch.eval_cli import eval_main

    assert eval_main([str(run), "--task", "heldout", "--data", str(data), "--num-samples", "8", "--adaptation", "true",
                      "--device", "cpu"]) == 0
    values = json.loads(capsys.readouterr().out)
    assert values["loss_nats_per_token"] == pytest.approx(logged["eval_loss"], rel=1e-6)
    assert values["adapted_loss_nats_per_token"] == pytest.approx(logged["eval_adapted_loss"], rel=1e-6)


def test_generate_cli_with_and_without_adaptation(trained, capsys):
    from launch.generate_cli import main

    run, _ = trained
    for adapt in ("false", "true"):
        assert main([str(run), "--prompt", "ROMEO: What say you", "--prompt", "KING:", "--gen.length", "8",
                     "--gen.steps", "8", "--memory.inference", adapt, "--device", "cpu"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
        assert [line["prompt"] for line in lines] == ["ROMEO: What say you", "KING:"]
        assert all(len(line["tokens"]) <= 8 and line["adapted"] == (adapt == "true") for line in lines)
    assert main([str(run / "nowhere"), "--prompt", "x"]) == 2
    assert "checkpoint" in capsys.readouterr().err


TASK = """task: memdlm_local_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_runs_a_local_two_question_task(trained, tmp_path):
    run, _ = trained
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "ROMEO: Good", "choices": [" morrow", " zebra"], "answer": 0}) + "\n"
                    + json.dumps({"question": "KING: My lord", "choices": [" apple", " of"], "answer": 1}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "memdlm_local_qa.yaml").write_text(TASK.format(data=data))
    result = _cli("launch.lm_eval_cli", "--model", "memdlm", "--model_args",
                  f"checkpoint={run},inference_adaptation=true,mc_samples=4", "--device", "cpu",
                  "--tasks", "memdlm_local_qa",
                  "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())["results"]["memdlm_local_qa"]
    assert scores["acc,none"] in (0.0, 0.5, 1.0)
    assert "memdlm_local_qa" in result.stdout


@pytest.mark.fast
def test_held_out_adaptation_never_sees_a_scored_position(prepared_corpus):
    """With a context split the adaptation's states lie in the context, which it sees alone, and the scored
    masks lie in the continuation; without it they overlap (the leak the split removes)."""
    from data_pipeline.shards import read_manifest
    from data_pipeline.validation import validation_batches
    from pretrain.config import MemoryConfig
    from pretrain.eval.heldout import evaluation_collates

    root = prepared_corpus()
    manifest = read_manifest(root)
    memory = MemoryConfig()

    def batches(fraction):
        collates = evaluation_collates(0, memory, 1e-3, 32, 512, True, fraction)
        (scored,), (prompt,) = validation_batches(root, manifest, collates, list(range(16)), 16)
        return scored, prompt

    scored, prompt = batches(0.5)
    adapted = prompt.inner_masks.any(0) | prompt.anchor_mask
    assert adapted.any() and scored.anchor_mask.any()
    assert not (adapted & scored.maskable).any(), "adaptation trains on no position the evaluation scores"
    assert prompt.key_padding_mask is not None and not (prompt.key_padding_mask & scored.maskable).any(), \
        "the continuation is not even visible to the adaptation"
    leaky_scored, leaky_prompt = batches(0.0)
    assert ((leaky_prompt.inner_masks.any(0) | leaky_prompt.anchor_mask) & leaky_scored.anchor_mask).any()


def _eval_figures(rank, world, args):
    from parallel.megatron import parallel_state
    from pretrain.train.trainer import train

    folder = args[args.index("--train.out_dir") + 1]
    train(build_config(args))
    parallel_state.destroy_model_parallel()
    return {(r["step"], key): r[key] for r in read_metrics(folder) for key in ("eval_loss", "eval_adapted_loss")
            if key in r}


def test_pipeline_scores_the_adapted_loss_as_one_process_when_training_without_memory(tmp_path, prepared_corpus):
    """Training without memory, the adaptation's fast-weight sites still decide where the adapted model is
    scored: two pipeline stages give one process's held-out losses (a bug scored through the training step's
    boundary, which without memory is the last block)."""
    from tests.helpers.layouts import LAYOUT_OPTIONS, LAYOUTS
    from tests.helpers.ranks import run_ranks

    common = [*LAYOUT_OPTIONS, "--memory.enabled", "false", "--train.steps", "2", "--eval.every", "2",
              "--eval.num_samples", "8", "--eval.micro_batch_size", "4", "--data.path", str(prepared_corpus())]
    single = _eval_figures(0, 1, [*common, *LAYOUTS["single"][1], "--train.out_dir", str(tmp_path / "single")])
    piped = run_ranks(_eval_figures, 2, [*common, *LAYOUTS["pp2"][1], "--train.out_dir", str(tmp_path / "pp2")])
    assert set(single) == {(2, "eval_loss"), (2, "eval_adapted_loss")}
    assert single[(2, "eval_adapted_loss")] != single[(2, "eval_loss")]
    for rank_figures in piped:
        for key, value in single.items():
            if key in rank_figures:
                assert abs(rank_figures[key] - value) <= 1e-5 * abs(value), (key, rank_figures[key], value)
    assert any(set(single) <= set(figures) for figures in piped)


@pytest.mark.slow
def test_sequence_parallel_evaluation_and_generation_give_the_one_process_results(trained, prepared_corpus, capsys):
    """``--sequence-parallel-size 2`` (two ranks through torchrun, each holding half of every sequence): the held-out
    losses with and without adaptation and adapted generation from a prompt whose length 2 does not divide equal one
    process's (this model's 64 positions hold no needle-in-a-haystack example; the long-context run in
    benchmarks/long_context.py scores those under sequence parallelism)."""
    from launch.eval_cli import eval_main
    from launch.generate_cli import main as generate_main

    run, _ = trained
    data = prepared_corpus(seq_len=64)
    heldout = [str(run), "--task", "heldout", "--data", str(data), "--num-samples", "8", "--adaptation", "true",
               "--device", "cpu"]
    generate = [str(run), "--prompt", "ROMEO: What say you", "--prompt", "KING:", "--gen.length", "7",
                "--gen.steps", "7", "--memory.inference", "true", "--device", "cpu"]
    expected = []
    for main, args in ((eval_main, heldout), (generate_main, generate)):
        assert main(args) == 0
        expected.append(capsys.readouterr().out)
    for module, args, one_process in zip(("launch.eval_cli", "launch.generate_cli"), (heldout, generate), expected):
        result = _cli(module, *args, "--sequence-parallel-size", "2")
        assert result.returncode == 0, result.stderr[-3000:]
        if module == "launch.generate_cli":
            ours = [json.loads(line) for line in result.stdout.strip().splitlines()]
            theirs = [json.loads(line) for line in one_process.strip().splitlines()]
            assert [o["tokens"] for o in ours] == [t["tokens"] for t in theirs]
            continue
        ours, theirs = json.loads(result.stdout), json.loads(one_process)
        for key in ("loss_nats_per_token", "adapted_loss_nats_per_token"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
