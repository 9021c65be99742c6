"""Weighted mixtures of prepared datasets (``--data.sources``): proportions, deterministic order, exact resume
(also at another data-parallel size), exact per-source loss accounting, per-source metrics, refusals."""

import math

import numpy as np
import pytest
import torch

from data_pipeline.errors import DataError
from data_pipeline.loader import ReaderOptions, open_batches
from data_pipeline.masking import MaskedBatch, build_masked_batch
from data_pipeline.mixture import open_sources, parse_sources, proportions
from data_pipeline.prepare import PrepareOptions, prepare_dataset
from data_pipeline.readers import MaskingSpec
from data_pipeline.trajectory import TrajectorySpec
from parallel.collectives import LossNormalizer
from pretrain.config import ConfigError, DiffusionConfig, MemoryConfig, ModelConfig
from pretrain.memdlm.bilevel import BilevelStep
from pretrain.model.fast_weights import build_fast_weight_plan
from pretrain.model.transformer import DiffusionTransformer
from tests.helpers import BUNDLED_CORPUS, read_metrics
from tests.helpers.data import SEQ_LEN, VOCAB
from tests.helpers.ranks import run_ranks

SPEC = MaskingSpec(seed=3, trajectory=TrajectorySpec(), eps=1e-3, seq_len=SEQ_LEN, vocab_size=VOCAB)
WEIGHTS = (0.5, 0.3, 0.2)


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    """Three datasets of one tokenizer, of different sizes; the first two with a validation split."""
    root = tmp_path_factory.mktemp("mixture")
    text = BUNDLED_CORPUS.read_text()
    slices = {"web": text[:120_000], "code": text[120_000:180_000], "math": text[180_000:220_000]}
    for name, part in slices.items():
        (root / f"{name}.txt").write_text(part)
    base = dict(seq_len=SEQ_LEN, vocab_size=VOCAB, samples_per_shard=100, num_workers=0, progress=False)
    prepare_dataset(PrepareOptions(input=str(root / "web.txt"), output=str(root / "tok"), tokenizer_only=True,
                                   **base))
    tokenizer = str(root / "tok" / "tokenizer.json")
    for name in slices:
        prepare_dataset(PrepareOptions(input=str(root / f"{name}.txt"), output=str(root / name), tokenizer=tokenizer,
                                       val_fraction=0.05 if name != "math" else 0.0, **base))
    return root


def mixture(root, weights=WEIGHTS) -> str:
    names = ("web", "code", "math")
    if weights is None:
        return ",".join(f"{n}={root / n}" for n in names)
    return ",".join(f"{n}={root / n}:{w}" for n, w in zip(names, weights))


def read(root, count, micro=50, rank=0, ranks=1, state=None, seed=3, weights=WEIGHTS):
    """(sample index, source) of ``count`` micro-batches, and the loader's state after them."""
    sources = open_sources(mixture(root, weights), SEQ_LEN)
    spec = MaskingSpec(seed, TrajectorySpec(), 1e-3, SEQ_LEN, VOCAB)
    batches = open_batches(sources, spec, micro, ReaderOptions(num_workers=0), rank, ranks, state)
    stream = iter(batches)
    got = []
    for _ in range(count):
        batch = next(stream)
        got.append(list(zip(batch.sample_index.tolist(), batch.source_ids.tolist())))
    return got, batches.state_dict()


@pytest.mark.fast
@pytest.mark.parametrize("text, message", [
    ("web", "is not NAME=PATH"), ("a=/x:0.5,a=/y:0.5", "appear more than once"), ("a=/x:0.5,b=/y", "every source"),
    ("a=/x:0", "must be positive"), ("", "is empty"),
])
def test_bad_source_lists_are_named(text, message):
    with pytest.raises(DataError, match=message):
        parse_sources(text)


@pytest.mark.fast
def test_source_list_parsing():
    assert parse_sources("web=/d/fw:0.7, code=/d/st:0.3") == [("web", "/d/fw", 0.7), ("code", "/d/st", 0.3)]
    assert parse_sources("a=/d/x,b=/d/y") == [("a", "/d/x", None), ("b", "/d/y", None)]


def test_proportions_over_10000_samples_are_the_weights(three_sources):
    got, _ = read(three_sources, 200)
    sources = np.array([s for batch in got for _, s in batch])
    assert len(sources) == 10_000
    for source, weight in enumerate(WEIGHTS):
        share = (sources == source).mean()
        assert abs(share - weight) < 4 * math.sqrt(weight * (1 - weight) / 10_000), (source, share)
    # Without weights: in proportion to the sources' sizes.
    got, _ = read(three_sources, 60, weights=None)
    sizes = proportions(open_sources(mixture(three_sources, None), SEQ_LEN))
    sources = np.array([s for batch in got for _, s in batch])
    for source, weight in enumerate(sizes):
        assert abs((sources == source).mean() - weight) < 4 * math.sqrt(weight * (1 - weight) / len(sources))


def test_the_order_follows_the_seed_and_resumes_exactly(three_sources):
    straight, _ = read(three_sources, 30, micro=8)
    assert read(three_sources, 30, micro=8)[0] == straight
    assert read(three_sources, 30, micro=8, seed=4)[0] != straight
    first, state = read(three_sources, 11, micro=8)
    rest, _ = read(three_sources, 19, micro=8, state=state)
    assert first + rest == straight


def _two_rank_mixture(rank, world, root):
    straight = read(root, 16, micro=4, rank=rank, ranks=world)[0]
    first, state = read(root, 6, micro=4, rank=rank, ranks=world)
    return {"straight": straight, "state": state, "first": first}


def test_resume_at_another_data_parallel_size(three_sources):
    """Read on 2 ranks x 4, save after 6 micro-batches, resume on 1 rank x 8: the global batches go on."""
    ranks = run_ranks(_two_rank_mixture, 2, three_sources)
    single, _ = read(three_sources, 8, micro=8)

    def global_batches(per_rank):
        return [sorted(a + b) for a, b in zip(*per_rank)]

    assert global_batches([r["straight"] for r in ranks])[:8] == [sorted(b) for b in single]
    resumed, _ = read(three_sources, 10, micro=8, state=ranks[0]["state"])
    assert [sorted(b) for b in resumed] == global_batches([r["straight"] for r in ranks])[6:16]


@pytest.mark.fast
def test_sources_of_another_sequence_length_or_tokenizer_are_refused(three_sources, tmp_path):
    other = tmp_path / "long"
    prepare_dataset(PrepareOptions(input=str(three_sources / "math.txt"), output=str(other), seq_len=64,
                                   tokenizer=str(three_sources / "tok" / "tokenizer.json"), num_workers=0,
                                   progress=False))
    with pytest.raises(DataError, match=f"web \\({three_sources / 'web'}\\) holds samples of 32 tokens but long "
                                        f"\\({other}\\) of 64"):
        open_sources(f"web={three_sources / 'web'},long={other}", SEQ_LEN)
    retrained = tmp_path / "retrained"
    prepare_dataset(PrepareOptions(input=str(three_sources / "math.txt"), output=str(retrained), seq_len=SEQ_LEN,
                                   vocab_size=VOCAB, num_workers=0, progress=False))
    with pytest.raises(DataError, match="web .* and own .* were tokenized with different tokenizers"):
        open_sources(f"web={three_sources / 'web'},own={retrained}", SEQ_LEN)
    with pytest.raises(DataError, match="is not a prepared dataset"):
        open_sources(f"web={three_sources / 'web'},raw={three_sources / 'math.txt'}", SEQ_LEN)
    from launch.config_cli import build_config

    with pytest.raises(ConfigError, match="reads MDS shards only"):
        build_config(["--data.sources", mixture(three_sources), "--data.format", "webdataset"])
    with pytest.raises(ConfigError, match="replaces --data.path"):
        build_config(["--data.sources", mixture(three_sources), "--data.path", str(three_sources / "web")])


# -- per-source accounting -----------------------------------------------------------------------
CFG = ModelConfig(vocab_size=64, hidden_size=64, num_layers=4, num_heads=4, ffn_hidden_size=96, seq_len=24)
MASK_ID = 63


def rows(batch: MaskedBatch, keep: torch.Tensor) -> MaskedBatch:
    part = batch._map(lambda name, t: t[:, keep] if name == "inner_masks" else t[keep])
    part.row_counts = part.source_tokens = None
    return part


@pytest.mark.fast
@pytest.mark.parametrize("normalization", ["token", "sequence", "batch"])
@pytest.mark.parametrize("memory", [True, False])
def test_each_sources_loss_is_the_loss_of_its_samples_alone(topology, normalization, memory):
    model = DiffusionTransformer(CFG, seed=0)
    diffusion = DiffusionConfig(normalization=normalization)
    settings = MemoryConfig(enabled=memory)
    step = BilevelStep(model, build_fast_weight_plan(CFG, settings), settings, diffusion, MASK_ID, seed=5)
    ids = np.random.default_rng(1).integers(0, MASK_ID, size=(2, 6, CFG.seq_len))
    batches = [build_masked_batch(ids[i], np.arange(6 * i, 6 * i + 6), seed=1, epoch=0) for i in range(2)]
    sources = [torch.tensor([0, 2, 0, 1, 2, 0]), torch.tensor([2, 2, 0, 0, 0, 2])]
    for batch, source in zip(batches, sources):
        batch.source_ids = source
    normalizer = LossNormalizer.of([b.maskable for b in batches], sources, num_sources=3)
    by_source = sum(step(b, normalizer, step=3).loss_by_source for b in batches)
    for source in range(3):
        alone = [rows(b, s == source) for b, s in zip(batches, sources)]
        alone = [b for b in alone if b.num_sequences]
        own = LossNormalizer.of([b.maskable for b in alone])
        expected = sum(step(b, own, step=3).loss.detach() for b in alone)
        torch.testing.assert_close(by_source[source], expected.double(), rtol=1e-6, atol=0)
    # A source absent from the global batch has no loss.
    normalizer = LossNormalizer.of([b.maskable for b in batches], sources, num_sources=4)
    assert torch.isnan(step(batches[0], normalizer, step=3).loss_by_source[3])


def test_a_mixture_run_logs_each_sources_loss_tokens_and_held_out_loss(three_sources, tmp_path, tiny):
    from launch.config_cli import build_config
    from pretrain.train.trainer import train

    options = tiny({"train.steps": 4, "eval.every": 2, "eval.num_samples": 8})
    data = options.index("--data.path")
    options = options[:data] + options[data + 2:] + ["--data.sources", mixture(three_sources)]
    train(build_config([*options, "--train.out_dir", str(tmp_path / "run")]))
    metrics = read_metrics(tmp_path / "run")
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    seen = set()
    for m in steps:
        assert set(m["loss_by_source"]) <= {"web", "code", "math"}
        seen |= set(m["loss_by_source"])
        assert all(math.isfinite(v) and v >= 0 for v in m["loss_by_source"].values())
    assert seen, "the sources drawn have losses"
    totals = [sum(m["tokens_by_source"].values()) for m in steps]
    assert all(b > a for a, b in zip(totals, totals[1:])), "cumulative"
    assert totals[-1] <= 4 * 4 * SEQ_LEN and totals[-1] > 0.9 * 4 * 4 * SEQ_LEN  # a few padded tails at most
    evaluated = [m for m in metrics if "eval_loss_by_source" in m]
    assert [m["step"] for m in evaluated] == [2, 4]
    for m in evaluated:
        assert set(m["eval_loss_by_source"]) == {"web", "code"}, "math has no validation split"
        shares = np.array([0.5, 0.3])
        values = np.array([m["eval_loss_by_source"]["web"], m["eval_loss_by_source"]["code"]])
        assert m["eval_loss"] == pytest.approx(float((shares * values).sum() / shares.sum()), rel=1e-12)


@pytest.mark.slow
def test_a_killed_two_rank_mixture_run_resumes_to_the_uninterrupted_losses(three_sources, tmp_path):
    """A 3-source mixture on 2 data-parallel ranks, checkpointing every step, killed with SIGKILL after step 3
    and run again: its losses, per-source losses and token counts are those of one uninterrupted process."""
    import os
    import subprocess
    import sys

    from launch.config_cli import build_config
    from pretrain.train.trainer import train
    from tests.helpers import ROOT
    from tests.helpers.layouts import LAYOUT_OPTIONS
    from tests.helpers.processes import kill_everything, steps_logged, wait_for

    common = [*LAYOUT_OPTIONS, "--train.steps", "6", "--data.sources", mixture(three_sources), "--eval.every", "3",
              "--eval.num_samples", "8"]
    train(build_config([*common, "--train.micro_batch_size", "8", "--train.out_dir", str(tmp_path / "reference")]))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "launch.pretrain_cli", "--nproc-per-node", "2", *common,
               "--train.micro_batch_size", "4", "--checkpoint.every", "1", "--train.out_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start():
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    run = start()
    wait_for(lambda: steps_logged(out) >= 3, run, timeout=300)
    kill_everything(run)
    run = start()
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output[-3000:]
    assert "resumed from" in output
    reference = {m["step"]: m for m in read_metrics(tmp_path / "reference")}
    resumed = {m["step"]: m for m in read_metrics(out)}
    assert sorted(resumed) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for step, expected in reference.items():
        got = resumed[step]
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5), step
        assert got["loss_by_source"].keys() == expected["loss_by_source"].keys(), step
        for name, value in expected["loss_by_source"].items():
            assert got["loss_by_source"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, name)
        assert got["tokens_by_source"] == expected["tokens_by_source"], step
        if "eval_loss_by_source" in expected:
            assert got["eval_loss_by_source"] == pytest.approx(expected["eval_loss_by_source"], rel=1e-5)
