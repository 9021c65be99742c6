"""Does the step ever wait on data? Loader throughput against step throughput, in one run.

Loader: the default run's data (the bundled corpus, prepared into shards on first use) read
by the real reader with 2 DataLoader workers, delivered as masked micro-batches (ids, masks,
t, trajectory states); timed alone, after a warm-up. Step: the default model's full training
step (MemDLM forward/backward and the AdamW update) on those batches, in the same process.

Usage: python benchmarks/data_throughput.py [--format mds|webdataset] [--batches 200] [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from data_pipeline.loader import ReaderOptions, open_batches  # noqa: E402
from data_pipeline.mixture import Source  # noqa: E402
from data_pipeline.readers import MaskingSpec  # noqa: E402
from data_pipeline.source import resolve_dataset  # noqa: E402
from parallel.topology import initialize_topology, shutdown_topology  # noqa: E402
from pretrain.config import RunConfig  # noqa: E402
from pretrain.train.cpu_memory import keep_freed_memory  # noqa: E402
from pretrain.train.factory import build_training, check_run_layout  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="mds", choices=["mds", "webdataset"], help="shard format to read")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--batches", type=int, default=200, help="micro-batches timed for the loader")
    parser.add_argument("--steps", type=int, default=6, help="training steps timed")
    parser.add_argument("--cache-dir", default="", help="where the corpus is prepared (default: a temporary dir)")
    args = parser.parse_args()

    cfg = RunConfig()
    keep_freed_memory()
    cache = args.cache_dir or tempfile.mkdtemp(prefix="memdlm-bench-")
    root, manifest = resolve_dataset("", "", cfg.model.seq_len, cfg.model.vocab_size, cache, prepare_workers=2)
    spec = MaskingSpec(cfg.train.seed, cfg.memory.trajectory, cfg.diffusion.eps,
                       cfg.model.seq_len, cfg.model.vocab_size)
    micro = cfg.train.micro_batch_size
    tokens_per_batch = micro * cfg.model.seq_len

    # 1. The loader alone.
    reader = ReaderOptions(data_format=args.format, num_workers=args.workers)
    stream = iter(open_batches([Source("data", root, manifest)], spec, micro, reader))
    warm = [next(stream) for _ in range(10)]
    start = time.perf_counter()
    for _ in range(args.batches):
        next(stream)
    loader_rate = args.batches * tokens_per_batch / (time.perf_counter() - start)
    del stream

    # 2. The training step of the default model on the same batches.
    check_run_layout(cfg, 1)  # what the trainer checks at a start
    engine = build_training(cfg, initialize_topology("cpu"), manifest["mask_token_id"]).engine

    def train_step(i: int) -> None:
        engine.train_step([warm[i % len(warm)]], step=i, lr=cfg.optim.lr)

    train_step(0)
    start = time.perf_counter()
    for i in range(args.steps):
        train_step(i + 1)
    step_rate = args.steps * tokens_per_batch / (time.perf_counter() - start)
    shutdown_topology()

    print(f"format {args.format}, {args.workers} workers, micro-batch {micro} x {cfg.model.seq_len} tokens, "
          f"memory on, default model")
    print(f"loader: {loader_rate:,.0f} tokens/s as masked batches ({args.batches} batches)")
    print(f"step:   {step_rate:,.0f} tokens/s ({args.steps} steps, forward + backward + AdamW)")
    print(f"loader/step throughput ratio: {loader_rate / step_rate:.1f}")


if __name__ == "__main__":
    main()
