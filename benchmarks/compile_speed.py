"""Compiled (``--train.compile``: regional torch.compile of the sub-blocks) against eager, in one run.

Two copies of the same model (same seed): one eager, one with ``compile_blocks()``; the MDLM step and the
MemDLM step (the paper's pmc, K = 2, as ``step_cost.py``) on the same batches, interleaved round by round
after a warm-up that pays the compilation (its time is printed). Medians; the per-round ratios too (the
machine is noisy). Presets as ``step_cost.py`` (``small`` on CPU, ``1b`` on GPU).

Targets (issue #21): CPU, compiled MDLM step >= 1.15x eager, MemDLM/MDLM ratio not worse than eager's.

Usage: python benchmarks/compile_speed.py [--device cpu|cuda] [--preset small|1b] [--batch N] [--rounds 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import median, time_call  # noqa: E402
from benchmarks.step_cost import PRESETS, Bench  # noqa: E402
from parallel.topology import initialize_topology  # noqa: E402
from pretrain.config import ModelConfig  # noqa: E402
from pretrain.train.cpu_memory import keep_freed_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--preset", default="", choices=["", *PRESETS], help="default: small on CPU, 1b on GPU")
    parser.add_argument("--batch", type=int, default=0, help="micro-batch (default: the preset's, or 8)")
    parser.add_argument("--recompute", default="", choices=["", "none", "full", "selective"],
                        help="recomputation (default: the preset's)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (one step of each kind per round)")
    parser.add_argument("--num-batches", type=int, default=4, help="distinct batches cycled through")
    args = parser.parse_args()

    preset = PRESETS[args.preset or ("1b" if args.device == "cuda" else "small")]
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        keep_freed_memory()
    topology = initialize_topology(args.device)
    cfg = ModelConfig(**preset["model"])
    batch = args.batch or preset["batch"] or 8
    recompute = args.recompute or preset["recompute"]
    benches = {"eager": Bench(cfg, preset["precision"], recompute, topology, batch, args.num_batches),
               "compiled": Bench(cfg, preset["precision"], recompute, topology, batch, args.num_batches)}
    benches["compiled"].model.compile_blocks()
    print(f"device {topology.device}, micro-batch {batch} x seq {cfg.seq_len}, {preset['precision']}, "
          f"recompute {recompute}, {args.threads} threads", flush=True)
    start = time.perf_counter()
    for i in range(2):  # every variant of every sub-block is compiled in the first steps
        for name in ("mdlm", "memdlm"):
            benches["compiled"].run(name, i)
    print(f"compilation (first two steps of each kind): {time.perf_counter() - start:.1f} s", flush=True)
    for i in range(2):
        for name in ("mdlm", "memdlm"):
            benches["eager"].run(name, i)
    times = {(mode, name): [] for mode in benches for name in ("mdlm", "memdlm")}
    for i in range(args.rounds):
        for (mode, name), values in times.items():
            values.append(time_call(lambda: benches[mode].run(name, i), topology.device))
    for (mode, name), values in times.items():
        print(f"{mode:>8} {name:>6} step: median {median(values) * 1e3:8.1f} ms (min {min(values) * 1e3:.1f})")
    for name in ("mdlm", "memdlm"):
        eager, compiled = times[("eager", name)], times[("compiled", name)]
        per_round = [e / c for e, c in zip(eager, compiled)]
        print(f"{name:>6} speed-up compiled/eager: {median(eager) / median(compiled):.3f}"
              f" (per round: median {median(per_round):.3f}, range {min(per_round):.3f}-{max(per_round):.3f})")
    for mode in benches:
        ratio = median(times[(mode, "memdlm")]) / median(times[(mode, "mdlm")])
        print(f"MemDLM/MDLM step time, {mode}: {ratio:.3f}")


if __name__ == "__main__":
    main()
