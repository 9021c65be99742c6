"""Which memory variant, if any, helps the base model: the reference code's variants and ours, compute-matched.

Every variant trains the default model on the bundled corpus from the same seed, data order and masks, for as
many steps as fit the executed FLOPs of plain MDLM's run (``--budget-steps`` MDLM steps; counted exactly from
the masks with ``pretrain.train.flops.executed_flops`` before training, so each run knows its step count and
learning-rate schedule in advance), for each of ``--seeds``. At the end of each run the trainer's held-out
evaluation (``--eval.context_fraction 0.5``: the second half of each validation sample scored given the first,
adaptation on the first half alone, so it never trains on a scored target) gives the base model's loss and
the loss after inference-time adaptation; then needle-in-a-haystack exact match at ``--niah-length`` context
tokens (``pretrain.eval.niah``), with and without adaptation.

Resumable: a finished run (its DONE marker) and a finished evaluation (its JSON) are not redone; an
interrupted run resumes from its checkpoint. Writes ``runs/``, ``results.json``, ``report.md`` and
``heldout.png`` into ``--out``.

Usage: python benchmarks/memory_variants.py [--out benchmarks/memory_variants] [--budget-steps 400]
       [--seeds 1234,1235,1236] [--variants mdlm,pmc,...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PAPER = ["--memory.masking_strategy", "pmc", "--memory.num_inner_steps", "2", "--memory.inner_loss_mask",
         "student_masked"]  # the paper's recipe, spelled out (the defaults were this recipe when the study ran)
VARIANTS = {  # name: (memdlm-pretrain options, description)
    "mdlm": (["--memory.enabled", "false"], "plain MDLM (memory off)"),
    "pmc": (PAPER, "the paper's recipe: pmc + ce, student_masked (leaks the outer targets)"),
    "newly_revealed": ([*PAPER, "--memory.inner_loss_mask", "newly_revealed"],
                       "pmc, inner loss on newly revealed tokens"),
    "pre_only": ([*PAPER, "--memory.masking_strategy", "pre_only", "--memory.num_inner_steps", "1"],
                 "one inner step on the pre-anchor state, student_masked (the default since this study)"),
    "distill": ([*PAPER, "--memory.inner_loss", "distill"], "pmc, KL(teacher || student) inner loss"),
    "leak_free": ([*PAPER, "--memory.leak_free", "true"], "pmc, inner losses never score the outer loss's positions"),
    "probability_0.5": ([*PAPER, "--memory.probability", "0.5"], "pmc on half of the steps, plain MDLM on the others"),
    "base_weight_1": ([*PAPER, "--memory.base_weight", "1.0"], "pmc, plus the MDLM loss without fast weights"),
}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _common(args) -> list[str]:
    return ["--data.path", str(args.data), "--eval.every", str(args.eval_every), "--eval.num_samples",
            str(args.eval_samples), "--eval.context_fraction", "0.5", "--checkpoint.every", "50",
            "--checkpoint.keep", "1", "--logging.wandb", "false", "--logging.progress_bar", "false",
            "--train.num_threads", str(args.threads)]


def prepare(args) -> Path:
    """The bundled corpus prepared as the default run prepares it (seq 128, BPE 4096, 2% held out)."""
    from data_pipeline.source import resolve_dataset

    root, _ = resolve_dataset("", "", 128, 4096, str(args.out / "cache"), prepare=True, val_fraction=0.02)
    return root


def flops_per_step(variant_options: list[str], seed: int, steps: int, args) -> list[float]:
    """Executed FLOPs of each of the first ``steps`` optimizer steps of a run (from its masks alone)."""
    from data_pipeline.loader import ReaderOptions, open_batches
    from data_pipeline.mixture import Source
    from data_pipeline.readers import MaskingSpec
    from data_pipeline.shards import read_manifest
    from launch.config_cli import build_config
    from pretrain.memdlm.bilevel import uses_memory_at
    from pretrain.train.flops import executed_flops

    cfg = build_config([*_common(args), *variant_options, "--train.seed", str(seed)])
    manifest = read_manifest(args.data)
    spec = MaskingSpec(seed, cfg.memory.trajectory, cfg.diffusion.eps, cfg.model.seq_len, cfg.model.vocab_size)
    reader = ReaderOptions(num_workers=0, shuffle=cfg.data.shuffle, num_canonical_nodes=cfg.data.num_canonical_nodes)
    micro, per_step = cfg.train.micro_batch_size, cfg.train.global_batch_size // cfg.train.micro_batch_size
    batches = iter(open_batches([Source("data", Path(args.data), manifest)], spec, micro, reader))
    flops = []
    for step in range(steps):
        memory_step = uses_memory_at(cfg.memory, seed, step)
        flops.append(sum(executed_flops(cfg.model, cfg.memory, micro, next(batches).row_counts,
                                        uses_memory=memory_step) for _ in range(per_step)))
    return flops


def mdlm_budget(seed: int, args) -> float:
    """Executed FLOPs of the MDLM run of ``seed`` (cached in ``steps.json``)."""
    cache = args.out / "steps.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    key = f"budget/{seed}/{args.budget_steps}"
    if key not in known:
        known[key] = sum(flops_per_step(VARIANTS["mdlm"][0], seed, args.budget_steps, args))
        cache.write_text(json.dumps(known, indent=1))
    return known[key]


def matched_steps(name: str, seed: int, budget: float, args) -> int:
    """The most steps of ``name`` whose executed FLOPs stay within ``budget``."""
    cache = args.out / "steps.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    key = f"{name}/{seed}/{args.budget_steps}"
    if key not in known:
        per_step = flops_per_step(VARIANTS[name][0], seed, 4 * args.budget_steps, args)
        total, steps = 0.0, 0
        while steps < len(per_step) and total + per_step[steps] <= budget * (1 + 1e-9):
            total += per_step[steps]
            steps += 1
        known[key] = steps
        cache.write_text(json.dumps(known, indent=1))
    return known[key]


def train(name: str, seed: int, steps: int, args) -> Path:
    folder = args.out / "runs" / name / f"seed{seed}"
    if (folder / "DONE").is_file():
        return folder
    _log(f"training {name} (seed {seed}) for {steps} steps")
    command = [sys.executable, "-m", "launch.pretrain_cli", *_common(args), *VARIANTS[name][0], "--train.seed",
               str(seed), "--train.steps", str(steps), "--train.out_dir", str(folder)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return folder


def niah(folder: Path, args) -> dict:
    path = folder / "niah.json"
    if path.is_file():
        return json.loads(path.read_text())
    from pretrain.eval.generation_config import GenerationConfig
    from pretrain.eval.inference import load_for_inference
    from pretrain.eval.niah import evaluate_suite, make_suite

    model = load_for_inference(folder, "cpu")
    suite = make_suite(model.encode, lengths=(args.niah_length,), per_cell=args.niah_per_cell, seed=1000)
    generation = GenerationConfig(length=8, steps=8)
    result = {mode: evaluate_suite(model, suite, generation, adapt, batch_size=8)["all"]
              for mode, adapt in (("base", False), ("adapted", True))}
    path.write_text(json.dumps(result))
    return result


def final_eval(folder: Path) -> dict:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    return {"step": evals[-1]["step"], "base": evals[-1]["eval_loss"], "adapted": evals[-1]["eval_adapted_loss"],
            "flops": sum(r["flops"] for r in records), "curve": [(r["step"], r["eval_loss"], r["eval_adapted_loss"])
                                                                  for r in evals]}


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(results: dict, args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"Compute-matched to {args.budget_steps} MDLM steps (executed FLOPs), seeds {args.seeds}; held-out "
             f"loss in nats/token on {args.eval_samples} validation samples (continuation given the first half); "
             "mean ± standard deviation over seeds.", "",
             "| variant | steps | held-out, base | held-out, adapted | adapted - base | NIAH base | NIAH adapted |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in results.items():
        base = [r["base"] for r in runs]
        adapted = [r["adapted"] for r in runs]
        gap = [a - b for a, b in zip(adapted, base)]
        steps = sorted({r["step"] for r in runs})
        lines.append(f"| {name} | {'/'.join(map(str, steps))} | {_mean_spread(base)} | {_mean_spread(adapted)} | "
                     f"{_mean_spread(gap)} | {_mean_spread([r['niah']['base'] for r in runs])} | "
                     f"{_mean_spread([r['niah']['adapted'] for r in runs])} |")
    text = "\n".join(lines) + "\n"
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for name, runs in results.items():
        for axis, index, label in ((axes[0], 1, "base"), (axes[1], 2, "adapted")):
            curves = [r["curve"] for r in runs]
            length = min(len(c) for c in curves)
            x = [curves[0][i][0] for i in range(length)]
            y = [statistics.mean(c[i][index] for c in curves) for i in range(length)]
            axis.plot(x, y, marker="o", markersize=3, label=name)
            axis.set(title=f"held-out loss, {label} (mean over seeds)", xlabel="step")
    axes[0].set_ylabel("nats / token")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "heldout.png", dpi=110)
    (args.out / "report.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/memory_variants"),
                        help="output folder, resumed from (default benchmarks/memory_variants)")
    parser.add_argument("--budget-steps", type=int, default=400, help="MDLM steps whose FLOPs every run gets")
    parser.add_argument("--seeds", default="1234,1235,1236", help="comma-separated training seeds")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--niah-length", type=int, default=112, help="NIAH context tokens (seq 128 holds 112 + 8)")
    parser.add_argument("--niah-per-cell", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20-step budget, one seed")
    args = parser.parse_args()
    if args.quick:
        args.budget_steps, args.seeds, args.eval_every, args.eval_samples, args.niah_per_cell = 20, "1234", 10, 16, 1
    args.seeds = [int(s) for s in args.seeds.split(",")]
    os.environ.setdefault("WANDB_MODE", "offline")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    args.data = prepare(args)
    results = {}
    for name in args.variants.split(","):
        results[name] = []
        for seed in args.seeds:
            budget = mdlm_budget(seed, args)
            steps = args.budget_steps if name == "mdlm" else matched_steps(name, seed, budget, args)
            folder = train(name, seed, steps, args)
            results[name].append({**final_eval(folder), "niah": niah(folder, args), "seed": seed})
            _log(f"{name} seed {seed}: {steps} steps, held-out base {results[name][-1]['base']:.3f}, "
                 f"adapted {results[name][-1]['adapted']:.3f}")
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(report(results, args))
    _log(f"done in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
