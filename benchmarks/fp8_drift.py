"""fp8 against bf16 over a training run: the loss difference ``--train.precision fp8`` makes (issue #21).

The same ``memdlm-pretrain`` run twice (same seed, data order and masks; MemDLM with the default memory) on the
bundled corpus, once per precision, both at once on one GPU (the figures are losses, not times; the second
starts once the first has its data ready). The model is
the ``1b`` preset's shape (hidden 2048, 16 layers, 16 heads, FFN 5632, sequence 2048; its vocabulary is the
bundled tokenizer's). Printed and written to ``--json``: the mean and largest relative difference of the
training loss step by step, the means over the last quarter of the steps, and the held-out losses (base and
adapted) every ``--eval-every`` steps.

``--small`` runs the default model for a few steps (a check of this script on a CPU: ``--precisions fp32,fp32``).

Usage: python benchmarks/fp8_drift.py [--steps 200] [--precisions bf16,fp8] [--out DIR] [--json FILE] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAPE_1B = ["--model.hidden_size", "2048", "--model.num_layers", "16", "--model.num_heads", "16",
            "--model.ffn_hidden_size", "5632", "--model.seq_len", "2048"]


def _read(run_dir: Path) -> list[dict]:
    """The run's records (memdlm-plot's reader: a line cut short by a killed run is passed over); none yet: []."""
    from common.errors import UsageError
    from pretrain.train.plots import read_run_metrics

    try:
        return read_run_metrics(run_dir)
    except UsageError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of each run")
    parser.add_argument("--precisions", default="bf16,fp8", help="the reference run's precision, then the other's")
    parser.add_argument("--batch", type=int, default=4, help="global (= micro) batch, sequences")
    parser.add_argument("--eval-every", type=int, default=100, help="held-out loss every N steps")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where both runs train")
    parser.add_argument("--out", default="fp8_drift_runs", help="the runs' directories go here (replaced)")
    parser.add_argument("--cache", default="", help="--data.cache_dir of the runs (default: the CLI's)")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    parser.add_argument("--small", action="store_true", help="the default model instead of the 1b shape")
    args = parser.parse_args()

    reference, other = args.precisions.split(",")
    names = (reference, other) if reference != other else (f"{reference}-a", f"{other}-b")
    out = Path(args.out).resolve()
    common = ["--train.steps", str(args.steps), "--train.device", args.device,
              "--train.global_batch_size", str(args.batch), "--train.micro_batch_size", str(args.batch),
              "--eval.every", str(args.eval_every), "--eval.num_samples", "16", "--eval.micro_batch_size", "4",
              "--logging.progress_bar", "false", "--logging.every", "10", "--train.resume", "false",
              *(["--data.cache_dir", args.cache] if args.cache else []),
              *([] if args.small else SHAPE_1B)]
    runs = {}
    for index, precision in enumerate((reference, other)):
        run_dir = out / f"{index}-{precision}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        command = [sys.executable, "-m", "launch.pretrain_cli", *common, "--train.precision", precision,
                   "--train.out_dir", str(run_dir)]
        log = run_dir.with_suffix(".log")
        process = subprocess.Popen(command, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                   env={**os.environ, "WANDB_MODE": "disabled"})
        runs[(index, precision)] = (process, run_dir)
        while index == 0 and process.poll() is None and not re.search(r"(^|\n)model: ", log.read_text()):
            time.sleep(1)  # the first run prepares the corpus (first use); the second then finds it ready
    # `timeout` stops this script with SIGTERM: the runs are killed and what they logged is still compared
    signal.signal(signal.SIGTERM, lambda *_: [process.kill() for process, _ in runs.values()])
    codes = {name: process.wait() for name, (process, _) in zip(names, runs.values())}
    metrics = []
    for name, (_, run_dir) in zip(names, runs.values()):
        path = run_dir / "metrics.jsonl"
        metrics.append(_read(run_dir))
        if args.json and path.is_file():  # kept beside the figures (the runs' folders are deleted after)
            shutil.copy(path, Path(args.json).with_name(f"fp8_drift_{name}_metrics.jsonl"))
    ref_metrics, other_metrics = metrics
    ref_loss = {m["step"]: m["loss"] for m in ref_metrics}
    other_loss = {m["step"]: m["loss"] for m in other_metrics}
    steps = sorted(set(ref_loss) & set(other_loss))
    if not steps:
        raise SystemExit(f"fp8_drift.py: no step logged by both runs (exit codes {codes}; see the logs in {out})")
    relative = [abs(other_loss[s] - ref_loss[s]) / abs(ref_loss[s]) for s in steps]
    tail = steps[-max(1, len(steps) // 4):]
    evals = {s: {f"{name}_{key}": m.get(key) for name, metrics in zip(names, (ref_metrics, other_metrics))
                 for m in metrics if m["step"] == s for key in ("eval_loss", "eval_adapted_loss")}
             for s in sorted({m["step"] for m in ref_metrics if "eval_loss" in m})}
    results = {"reference": reference, "other": other, "steps": len(steps), "batch": args.batch,
               "complete": all(code == 0 for code in codes.values()) and len(steps) == args.steps,
               "exit_codes": codes,
               "mean_relative_loss_difference": sum(relative) / len(relative),
               "max_relative_loss_difference": max(relative),
               "last_quarter_mean_loss": {names[0]: sum(ref_loss[s] for s in tail) / len(tail),
                                          names[1]: sum(other_loss[s] for s in tail) / len(tail)},
               "held_out": evals}
    print(f"{other} against {reference} over {len(steps)} steps (batch {args.batch}): training loss relative "
          f"difference mean {results['mean_relative_loss_difference']:.2%}, largest "
          f"{results['max_relative_loss_difference']:.2%}; mean loss over the last {len(tail)} steps: "
          + ", ".join(f"{k} {v:.4f}" for k, v in results["last_quarter_mean_loss"].items()))
    for step, losses in evals.items():
        print(f"  held-out at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items() if v is not None))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
