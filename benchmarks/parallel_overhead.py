"""Data-parallel overhead and memory, in one run.

1. Step time: one process doing the whole global batch (2 micro-batches, all threads) against
   2 data-parallel ranks with DeepSpeed ZeRO 1 (one micro-batch each, threads split).
2. Memory per rank for ZeRO 0/1/2/3 on 2 ranks: the model states a rank holds (its parameters,
   gradients and optimizer state, counted tensor by tensor) and, on CUDA, the peak allocated
   memory; on CPU also the process's peak resident set size (it includes the interpreter and
   libraries, so only the differences between stages mean much).

Model: the default run's (6.9M parameters, seq 128), memory on, global batch 16, fp32 on
CPU (gloo) or bf16 on CUDA (nccl).

Usage: python benchmarks/parallel_overhead.py [--device cpu|cuda] [--steps 6]
(on CUDA, 2 ranks need 2 GPUs; with one GPU only the single-process figures are printed)
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

GLOBAL_BATCH = 16


def _batches(cfg, rank_batches: int, first: int):
    from data_pipeline.masking import build_masked_batch

    out = []
    for i in range(rank_batches):
        ids = np.random.default_rng(first + i).integers(0, cfg.model.vocab_size - 1,
                                                        size=(cfg.train.micro_batch_size, cfg.model.seq_len))
        index = np.arange(cfg.train.micro_batch_size) + (first + i) * cfg.train.micro_batch_size
        out.append(build_masked_batch(ids, index, seed=0, epoch=0, num_inner_steps=2, pre_anchor_scale=1.5))
    return out


def _model_state_bytes(engine) -> int:
    """Bytes of parameters, gradients and optimizer state this rank holds."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel() > 0:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in engine.model.parameters():
        add(getattr(p, "ds_tensor", p.data))
        add(p.grad)
    # DeepSpeed's ZeRO optimizer wraps the torch one; the other engines hold an OuterOptimizer.
    optimizer = getattr(engine, "deepspeed_optimizer", None) or engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        for value in state.values():
            add(value)
    for group in inner.param_groups:
        for p in group["params"]:
            add(p.data)
            add(p.grad)
    for name in ("averaged_gradients", "single_partition_of_fp32_groups", "bit16_groups_flat",
                 "fp32_partitioned_groups_flat", "ipg_buffer"):
        value = getattr(optimizer, name, None)
        values = value.values() if isinstance(value, dict) else (value or [])
        for t in values:
            for item in (t if isinstance(t, (list, tuple)) else [t]):
                add(item)
    return total


def _run(rank, world, port, out_dir, device_name, zero_stage, steps, threads):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from parallel.topology import initialize_topology, shutdown_topology
    from pretrain.config import ParallelConfig, RunConfig, TrainConfig
    from pretrain.train.factory import build_training, check_run_layout

    micro = GLOBAL_BATCH // 2
    cfg = RunConfig(train=TrainConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=micro,
                                      precision="bf16" if device_name == "cuda" else "fp32"),
                    parallel=ParallelConfig(zero_stage=zero_stage))
    topology = initialize_topology(device_name, 1, 1, cfg.model.num_layers)
    device = topology.device
    check_run_layout(cfg, topology.world_size)  # what the trainer checks at a start
    engine = build_training(cfg, topology, cfg.model.vocab_size - 1).engine
    per_rank = GLOBAL_BATCH // (micro * world)
    batches = [b.to(device) for b in _batches(cfg, per_rank, rank * per_rank)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.train_step(batches, step, 1e-4)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    result = {
        "seconds": statistics.median(times),
        "model_state_mb": _model_state_bytes(engine) / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    shutdown_topology()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def measure(world, device_name, zero_stage, steps, threads):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_run, args=(world, port, out_dir, device_name, zero_stage, steps, threads),
                           nprocs=world, start_method="spawn")
        return [pickle.loads(Path(out_dir, f"rank{r}.pkl").read_bytes()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration")
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    ranks = 2 if args.device == "cpu" or torch.cuda.device_count() >= 2 else 1

    single = measure(1, args.device, 0, args.steps, cores)[0]
    print(f"device {args.device}; global batch {GLOBAL_BATCH} x 128 tokens, default model, memory on")
    print(f"1 process, 2 micro-batches of 8 ({cores} threads): {single['seconds'] * 1e3:.0f} ms/step, "
          f"model states {single['model_state_mb']:.1f} MB"
          + (f", peak CUDA {single['peak_cuda_mb']:.0f} MB" if single["peak_cuda_mb"] else ""))
    if ranks < 2:
        print("only one GPU: the 2-rank figures need two")
        return
    rows = []
    for zero_stage in (0, 1, 2, 3):
        results = measure(2, args.device, zero_stage, args.steps, max(1, cores // 2))
        rows.append((zero_stage, results))
    print("\n| layout | step ms (median, rank 0) | model states per rank MB | peak RSS per rank MB | peak CUDA MB |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| 1 process | {single['seconds'] * 1e3:.0f} | {single['model_state_mb']:.1f} | "
          f"{single['peak_rss_mb']:.0f} | {single['peak_cuda_mb'] or '-'} |")
    for zero_stage, results in rows:
        states = " / ".join("%.1f" % r["model_state_mb"] for r in results)
        rss = " / ".join("%.0f" % r["peak_rss_mb"] for r in results)
        cuda = " / ".join("%.0f" % r["peak_cuda_mb"] if r["peak_cuda_mb"] else "-" for r in results)
        print(f"| DP=2 ZeRO {zero_stage} | {results[0]['seconds'] * 1e3:.0f} | {states} | {rss} | {cuda} |")
    zero1 = rows[1][1][0]["seconds"]
    print(f"\nDP=2 (ZeRO 1) / 1 process step time ratio: {zero1 / single['seconds']:.2f}")


if __name__ == "__main__":
    main()
