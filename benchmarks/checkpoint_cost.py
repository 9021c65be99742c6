"""What a checkpoint costs: save and load time, bytes per rank, and the asynchronous save's stall, each
against the time of a training step, in one run.

Models: the default run's (6.9M parameters, seq 128) and a ~100M one (hidden 768, 12 layers, FFN 2048,
vocab 8192, seq 128); memory on; a training step of a global batch of 8 sequences. Layouts: 1 process,
and 2 data-parallel ranks (DeepSpeed ZeRO 1). For each: the median of 3 timed steps, a synchronous
save (DCP files, manifest with sha256, rename), a load into the live engine, and an asynchronous save
(the time the loop is held while the state is copied, and the time until its files are complete).

Usage: python benchmarks/checkpoint_cost.py [--device cpu|cuda] [--models default,100m] [--ranks 1,2]
"""

from __future__ import annotations

import argparse
import os
import pickle
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

MODELS = {
    "default": {},
    "100m": dict(vocab_size=8192, hidden_size=768, num_layers=12, num_heads=12, ffn_hidden_size=2048),
}
GLOBAL_BATCH = 8


def _run(rank, world, port, out_dir, device_name, model_name, threads):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from data_pipeline.masking import build_masked_batch
    from parallel.checkpoint.checkpointer import Checkpointer
    from parallel.topology import initialize_topology, shutdown_topology
    from pretrain.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from pretrain.train.factory import build_training, check_run_layout

    micro = GLOBAL_BATCH // world
    cfg = RunConfig(model=ModelConfig(**MODELS[model_name]),
                    train=TrainConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=micro),
                    parallel=ParallelConfig(zero_stage=1 if world > 1 else 0))
    topology = initialize_topology(device_name, 1, 1, cfg.model.num_layers)
    check_run_layout(cfg, topology.world_size)  # what the trainer checks at a start
    engine = build_training(cfg, topology, cfg.model.vocab_size - 1).engine
    ids = np.random.default_rng(rank).integers(0, cfg.model.vocab_size - 1, size=(micro, cfg.model.seq_len))
    batch = build_masked_batch(ids, np.arange(micro) + rank * micro, seed=0, epoch=0, num_inner_steps=2,
                               pre_anchor_scale=1.5).to(topology.device)
    step_times = []
    for step in range(4):
        start = time.perf_counter()
        engine.train_step([batch], step, 1e-4)
        if step:
            step_times.append(time.perf_counter() - start)
    root = Path(out_dir) / "run"
    tokenizer = Path(out_dir) / "tokenizer.json"
    tokenizer.write_text("{}")
    saver = Checkpointer(root, topology, {}, tokenizer, keep=3, log=lambda m: None)
    sync = saver.save(1, engine)
    folder = sync.folder
    files = sorted(folder.glob(f"__{rank}_*.distcp"))
    written = sum(f.stat().st_size for f in files)
    start = time.perf_counter()
    saver.load(folder, engine)
    load_seconds = time.perf_counter() - start
    background = Checkpointer(Path(out_dir) / "async", topology, {}, tokenizer, asynchronous=True,
                              log=lambda m: None)
    start = time.perf_counter()
    report = background.save(2, engine)
    stall = report.seconds
    background.wait()
    async_total = time.perf_counter() - start
    total_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    result = {"step": statistics.median(step_times), "save": sync.seconds, "load": load_seconds,
              "bytes_rank": written, "bytes_total": total_bytes, "stall": stall, "async_total": async_total,
              "params": sum(p.numel() for p in engine.model.parameters())}
    shutdown_topology()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def measure(world, device_name, model_name, threads):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_run, args=(world, port, out_dir, device_name, model_name, threads), nprocs=world,
                           start_method="spawn")
        return [pickle.loads(Path(out_dir, f"rank{r}.pkl").read_bytes()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default="default,100m", help="comma list of: " + ", ".join(MODELS))
    parser.add_argument("--ranks", default="1,2", help="comma list of world sizes (2 = DP2 ZeRO 1)")
    args = parser.parse_args()
    unknown = [name for name in args.models.split(",") if name not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    cores = os.cpu_count() or 2
    print(f"device {args.device}; global batch {GLOBAL_BATCH} x 128 tokens, memory on; times in seconds")
    print("\n| model | ranks | step | save (sync) | save / step | load | load / step | bytes written per rank "
          "| checkpoint MB | async stall | async stall / step | async until complete |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model_name in args.models.split(","):
        for world in (int(w) for w in args.ranks.split(",")):
            results = measure(world, args.device, model_name, max(1, cores // world))
            r = results[0]
            per_rank = " / ".join(f"{x['bytes_rank'] / 2**20:.1f} MB" for x in results)
            print(f"| {model_name} ({r['params'] / 1e6:.0f}M) | {world} | {r['step']:.2f} | {r['save']:.2f} | "
                  f"{r['save'] / r['step']:.2f} | {r['load']:.2f} | {r['load'] / r['step']:.2f} | {per_rank} | "
                  f"{r['bytes_total'] / 2**20:.1f} | {r['stall']:.2f} | {r['stall'] / r['step']:.2f} | "
                  f"{r['async_total']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
