"""Shared helpers for the benchmark scripts: timing, FLOP counting, the matmul reference."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def matmul_rate(device: torch.device, size: int = 2048, repeats: int = 7, dtype=torch.float32) -> float:
    """Median FLOP/s of a ``size^3`` matmul on this device and dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    times = [time_call(lambda: a @ b, device) for _ in range(repeats)]
    return 2 * size**3 / statistics.median(times)


def _sdpa_forward_flops(query_shape, key_shape) -> int:
    b, heads, lq, d = query_shape
    lk = key_shape[2]
    return 4 * b * heads * lq * lk * d  # Q K^T and P V


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_forward_flops(query, key)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * _sdpa_forward_flops(query, key)  # dV, dP, dQ, dK


def _extra_flop_formulas() -> dict:
    """torch's counter knows the CUDA attention kernels but not the CPU flash kernel."""
    formulas = {}
    ops = torch.ops.aten
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[ops._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[ops._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return formulas


def count_flops(fn) -> int:
    """FLOPs executed by ``fn`` (matmuls, batched matmuls, attention; forward and backward)."""
    counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    with counter:
        fn()
    return counter.get_total_flops()


def median(values) -> float:
    return statistics.median(values)


def peak_step_memory(fn, device: torch.device, baseline_bytes: int | None = None, cpu: str = "profiler") -> dict:
    """Peak memory of one call of ``fn`` (bytes): ``before`` (what was allocated when it started),
    ``peak`` and ``activations`` (= peak - before: activations, gradients and temporaries).

    CUDA: the caching allocator's counters. CPU, ``cpu="profiler"``: the torch profiler's memory timeline
    (tensors created and freed during the call; ``before`` = ``baseline_bytes``, e.g. the model's parameters);
    ``cpu="resident"``: the process's peak resident set size during the call above its resident size before
    it (Linux; meaningful when freed memory goes back to the system, e.g. with ``MALLOC_MMAP_THRESHOLD_``
    low, and where the profiler cannot follow the call, as across DeepSpeed's engine)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"before": before, "peak": peak, "activations": peak - before}
    if cpu == "resident":
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident size restarts from the current one
        before = _resident_bytes("VmRSS")
        fn()
        peak = _resident_bytes("VmHWM")
        return {"before": before, "peak": peak, "activations": peak - before}
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = highest = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        highest = max(highest, live)
    before = baseline_bytes or 0
    return {"before": before, "peak": before + highest, "activations": highest}


def _resident_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")
