"""Sequence parallelism at long context: per-rank activation memory, the longest trainable sequence at a
fixed memory budget, throughput and all-to-all traffic, for S = 1, 2, 4 sequence-parallel ranks.

Each configuration trains a few MemDLM steps (the default memory settings) of a small model in S
spawned ranks (gloo on CPU, nccl on GPUs), one sequence per step:

1. At a fixed length (``--length``): each rank's activation memory of one step (CPU: the peak resident set
   size during the step above the resident size before it, with glibc told to return every allocation
   over 64 KiB to the system when freed, so the resident size follows the live tensors; CUDA: the
   allocator's peak above the memory allocated before the step), S x that over S = 1's (1.00 = falls as
   1/S exactly), tokens/s, and the bytes the attention's all-to-alls and the all-reduces send over the
   sequence-parallel group per step (with one data-parallel replica the outer gradient reduction runs over the
   same ranks, so its bytes are in that column with the inner loop's fast-weight gradients).
2. The longest trainable sequence under a per-rank activation budget (``--budget-mib``; default: what
   one rank needs at ``--budget-length`` tokens): for each S, lengths in steps of ``--granularity`` are
   probed up (or down) from a first guess until the longest one within budget is found. On CPU the
   budget is a limit on measured activation bytes, not an operating-system cap (one process's resident
   memory also holds the interpreter and libraries).

Usage: python benchmarks/long_context.py [--device cpu|cuda] [--length 8192] [--budget-length 4096]
(on CUDA, S ranks need S GPUs; with one GPU only S = 1 runs)
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

MODEL = dict(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, ffn_hidden_size=256)


def _config(length: int, sequence: int, device: str):
    from pretrain.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig

    return RunConfig(model=ModelConfig(**MODEL, seq_len=length),
                     train=TrainConfig(global_batch_size=1, micro_batch_size=1,
                                       precision="bf16" if device == "cuda" else "fp32"),
                     parallel=ParallelConfig(sequence_parallel_size=sequence))


def _batch(cfg, step: int):
    from data_pipeline.masking import build_masked_batch

    ids = np.random.default_rng(step).integers(0, cfg.model.vocab_size - 1, size=(1, cfg.model.seq_len))
    return build_masked_batch(ids, np.array([step]), seed=0, epoch=0, trajectory=cfg.memory.trajectory)


def _run(rank, world, port, out_dir, device_name, length, threads):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from benchmarks.common import peak_step_memory
    from parallel.comm_accounting import counting, install
    from parallel.topology import initialize_topology, shutdown_topology
    from pretrain.train.factory import build_training, check_run_layout

    install()
    cfg = _config(length, world, device_name)
    topology = initialize_topology(device_name, 1, 1, cfg.model.num_layers, sequence_parallel_size=world)
    device = topology.device
    check_run_layout(cfg, topology.world_size)  # what the trainer checks at a start
    engine = build_training(cfg, topology, cfg.model.vocab_size - 1).engine
    batches = [_batch(cfg, step).to(device) for step in range(3)]
    engine.train_step([batches[0]], 0, 1e-4)  # warm-up: buffers, DeepSpeed's buckets
    activations = peak_step_memory(lambda: engine.train_step([batches[1]], 1, 1e-4), device,
                                   cpu="resident")["activations"]
    groups = {"sequence": topology.sequence_parallel_group} if world > 1 else {}
    with counting(groups) as counter:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.train_step([batches[2]], 2, 1e-4)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    sent = counter.bytes_by_op.get("sequence", {})
    result = {"activations": activations, "seconds": seconds,
              "all_to_all": sent.get("all_to_all_single", 0), "all_reduce": sent.get("all_reduce", 0)}
    shutdown_topology()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def measure(sequence: int, length: int, device_name: str) -> dict:
    """The figures of one configuration: the largest activation memory over its ranks, rank 0's step time and
    bytes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 2) // sequence)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 << 10)  # inherited by the spawned ranks (see the docstring)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_run, args=(sequence, port, out_dir, device_name, length, threads), nprocs=sequence,
                           start_method="spawn")
        ranks = [pickle.loads(Path(out_dir, f"rank{r}.pkl").read_bytes()) for r in range(sequence)]
    return {"activations": max(r["activations"] for r in ranks), "seconds": ranks[0]["seconds"],
            "all_to_all": ranks[0]["all_to_all"], "all_reduce": ranks[0]["all_reduce"]}


def longest_within(sequence: int, budget: float, guess: int, granularity: int, device_name: str) -> tuple[int, int]:
    """The longest length (a multiple of ``granularity``) whose per-rank activations fit ``budget`` bytes, probing
    from ``guess``; also how many lengths were tried."""
    fits = {}

    def fit(length: int) -> bool:
        if length not in fits:
            fits[length] = measure(sequence, length, device_name)["activations"] <= budget
            print(f"  S={sequence} {length} tokens: {'fits' if fits[length] else 'over budget'}", flush=True)
        return fits[length]

    length = max(granularity, guess // granularity * granularity)
    if fit(length):
        while fit(length + granularity):
            length += granularity
        return length, len(fits)
    while length > granularity and not fit(length - granularity):
        length -= granularity
    return length - granularity, len(fits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--length", type=int, default=8192, help="tokens per sequence for part 1 (default 8192)")
    parser.add_argument("--sizes", default="1,2,4", help="sequence-parallel sizes (default 1,2,4)")
    parser.add_argument("--budget-mib", type=float, default=0.0,
                        help="per-rank activation budget for part 2 (default: S = 1's need at --budget-length)")
    parser.add_argument("--budget-length", type=int, default=4096, help="see --budget-mib (default 4096)")
    parser.add_argument("--granularity", type=int, default=512, help="length step of part 2's search (default 512)")
    parser.add_argument("--skip-longest", action="store_true", help="part 1 only")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.device == "cuda":
        sizes = [s for s in sizes if s <= torch.cuda.device_count()]
    model = ", ".join(f"{k} {v}" for k, v in MODEL.items())
    print(f"device {args.device} ({os.cpu_count()} cores); model {model}; MemDLM default memory; one sequence per "
          "step; threads per rank = cores / S")

    rows = {s: measure(s, args.length, args.device) for s in sizes}
    base = rows[sizes[0]]
    print(f"\n1. {args.length} tokens per sequence\n")
    print("| S | activations per rank MiB | S x activations / S=1's | tokens/s | all-to-all MiB/step/rank | "
          "all-reduce over the S ranks KiB/step/rank (outer gradients, data x sequence = sequence here; inner "
          "fast-weight gradients) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s, row in rows.items():
        print(f"| {s} | {row['activations'] / 2**20:.1f} | {s * row['activations'] / base['activations']:.3f} | "
              f"{args.length / row['seconds']:.0f} | {row['all_to_all'] / 2**20:.1f} | "
              f"{row['all_reduce'] / 2**10:.1f} |")
    if args.skip_longest:
        return

    budget = args.budget_mib * 2**20 or measure(sizes[0], args.budget_length, args.device)["activations"]
    per_token = base["activations"] / args.length
    print(f"\n2. longest trainable sequence, per-rank activation budget {budget / 2**20:.1f} MiB\n")
    longest = {}
    for s in sizes:
        longest[s], _ = longest_within(s, budget, int(s * budget / per_token), args.granularity, args.device)
    print("\n| S | longest sequence (tokens) | x S=1 |")
    print("| --- | --- | --- |")
    for s in sizes:
        print(f"| {s} | {longest[s]} | {longest[s] / longest[sizes[0]]:.2f} |")


if __name__ == "__main__":
    main()
