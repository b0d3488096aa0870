"""Timers shared by the benchmark CLI and the pytest-benchmark suites.

On CUDA tensors: ``triton.testing.do_bench`` (median, L2 flushed between runs) when triton
imports, else CUDA events. On the CPU: the median of repeated ``time.perf_counter`` runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device | str, *, min_time_s: float = 0.2,
              max_reps: int = 200) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:
            return _cuda_events_ms(fn)
    fn()  # warm-up
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (
        time.perf_counter() - start_all < min_time_s or len(times) < 5
    ):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_ms(fns: dict[str, Callable[[], object]], device: torch.device | str, *,
                   rounds: int = 9) -> dict[str, float]:
    """Median wall time (ms) of each ``fns[k]()`` over ``rounds`` rounds that run every
    function once in turn (after one warm-up round): a slow spell of the machine then touches
    every implementation alike, which matters when they are compared as ratios."""
    cuda = torch.device(device).type == "cuda"
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _cuda_events_ms(fn: Callable[[], object], reps: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device | str, nbytes: int) -> float:
    """Measured device copy bandwidth (bytes read + written per second, in GB/s): the floor."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
