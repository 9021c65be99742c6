"""The plan before launch (``--plan``): its parameter, gradient-partition and optimizer-state figures are those of
the tensors a real engine holds, at ZeRO 0-3 (DeepSpeed's padded partitions included) and under tensor and
pipeline parallelism, for a model with every family option on; the shipped recipes parse, build their model on
the meta device and pass their layout check; the 8B recipe's plan prints."""

import re
from pathlib import Path

import pytest
import torch

from launch.config_cli import build_config
from pretrain.train.plan import format_plan, local_parameter_shapes, partition_elements
from tests.helpers.layouts import LAYOUT_OPTIONS, LAYOUTS
from tests.helpers.ranks import run_ranks

OPTIONS = [*LAYOUT_OPTIONS, "--model.qkv_bias", "true", "--model.qk_norm", "true", "--model.head_dim", "32",
           "--model.vocab_size", "500"]
RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))


def _held(rank, world, layouts, extra=()):
    """Per layout: (elements of parameters this rank holds, elements of its optimizer partition, elements of each
    Adam moment), from the engine itself."""
    from parallel.megatron import parallel_state
    from parallel.topology import initialize_topology
    from pretrain.train.factory import build_training

    held = {}
    for name in layouts:
        cfg = build_config([*OPTIONS, *extra, *LAYOUTS[name][1], "--model.mask_token_id", "499"])
        topology = initialize_topology("cpu", cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size,
                                       cfg.model.num_layers, cfg.parallel.sequence_parallel_size,
                                       cfg.parallel.expert_parallel_size)
        parts = build_training(cfg, topology, 499)
        params = list(parts.model.parameters())
        zero = getattr(parts.engine, "deepspeed_optimizer", None)
        if zero is None:
            weights = sum(p.numel() for p in params)
            partition = weights
            moments = sum(state.exp_avg.numel() for state in parts.engine.parameter_states().values())
        else:
            weights = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
            parts.engine._ensure_optimizer_state()  # what a fresh engine's first step or a resume creates
            flats = parts.engine._flat_partitions()
            partition = sum(f.numel() for f in flats)
            moments = sum(zero.optimizer.state[f]["exp_avg"].numel() for f in flats)
        held[name] = (topology.pipeline_parallel_rank, weights, partition, moments)
        parallel_state.destroy_model_parallel()
    return held


MOE = ["--model.moe_num_experts", "4", "--model.moe_ffn_hidden_size", "32", "--model.moe_shared_ffn_hidden_size",
       "64", "--model.moe_shared_expert_gate", "true", "--model.moe_first_dense_layers", "1"]


@pytest.mark.parametrize("world,layouts,extra", [
    (1, ["single"], []), (2, ["tp2", "pp2", "dp2-zero1", "dp2-zero2", "dp2-zero3"], []),
    pytest.param(4, ["dp2-sp2-zero3"], [], marks=pytest.mark.slow),
    pytest.param(2, ["tp2", "dp2-zero3"], MOE, marks=pytest.mark.slow),
    pytest.param(4, ["dp4-ep2-zero1", "dp4-ep4-zero2", "tp2-dp2-ep2-zero1", "pp2-dp2-ep2"], MOE,
                 marks=pytest.mark.slow)])
def test_plan_figures_are_the_tensors_an_engine_holds(world, layouts, extra):
    results = _held(0, 1, layouts, extra) if world == 1 else run_ranks(_held, world, layouts, extra)
    for rank_results in (results if world > 1 else [results]):
        for name, (stage, weights, partition, moments) in rank_results.items():
            cfg = build_config([*OPTIONS, *extra, *LAYOUTS[name][1]])
            shapes = local_parameter_shapes(cfg, stage)
            count = sum(torch.Size(s).numel() for s in shapes)
            # ZeRO partitions over every rank that holds the same weights: data x sequence parallel.
            zero, data = cfg.parallel.zero_stage, world // (cfg.parallel.tensor_parallel_size *
                                                             cfg.parallel.pipeline_parallel_size)
            planned = partition_elements(shapes, zero, data, cfg.parallel.expert_parallel_size)
            assert weights == (planned if zero == 3 else count), (name, stage, weights, count, planned)
            assert partition == planned and moments == planned, (name, stage, partition, moments, planned)


@pytest.mark.fast
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_shipped_recipe_builds_its_model_and_layout(recipe, topology):
    from pretrain.model.transformer import DiffusionTransformer, full_parameter_count
    from pretrain.train.factory import check_run_layout

    world = int(re.search(r"^# world_size: (\d+)$", recipe.read_text(), re.M).group(1))
    cfg = build_config(["--config", str(recipe)])
    check_run_layout(cfg, world)
    with torch.device("meta"):
        model = DiffusionTransformer(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == full_parameter_count(cfg.model)
    plan = format_plan(cfg, world)
    assert plan.count("\n") >= 4 and "GiB per rank" in plan


@pytest.mark.fast
def test_the_plan_command_prints_the_8b_recipe_without_training(tmp_path, capsys):
    from launch.pretrain_cli import main

    assert main(["--config", "recipes/llada-8b-continued.toml", "--plan", "--plan-world-size", "32",
                 "--train.out_dir", str(tmp_path / "never")]) == 0
    out = capsys.readouterr().out
    assert "tensor 2 x pipeline 1 x data 16" in out and "4007.9M" in out, out  # 8.0B parameters over TP2
    assert not (tmp_path / "never").exists(), "a plan trains nothing and writes nothing"
