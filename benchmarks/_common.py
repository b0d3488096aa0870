"""Shared set-up of the op benchmarks (pytest-benchmark; ``pytest benchmarks --benchmark-enable``).

Environment:
  FASTMTL_BENCH_DEVICE   "cpu" or "cuda" (default: cuda when available)
  FASTMTL_BENCH_DTYPES   comma-separated dtypes (default: float32; float32,bfloat16 on CUDA)
  FASTMTL_BENCH_LARGE=1  also run T·N > 4e7 on CPU (skipped by default: memory and time)

Each benchmark records in ``extra_info`` the bytes the op must move (``bytes``), so GB/s =
bytes / time, and on CUDA the ``triton.testing.do_bench`` quantiles (``do_bench_ms``) next to
pytest-benchmark's own wall-clock timing of the synchronised call.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import pytest
import torch

import fastmtl as fm

DEVICE = torch.device(
    os.environ.get("FASTMTL_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
)
LARGE = os.environ.get("FASTMTL_BENCH_LARGE", "0") == "1"
CPU_MAX_ELEMENTS = 4 * 10**7
TS = (2, 8, 40)
NS = (10**5, 10**6, 10**7)
DTYPES = [
    getattr(torch, name.strip())
    for name in os.environ.get(
        "FASTMTL_BENCH_DTYPES", "float32,bfloat16" if DEVICE.type == "cuda" else "float32"
    ).split(",")
]


def cases(impls: tuple[str, ...]) -> list:
    """(dtype, T, N, impl) parameters, impl varying fastest so one G serves consecutive cases."""
    params = []
    for dtype in DTYPES:
        for T in TS:
            for N in NS:
                too_big = DEVICE.type == "cpu" and T * N > CPU_MAX_ELEMENTS and not LARGE
                marks = [pytest.mark.skip(reason="T*N > 4e7 on CPU; FASTMTL_BENCH_LARGE=1 runs it")]
                for impl in impls:
                    name = f"{str(dtype).removeprefix('torch.')}-T{T}-N{N:.0e}-{impl}"
                    params.append(pytest.param(dtype, T, N, impl, id=name,
                                               marks=marks if too_big else []))
    return params


def param_sizes(N: int) -> list[int]:
    """Split N like a network's parameters: 12 weight matrices of growing size and their
    biases (256 each where N allows), summing to N exactly."""
    biases = 12 * 256 if N >= 100 * 12 * 256 else 0
    weights = N - biases
    shares = [2**k for k in range(12)]
    sizes = [weights * s // sum(shares) for s in shares]
    sizes[-1] += weights - sum(sizes)
    out = []
    for s in sizes:
        out += [s, 256] if biases else [s]
    return [s for s in out if s > 0]


@functools.lru_cache(maxsize=1)  # one live G at a time: the largest is several GB
def task_gradients(T: int, N: int, dtype: torch.dtype) -> tuple[torch.Tensor, list]:
    """G (T, N) and, LibMTL-style, per-task lists of per-parameter gradients (views of G)."""
    gen = torch.Generator(device=DEVICE).manual_seed(T * N)
    G = torch.randn(T, N, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)
    sizes = param_sizes(N)
    per_task = [list(torch.split(G[t], sizes)) for t in range(T)]
    return G, per_task


def naive_gram(per_task: list[list[torch.Tensor]]) -> torch.Tensor:
    """K_ij = Σ_p <g_i^p, g_j^p>, pair by pair and parameter by parameter (i <= j, mirrored)."""
    T = len(per_task)
    rows = [[None] * T for _ in range(T)]
    for i in range(T):
        for j in range(i, T):
            total = sum(torch.dot(a.float(), b.float()) for a, b in zip(per_task[i], per_task[j]))
            rows[i][j] = rows[j][i] = total
    return torch.stack([torch.stack(r) for r in rows])


def naive_combine(w: torch.Tensor, per_task: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """d^p = Σ_i w_i g_i^p, parameter by parameter (what a per-parameter .grad update does)."""
    out = []
    for p in range(len(per_task[0])):
        d = per_task[0][p].float() * w[0]
        for t in range(1, len(per_task)):
            d.addcmul_(per_task[t][p].float(), w[t])
        out.append(d.to(per_task[0][p].dtype))
    return out


def _versions() -> dict[str, str]:
    info = {"torch": torch.__version__, "fastmtl": fm.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def measure(benchmark, fn: Callable[[], object], *, bytes_moved: int, **info) -> None:
    """Time ``fn`` with pytest-benchmark (synchronised on CUDA) and record bytes and GB/s."""
    extra = benchmark.extra_info
    extra.update(info, bytes=bytes_moved, device=_device_name(), **_versions())
    if DEVICE.type == "cuda":
        fn()  # the first call may autotune and compile: keep it out of every timing
        torch.cuda.synchronize(DEVICE)
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            extra.update(do_bench_ms={"median": median, "p20": p20, "p80": p80},
                         do_bench_gbps=bytes_moved / (median * 1e-3) / 1e9)

        def call():
            fn()
            torch.cuda.synchronize(DEVICE)

        benchmark(call)
    else:
        benchmark(fn)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        extra["gbps"] = bytes_moved / stats.median / 1e9


def _device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return f"cpu ({torch.get_num_threads()} threads)"


def time_small_call(benchmark, fn: Callable[..., object], *args: object, device: str,
                    rounds: int | None = None) -> None:
    """Time one small call (a solver's ``weights(K)``) after a warm-up the caller has done.

    CPU: pytest-benchmark's own timing (``rounds`` fixed rounds for calls of seconds). CUDA:
    the call plus ``torch.cuda.synchronize()``, with ``triton.testing.do_bench``'s median in
    ``extra_info["do_bench_ms"]``.
    """
    if device == "cpu":
        if rounds is None:
            benchmark(fn, *args)
        else:
            benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1)
        return
    import triton.testing

    benchmark.extra_info["do_bench_ms"] = triton.testing.do_bench(lambda: fn(*args))

    def synced() -> None:
        fn(*args)
        torch.cuda.synchronize()

    benchmark(synced)
