"""``--train.compile``: regional torch.compile of the transformer sub-blocks.

Compiled training equals eager training (fp32 CPU: losses, inner losses, final weights and the held-out losses
with and without inference-time adaptation within 1e-5 relative) with memory off, on (the default pre_only),
with the paper's pmc and with full and selective recomputation; masks that change every step do not recompile
(the masked-row gathers stay outside the compiled regions); every parallel layout trains compiled as one eager
process does."""

import pytest

from launch.config_cli import build_config
from tests.helpers import read_metrics
from tests.helpers.layouts import LAYOUT_OPTIONS, relative, run_layouts

COMPILE = ["--train.compile", "true"]
MEMORY = {"memory-off": ["--memory.enabled", "false"], "pre-only": [],
          "paper-pmc": ["--memory.masking_strategy", "pmc", "--memory.num_inner_steps", "2"],
          "recompute-full": ["--train.recompute", "full"], "recompute-selective": ["--train.recompute", "selective"]}


def _same(compiled, eager, where):
    (compiled_losses, compiled_weights), (eager_losses, eager_weights) = compiled, eager
    for ours, theirs in zip(compiled_losses[0], eager_losses[0]):
        assert abs(ours - theirs) <= 1e-5 * abs(theirs), (where, compiled_losses, eager_losses)
    for name in eager_weights:
        assert relative(compiled_weights[name], eager_weights[name]) < 1e-5, (where, name)


@pytest.mark.slow
@pytest.mark.parametrize("memory", list(MEMORY))
def test_compiled_training_equals_eager(memory, prepared_corpus, tmp_path):
    data = prepared_corpus()
    eager = run_layouts(["single"], tmp_path / "eager", data, MEMORY[memory])["single"]
    compiled = run_layouts(["single"], tmp_path / "compiled", data, [*MEMORY[memory], *COMPILE])["single"]
    _same(compiled, eager, memory)
    metrics = {name: read_metrics(tmp_path / name / "single") for name in ("eager", "compiled")}
    inner = [[m["inner_losses"] for m in metrics[name]] for name in ("eager", "compiled")]
    for eager_step, compiled_step in zip(*inner):
        assert len(eager_step) == len(compiled_step)
        for a, b in zip(eager_step, compiled_step):
            assert abs(a - b) <= 1e-5 * abs(a)
    # the held-out evaluation at the end, without and with inference-time adaptation, runs compiled too
    held_out = [{k: m[k] for m in metrics[name] for k in ("eval_loss", "eval_adapted_loss") if k in m}
                for name in ("eager", "compiled")]
    assert sorted(held_out[0]) == sorted(held_out[1]) == ["eval_adapted_loss", "eval_loss"]
    for key, value in held_out[0].items():
        assert abs(held_out[1][key] - value) <= 1e-5 * abs(value), (memory, key)


@pytest.mark.slow
@pytest.mark.parametrize("layouts", [["tp2", "pp2", "dp2-zero1", "dp2-zero3"]])
def test_compiled_training_at_every_layout_equals_one_eager_process(layouts, prepared_corpus, tmp_path):
    """Tensor parallelism (megatron's collectives inside the compiled regions), pipeline stages, ZeRO 1 and ZeRO 3
    (parameters gathered around each module): every rank's losses and the final weights are one eager
    process's."""
    data = prepared_corpus()
    eager = run_layouts(["single"], tmp_path / "eager", data)["single"]
    compiled = run_layouts(layouts, tmp_path / "compiled", data, COMPILE)
    for name in layouts:
        for rank_losses in compiled[name][0]:
            _same(([rank_losses], compiled[name][1]), eager, name)


@pytest.mark.slow
def test_twenty_steps_of_changing_masks_compile_once(topology):
    """The step on 20 micro-batches whose masked-row counts all differ: every graph is made in the first two
    steps (memory on: the inner pass, the frozen and the trained anchor passes), none after."""
    import numpy as np
    import torch._dynamo

    from data_pipeline.masking import build_masked_batch
    from parallel.collectives import LossNormalizer
    from parallel.topology import initialize_topology
    from pretrain.train.factory import build_bilevel_step, build_model

    torch._dynamo.reset()
    cfg = build_config([*LAYOUT_OPTIONS, *COMPILE, "--model.mask_token_id", "511", "--train.micro_batch_size", "8"])
    topology = initialize_topology("cpu")
    model = build_model(cfg, topology)
    step = build_bilevel_step(cfg, model, topology, 511)
    rng = np.random.default_rng(0)
    graphs, counts = [], set()
    for index in range(20):
        ids = rng.integers(0, 511, size=(8, 32))
        batch = build_masked_batch(ids, np.arange(index * 8, index * 8 + 8), seed=index, epoch=0,
                                   trajectory=step.trajectory)
        counts.add(int(batch.anchor_mask.sum()))
        result = step(batch, LossNormalizer.of([batch.maskable]), step=index + 1)
        result.loss.backward()
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert len(counts) > 10, "the masks must change for the test to mean anything"
    assert graphs[1] == graphs[-1], graphs
    assert 0 < graphs[-1] <= 16, graphs  # 14 here: the sub-blocks' variants, no graph breaks
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
