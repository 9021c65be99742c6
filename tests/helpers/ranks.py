"""Run a function on N gloo processes (the way torchrun would start them) and collect results."""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    result_file = Path(out_dir) / f"rank{rank}.pkl"
    try:
        # A file store, not TCP: test files run side by side (pytest-xdist) and two of them could be
        # handed the same free port.
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        payload = ("ok", result)
    except BaseException as err:  # reported to the parent test, with the traceback
        payload = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    finally:
        if "megatron.core.parallel_state" in sys.modules:
            from parallel.topology import shutdown_topology

            shutdown_topology()
        elif dist.is_initialized():
            dist.destroy_process_group()
    result_file.write_bytes(pickle.dumps(payload))


def run_ranks(fn, world_size: int, *args) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` processes; its return values, by rank.

    If the wait is interrupted (pytest-timeout on a hung collective, Ctrl-C), the ranks are killed, so no
    orphan keeps the machine busy after the test has failed with their parent's stack."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size,
                                     join=False, start_method="spawn")
        try:
            while not context.join():
                pass
        except BaseException:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise
        results = []
        for rank in range(world_size):
            status, value = pickle.loads((Path(out_dir) / f"rank{rank}.pkl").read_bytes())
            if status != "ok":
                raise AssertionError(f"rank {rank} failed: {value}")
            results.append(value)
    return results
