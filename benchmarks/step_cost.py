"""Cost of the MemDLM bi-level step against the plain MDLM step, in one run.

Model: hidden 256, 10 layers, FFN 1536, vocab 8192 (about 18.6M parameters), sequence 256,
batch 8, fp32. A "step" here is the loss and its backward (what the bi-level step changes);
the optimizer update is the same for both and left out.

Timing: warm-up steps, then MDLM and MemDLM steps interleaved, medians. The fp32 matmul
rate (2048^3) is measured in the same run, before and after the steps.

FLOP counts, both printed:
- executed: what the step runs, counted by ``torch.utils.flop_counter`` (matmuls, batched
  matmuls and attention, forward and backward; the LM head runs on masked rows only);
- model: the usual ``3 x forward`` of an MDLM step with the head on every token,
  forward = ``2 * tokens * (layer matmul params + hidden * vocab) + 4 * tokens * seq * hidden * layers``
  (the convention the reference figures use).

Usage: python benchmarks/step_cost.py [--device cpu|cuda] [--threads 2] [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import count_flops, matmul_rate, median, time_call  # noqa: E402
from data_pipeline.masking import build_masked_batch  # noqa: E402
from parallel.topology import initialize_topology, shutdown_topology  # noqa: E402
from parallel.collectives import LossNormalizer  # noqa: E402
from pretrain.config import MemoryConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from pretrain.cpu_memory import keep_freed_memory  # noqa: E402
from pretrain.factory import build_model, build_step  # noqa: E402
from pretrain.model import count_parameters  # noqa: E402


def model_flops(cfg: ModelConfig, tokens: int) -> float:
    h, f, layers = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    layer_params = 4 * h * h + 3 * h * f
    forward = 2 * tokens * (layers * layer_params + h * cfg.vocab_size) + 4 * tokens * cfg.seq_len * h * layers
    return 3.0 * forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds (one step of each per round)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--num-batches", type=int, default=4, help="distinct batches (draws of t) cycled through")
    parser.add_argument("--no-keep-freed-memory", action="store_true",
                        help="leave glibc's default of returning large freed blocks to the OS")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.device == "cpu" and not args.no_keep_freed_memory:
        keep_freed_memory()
    topology = initialize_topology(args.device)
    device = topology.device
    cfg = ModelConfig(vocab_size=8192, hidden_size=256, num_layers=10, num_heads=4, ffn_hidden_size=1536, seq_len=256)
    runs = {name: RunConfig(model=cfg, memory=MemoryConfig(enabled=enabled), train=TrainConfig(seed=0))
            for name, enabled in (("mdlm", False), ("memdlm", True))}
    model = build_model(runs["mdlm"], topology)  # one model, two steps
    steps = {name: build_step(run, model, topology, cfg.vocab_size - 1) for name, run in runs.items()}

    # Several batches, cycled through by both steps alike: the cost of a step depends on how
    # many tokens its t's mask, so one batch of 8 would measure one draw of t, not the average.
    rng = np.random.default_rng(0)
    batches = []
    for index in range(args.num_batches):
        ids = rng.integers(0, cfg.vocab_size - 1, size=(args.batch, cfg.seq_len))
        sample_index = np.arange(index * args.batch, (index + 1) * args.batch)
        batch = build_masked_batch(ids, sample_index, seed=0, epoch=0, num_inner_steps=2, pre_anchor_scale=1.5)
        batches.append((batch.to(device), LossNormalizer.of([batch.maskable]).to(device)))

    def run(name: str, step: int) -> None:
        batch, normalizer = batches[step % len(batches)]
        result = steps[name](batch, normalizer, step=step)
        result.loss.backward()
        model.zero_grad(set_to_none=True)

    print(f"device: {device}, threads: {torch.get_num_threads()}, params: {count_parameters(model) / 1e6:.1f}M, "
          f"batch {args.batch} x seq {cfg.seq_len}, fp32")
    for i in range(args.warmup):
        for name in steps:
            run(name, i)
    times = {name: [] for name in steps}
    rates = []
    for i in range(args.rounds):
        rates.append(matmul_rate(device, repeats=3))
        for name in steps:
            times[name].append(time_call(lambda: run(name, i), device))
    rate = median(rates)
    # FLOPs per step averaged over the batches, as the timing is.
    flops = {name: sum(count_flops(lambda: run(name, i)) for i in range(len(batches))) / len(batches)
             for name in steps}
    tokens = args.batch * cfg.seq_len
    mdlm_model_flops = model_flops(cfg, tokens)

    print(f"fp32 matmul 2048^3: median {rate / 1e9:.1f} GFLOP/s over {len(rates)} rounds "
          f"(range {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f})")
    anchor = sum(int(b.anchor_mask.sum()) for b, _ in batches) / len(batches)
    pre = sum(int(b.pre_anchor_masks[0].sum()) for b, _ in batches) / len(batches)
    print(f"masked rows per step (mean of {len(batches)} batches): anchor {anchor:.0f}, pre-anchor {pre:.0f} "
          f"of {tokens} tokens")
    for name in steps:
        seconds = median(times[name])
        executed = flops[name] / seconds
        line = (f"{name:>6} step: median {seconds * 1e3:7.1f} ms over {args.rounds} "
                f"(min {min(times[name]) * 1e3:.1f}), executed {flops[name] / 1e9:6.1f} GFLOP "
                f"-> {executed / 1e9:6.1f} GFLOP/s = {executed / rate:5.1%} of matmul")
        if name == "mdlm":
            line += (f"; model FLOPs {mdlm_model_flops / 1e9:.1f} GFLOP -> "
                     f"{mdlm_model_flops / seconds / rate:5.1%} of matmul")
        print(line)
    print(f"executed FLOP ratio memdlm/mdlm: {flops['memdlm'] / flops['mdlm']:.3f}")
    print(f"tokens/s: mdlm {tokens / median(times['mdlm']):.0f}, memdlm {tokens / median(times['memdlm']):.0f}")
    per_round = [m / d for m, d in zip(times["memdlm"], times["mdlm"])]
    print(f"per-round ratios: median {median(per_round):.3f}, range {min(per_round):.3f}-{max(per_round):.3f}")
    print(f"memdlm/mdlm step time ratio: {median(times['memdlm']) / median(times['mdlm']):.3f}")
    shutdown_topology()


if __name__ == "__main__":
    main()
