"""Cost of the MemDLM bi-level step against the plain MDLM step, in one run: time, FLOPs, MFU, peak memory.

Presets:
- ``small`` (CPU default): hidden 256, 10 layers, FFN 1536, vocab 8192 (18.6M parameters), sequence 256,
  batch 8, fp32;
- ``moe-small``: the same shape with 9 mixture-of-experts layers (8 experts of width 384, top 2 by sigmoid
  scores in 2 groups, a shared expert of width 384, a dense first layer), fast weights on the shared expert;
- ``1b`` (GPU): a Llama-shaped ~1B model, hidden 2048, 16 layers, 16 heads, FFN 5632, vocab 32000,
  sequence 2048, bf16, activation recomputation; the micro-batch is the largest that fits (memory on,
  with recomputation) unless ``--batch`` is given.

A "step" is the loss and its backward (what the bi-level step changes); the optimizer update is the
same for both and left out. MDLM and MemDLM steps are interleaved after a warm-up; medians.

Figures: executed FLOPs (``pretrain.train.flops.executed_flops``, equal to torch's FLOP counter) and model
FLOPs (the plain MDLM convention, ``6 N + 12 L l h`` per token, bidirectional attention), both as MFU
against the device's peak (data-sheet bf16 peak on known GPUs, else a 2048^3 matmul measured in the
same run); tokens/s; peak memory of one step with memory on and off, with and without recomputation
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: the torch profiler's memory timeline, tensors only).

Usage: python benchmarks/step_cost.py [--device cpu|cuda] [--preset small|moe-small|1b] [--batch N] [--rounds 12]
       [--recompute none|full|selective] [--seq-len N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import matmul_rate, median, peak_step_memory, time_call  # noqa: E402
from data_pipeline.masking import build_masked_batch  # noqa: E402
from parallel.collectives import LossNormalizer  # noqa: E402
from parallel.topology import initialize_topology, shutdown_topology  # noqa: E402
from pretrain.config import MemoryConfig, ModelConfig, RunConfig, TrainConfig, computes_in_bf16  # noqa: E402
from pretrain.model.transformer import count_parameters  # noqa: E402
from pretrain.train.cpu_memory import keep_freed_memory  # noqa: E402
from pretrain.train.factory import build_bilevel_step, build_model  # noqa: E402
from pretrain.train.flops import executed_flops, model_flops_per_token, peak_flops  # noqa: E402

PRESETS = {
    "small": dict(model=dict(vocab_size=8192, hidden_size=256, num_layers=10, num_heads=4, ffn_hidden_size=1536,
                             seq_len=256), batch=8, precision="fp32", recompute="none"),
    "1b": dict(model=dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16, ffn_hidden_size=5632,
                          seq_len=2048), batch=0, precision="bf16", recompute="full"),
    # A small mixture of experts (LLaDA2-shaped: sigmoid router, groups, a shared expert, a dense first layer);
    # the fast weights sit on the last layer's routed experts and shared expert (--moe-targets to choose).
    "moe-small": dict(model=dict(vocab_size=8192, hidden_size=256, num_layers=10, num_heads=4, ffn_hidden_size=1536,
                                 seq_len=256, moe_num_experts=8, moe_top_k=2, moe_ffn_hidden_size=384,
                                 moe_shared_ffn_hidden_size=384, moe_score="sigmoid", moe_num_groups=2,
                                 moe_topk_groups=1, moe_routed_scaling=2.5, moe_first_dense_layers=1),
                      batch=8, precision="fp32", recompute="none"),
}


class Bench:
    """Both steps on one model, and batches with several draws of t (a step's cost depends on them)."""

    def __init__(self, cfg: ModelConfig, precision: str, recompute: str, topology, batch: int, num_batches: int,
                 moe_targets: str = "routed,shared"):
        self.cfg, self.topology, self.batch = cfg, topology, batch
        # The paper's recipe (pmc, K = 2), whose cost RESULTS.md reports; the batches below carry its states.
        paper = dict(masking_strategy="pmc", num_inner_steps=2, moe_targets=moe_targets)
        self.runs = {name: RunConfig(model=cfg, memory=MemoryConfig(enabled=enabled, **paper),
                                     train=TrainConfig(seed=0, precision=precision, recompute=recompute))
                     for name, enabled in (("mdlm", False), ("memdlm", True))}
        self.model = build_model(self.runs["mdlm"], topology)
        # fp8 spares the layers with fast weights, so the MemDLM step has its own model (same weights)
        self.models = {"mdlm": self.model,
                       "memdlm": build_model(self.runs["memdlm"], topology) if precision == "fp8" else self.model}
        self.steps = {name: build_bilevel_step(run, self.models[name], topology, cfg.vocab_size - 1)
                      for name, run in self.runs.items()}
        rng = np.random.default_rng(0)
        self.batches = []
        for index in range(num_batches):
            ids = rng.integers(0, cfg.vocab_size - 1, size=(batch, cfg.seq_len))
            masked = build_masked_batch(ids, np.arange(index * batch, (index + 1) * batch), seed=0, epoch=0,
                                        num_inner_steps=2, pre_anchor_scale=1.5)
            self.batches.append((masked.to(topology.device), LossNormalizer.of([masked.maskable]).to(topology.device)))

    def run(self, name: str, index: int) -> None:
        batch, normalizer = self.batches[index % len(self.batches)]
        self.steps[name](batch, normalizer, step=index).loss.backward()
        self.models[name].zero_grad(set_to_none=True)

    def compile(self) -> None:
        """``--train.compile`` on this bench's model(s)."""
        for model in {id(m): m for m in self.models.values()}.values():
            model.compile_blocks()

    def executed(self, name: str) -> float:
        run = self.runs[name]
        counts = [b.row_counts if run.memory.enabled else b.row_counts[-1:] for b, _ in self.batches]
        flops = [executed_flops(self.cfg, run.memory, self.batch, c, run.train.recompute) for c in counts]
        return sum(flops) / len(counts)

    def set_recompute(self, mode: str) -> None:
        for name, step in self.steps.items():
            step.recompute = mode
            self.runs[name].train.recompute = mode


def fit_batch(bench: Bench, candidates=(32, 24, 16, 12, 8, 6, 4, 3, 2, 1)) -> int:
    """Cut ``bench``'s batches to the largest micro-batch whose MemDLM step fits on the GPU (one step per
    try, largest first; the model is built once)."""
    full = bench.batches
    for batch in (c for c in candidates if c <= bench.batch):
        bench.batches = [(b.select(slice(0, batch)), None) for b, _ in full]
        bench.batches = [(b, LossNormalizer.of([b.maskable])) for b, _ in bench.batches]
        try:
            bench.run("memdlm", 0)
            torch.cuda.synchronize()
            bench.batch = batch
            return batch
        except torch.cuda.OutOfMemoryError:
            bench.models["memdlm"].zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    raise RuntimeError("not even a micro-batch of 1 fits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--preset", default="", choices=["", *PRESETS], help="model (default: small on CPU, 1b on GPU)")
    parser.add_argument("--batch", type=int, default=-1,
                        help="micro-batch (default: the preset's; 0 = largest that fits)")
    parser.add_argument("--precision", default="", choices=["", "fp32", "bf16", "fp8"], help="default: the preset's")
    parser.add_argument("--recompute", default="", choices=["", "none", "full", "selective"],
                        help="recomputation for the timed steps (default: the preset's)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds (one step of each per round)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    parser.add_argument("--num-batches", type=int, default=4, help="distinct batches (draws of t) cycled through")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--moe-targets", default="routed,shared", choices=["routed,shared", "routed", "shared"],
                        help="an MoE preset's fast-weight placement (--memory.moe_targets)")
    parser.add_argument("--memory-batch", type=int, default=0,
                        help="micro-batch of the memory table (default: the timed one; smaller lets every "
                             "recomputation mode fit)")
    parser.add_argument("--memory-rounds", type=int, default=3,
                        help="steps timed for each recomputation mode in the memory table")
    parser.add_argument("--seq-len", type=int, default=0,
                        help="tokens per sequence instead of the preset's (long context: with --batch 1)")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()

    preset = PRESETS[args.preset or ("1b" if args.device == "cuda" else "small")]
    precision = args.precision or preset["precision"]
    recompute = args.recompute or preset["recompute"]
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        keep_freed_memory()
    topology = initialize_topology(args.device)
    device = topology.device
    cfg = ModelConfig(**{**preset["model"], **({"seq_len": args.seq_len} if args.seq_len else {})})
    batch = preset["batch"] if args.batch < 0 else args.batch
    search = batch == 0 and device.type == "cuda"
    bench = Bench(cfg, precision, recompute, topology, 32 if search else (batch or 8), args.num_batches,
                  args.moe_targets)
    if search:
        batch = fit_batch(bench)
    batch = bench.batch
    peak, peak_source = peak_flops(device, computes_in_bf16(precision))
    tokens = batch * cfg.seq_len
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{count_parameters(bench.model) / 1e6:.1f}M parameters, micro-batch {batch} x seq {cfg.seq_len}, "
          f"{precision}, recompute {recompute}; peak {peak / 1e12:.1f} TFLOP/s ({peak_source})", flush=True)

    for i in range(args.warmup):
        for name in bench.steps:
            bench.run(name, i)
    times = {name: [] for name in bench.steps}
    rates = []
    for i in range(args.rounds):
        if device.type == "cpu":
            rates.append(matmul_rate(device, repeats=3))
        for name in bench.steps:
            times[name].append(time_call(lambda: bench.run(name, i), device))
    results = {"device": str(device), "parameters": count_parameters(bench.model), "batch": batch,
               "seq_len": cfg.seq_len, "precision": precision, "recompute": recompute, "peak_flops": peak,
               "peak_source": peak_source}
    model_flops = model_flops_per_token(cfg) * tokens
    for name in bench.steps:
        seconds = median(times[name])
        executed = bench.executed(name)
        results[name] = {"seconds": seconds, "min_seconds": min(times[name]), "tokens_per_s": tokens / seconds,
                         "executed_flops": executed, "mfu_total": executed / seconds / peak,
                         "mfu_model": model_flops / seconds / peak}
        print(f"{name:>6} step: median {seconds * 1e3:8.1f} ms over {args.rounds} (min {min(times[name]) * 1e3:.1f}), "
              f"{tokens / seconds:9.0f} tokens/s, executed {executed / 1e12:7.3f} TFLOP -> mfu_total "
              f"{executed / seconds / peak:5.1%}, model {model_flops / 1e12:.3f} TFLOP -> mfu_model "
              f"{model_flops / seconds / peak:5.1%}", flush=True)
    if rates:
        print(f"fp32 matmul 2048^3 during the rounds: median {median(rates) / 1e9:.1f} GFLOP/s "
              f"(range {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f})")
    per_round = [m / d for m, d in zip(times["memdlm"], times["mdlm"])]
    results["time_ratio"] = median(times["memdlm"]) / median(times["mdlm"])
    results["executed_flop_ratio"] = results["memdlm"]["executed_flops"] / results["mdlm"]["executed_flops"]
    print(f"executed FLOP ratio memdlm/mdlm: {results['executed_flop_ratio']:.3f}")
    print(f"per-round ratios: median {median(per_round):.3f}, range {min(per_round):.3f}-{max(per_round):.3f}")
    print(f"memdlm/mdlm step time ratio: {results['time_ratio']:.3f}", flush=True)

    if not args.no_memory:
        memory = {}
        if args.memory_batch and args.memory_batch < batch:  # the first sequences of the same batches
            bench.batches = [(b.select(slice(0, args.memory_batch)), None) for b, _ in bench.batches]
            bench.batches = [(b, LossNormalizer.of([b.maskable])) for b, _ in bench.batches]
        results["memory_batch"] = args.memory_batch or batch
        for mode in ("none", recompute if recompute != "none" else "full"):
            bench.set_recompute(mode)
            for name in bench.steps:
                weights = sum(p.numel() * p.element_size() for p in bench.models[name].parameters())
                try:
                    memory[f"{name}/{mode}"] = peak_step_memory(lambda: bench.run(name, 0), device, weights)
                    memory[f"{name}/{mode}"]["seconds"] = median(
                        [time_call(lambda: bench.run(name, i), device) for i in range(args.memory_rounds)])
                except torch.cuda.OutOfMemoryError:
                    bench.models[name].zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    memory[f"{name}/{mode}"] = {"peak": float("nan"), "activations": float("nan"),
                                                "seconds": float("nan"), "error": "out of memory"}
        bench.set_recompute(recompute)
        results["peak_memory"] = memory
        print(f"\npeak memory of one step at micro-batch {results['memory_batch']} (weights and gradients included; "
              f"activations = peak - before), and the median time of {args.memory_rounds} steps:")
        print("| step | recompute | peak MiB | activations MiB | step ms |")
        print("| --- | --- | --- | --- | --- |")
        for key, value in memory.items():
            name, mode = key.split("/")
            print(f"| {name} | {mode} | {value['peak'] / 2**20:.0f} | {value['activations'] / 2**20:.0f} | "
                  f"{value['seconds'] * 1e3:.0f} |")
        for mode in sorted({k.split("/")[1] for k in memory}):
            on, off = memory[f"memdlm/{mode}"], memory[f"mdlm/{mode}"]
            print(f"memory on/off peak ratio, recompute {mode}: {on['peak'] / off['peak']:.3f} "
                  f"(activations {on['activations'] / max(off['activations'], 1):.3f})")
            results[f"memory_ratio/{mode}"] = on["peak"] / off["peak"]
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    shutdown_topology()


if __name__ == "__main__":
    main()
