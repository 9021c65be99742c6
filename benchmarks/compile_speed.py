"""Eager against compiled (``--train.compile``: inductor's fused kernels) against fp8 (GPU), side by side in one run.

Variants, each its own copy of the same model (same seed):
- ``eager``: the preset's precision (fp32 on CPU, bf16 on GPU), plain PyTorch kernels;
- ``compiled``: the same with ``compile_blocks()``: regional torch.compile, so inductor fuses each sub-block's
  elementwise chains (norms, rotary, SwiGLU, casts, residual adds) into generated kernels;
- ``fp8``: ``--train.precision fp8`` compiled (torchao's casts fuse into the same kernels; H100/H200 only);
- ``fp8-eager``: fp8 without compilation.

For each recomputation mode (``--recompute``, default ``none,selective,full``), the MDLM step and the MemDLM step
(the paper's pmc, K = 2, as ``step_cost.py``) of every variant run on the same batches, interleaved round by
round after a warm-up that pays the compilation (its time is printed). Figures: median step time, speed-up over
eager (of the medians, and per round), ``mfu_model`` (the MDLM convention, against the data-sheet bf16 peak on
known GPUs, else a matmul measured here), the MemDLM/MDLM ratio, and the step's peak memory above what was
allocated before it (CUDA: the allocator's counters; CPU: the torch profiler's memory timeline, tensors only).

Targets (issue #21): CPU, compiled MDLM step >= 1.15x eager, MemDLM/MDLM not worse than eager's; one H100 with
the ``1b`` preset in bf16, MDLM ``mfu_model`` >= 48% without recomputation and >= 40% with selective, MemDLM/MDLM
<= 1.45, fp8 MDLM step >= 1.25x bf16's.

Usage: python benchmarks/compile_speed.py [--device cpu|cuda] [--preset small|1b] [--batch N] [--rounds 8]
       [--variants eager,compiled[,fp8,fp8-eager]] [--recompute none,selective,full] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import matmul_rate, median, peak_step_memory, time_call  # noqa: E402
from benchmarks.step_cost import PRESETS, Bench  # noqa: E402
from parallel.topology import initialize_topology  # noqa: E402
from pretrain.config import ModelConfig, computes_in_bf16  # noqa: E402
from pretrain.train.cpu_memory import keep_freed_memory  # noqa: E402
from pretrain.train.flops import model_flops_per_token, peak_flops  # noqa: E402

VARIANTS = {"eager": (None, False), "compiled": (None, True), "fp8": ("fp8", True), "fp8-eager": ("fp8", False)}
STEPS = ("mdlm", "memdlm")


def _parse(text: str, allowed) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise SystemExit(f"compile_speed.py: unknown {unknown or text!r}; choose from {', '.join(allowed)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--preset", default="", choices=["", *PRESETS], help="default: small on CPU, 1b on GPU")
    parser.add_argument("--batch", type=int, default=0, help="micro-batch (default: the preset's, or 8)")
    parser.add_argument("--variants", default="", help="comma-separated, from: " + ", ".join(VARIANTS)
                        + " (default: eager,compiled on CPU; eager,compiled,fp8 on GPU)")
    parser.add_argument("--recompute", default="none,selective,full",
                        help="comma-separated recomputation modes, each measured in turn")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per mode (one step of each kind)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind per mode first")
    parser.add_argument("--num-batches", type=int, default=4, help="distinct batches cycled through")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()

    preset = PRESETS[args.preset or ("1b" if args.device == "cuda" else "small")]
    variants = _parse(args.variants or ("eager,compiled,fp8" if args.device == "cuda" else "eager,compiled"),
                      VARIANTS)
    modes = _parse(args.recompute, ("none", "selective", "full"))
    if args.device == "cpu" and any(VARIANTS[v][0] == "fp8" for v in variants):
        raise SystemExit("compile_speed.py: the fp8 variants need a GPU with fp8 matmuls (H100/H200)")
    if variants[0] != "eager":
        raise SystemExit("compile_speed.py: the first variant must be eager (the speed-ups are against it)")
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        keep_freed_memory()
    topology = initialize_topology(args.device)
    device = topology.device
    cfg = ModelConfig(**preset["model"])
    batch = args.batch or preset["batch"] or 8
    benches, skipped = {}, {}
    for name in variants:
        precision, compiled = VARIANTS[name]
        try:
            benches[name] = Bench(cfg, precision or preset["precision"], modes[0], topology, batch, args.num_batches)
        except Exception as err:  # e.g. fp8 on a GPU without it, or torchao missing: the other variants go on
            if name == "eager":
                raise
            skipped[name] = f"{type(err).__name__}: {err}"
            print(f"variant {name} skipped: {skipped[name]}", flush=True)
            continue
        if compiled:
            benches[name].compile()
    bf16 = computes_in_bf16(preset["precision"])
    peak, peak_source = peak_flops(device, bf16) if device.type == "cuda" else (matmul_rate(device), "fp32 matmul")
    tokens = batch * cfg.seq_len
    model_flops = model_flops_per_token(cfg) * tokens
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), micro-batch "
          f"{batch} x seq {cfg.seq_len}, {preset['precision']}, {args.threads} threads; peak {peak / 1e12:.2f} "
          f"TFLOP/s ({peak_source}); variants {', '.join(variants)}", flush=True)
    results = {"device": str(device), "batch": batch, "seq_len": cfg.seq_len, "precision": preset["precision"],
               "peak_flops": peak, "peak_source": peak_source, "skipped": skipped, "modes": {}}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    _write(results, args.json)
    # `timeout` stops a run with SIGTERM: exit as from Ctrl-C, keeping the modes already written
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"compile_speed.py: stopped; {args.json or 'nothing'} "
                                                      "holds the modes measured before"))
    for mode in modes:
        for bench in benches.values():
            bench.set_recompute(mode)
        for name, bench in list(benches.items()):
            start = time.perf_counter()
            try:
                for i in range(args.warmup):  # the first mode's warm-up compiles every variant of every sub-block
                    for kind in STEPS:
                        bench.run(kind, i)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            except Exception as err:  # a variant that fails to run (fp8 kernels, compilation) leaves the others
                if name == "eager":
                    raise
                skipped[name] = f"{type(err).__name__}: {err}"[:2000]
                print(f"variant {name} dropped: {skipped[name]}", flush=True)
                del benches[name]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            print(f"[{mode}] {name}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
        times = {(name, kind): [] for name in benches for kind in STEPS}
        for i in range(args.rounds):
            for (name, kind), values in times.items():
                values.append(time_call(lambda: benches[name].run(kind, i), device))
        memory = {}
        if not args.no_memory:
            for name, kind in times:
                measured = peak_step_memory(lambda: benches[name].run(kind, 0), device)
                memory[(name, kind)] = measured["activations"]
        results["modes"][mode] = _report(mode, times, memory, model_flops, peak, tokens)
        _write(results, args.json)  # after every mode, so a run stopped by a time limit keeps what it measured


def _write(results: dict, path: str) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


def _report(mode, times, memory, model_flops, peak, tokens) -> dict:
    names = list(dict.fromkeys(name for name, _ in times))
    eager = names[0]
    out = {}
    print(f"\nrecompute {mode}: median step ms, speed-up over {eager} (of the medians; per round: median, range), "
          "mfu_model, tokens/s, step memory (activations, gradients, temporaries)")
    for name in names:
        out[name] = {}
        for kind in STEPS:
            values, base = times[(name, kind)], times[(eager, kind)]
            seconds = median(values)
            per_round = [b / v for b, v in zip(base, values)]
            figures = {"seconds": seconds, "speedup": median(base) / seconds, "speedup_per_round_median":
                       median(per_round), "speedup_per_round_range": [min(per_round), max(per_round)],
                       "mfu_model": model_flops / seconds / peak, "tokens_per_s": tokens / seconds,
                       "memory_bytes": memory.get((name, kind))}
            out[name][kind] = figures
            mem = f"{figures['memory_bytes'] / 2**20:9.0f} MiB" if figures["memory_bytes"] is not None else "-"
            print(f"  {name:>9} {kind:>6}: {seconds * 1e3:9.1f} ms  x{figures['speedup']:.3f} (per round "
                  f"{median(per_round):.3f}, {min(per_round):.3f}-{max(per_round):.3f})  mfu_model "
                  f"{figures['mfu_model']:6.1%}  {tokens / seconds:9.0f} tokens/s  {mem}")
        out[name]["ratio"] = out[name]["memdlm"]["seconds"] / out[name]["mdlm"]["seconds"]
    print("  MemDLM/MDLM step time: " + ", ".join(f"{name} {out[name]['ratio']:.3f}" for name in names), flush=True)
    return out


if __name__ == "__main__":
    main()
