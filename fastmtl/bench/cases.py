"""Benchmark cases: each returns rows {op, case, impl, ms, ...} timed side by side in one run.

Bytes-moved floors: gram reads G once (T·N·itemsize); combine reads G and writes d
((T+1)·N·itemsize). GB/s = bytes / time; "% floor" = achieved GB/s / measured copy GB/s.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

import fastmtl as fm
from fastmtl.bench.timing import interleaved_ms, median_ms

Row = dict[str, object]


def _time_impls(op: str, case: str, device: str, impls: dict[str, Callable[[], object]],
                nbytes: int | None, *, rounds: int | None = None) -> list[Row]:
    """One row per implementation: each timed alone (``median_ms``), or, with ``rounds``, all
    in turn (``interleaved_ms``: for whole steps, compared as ratios)."""
    times = (interleaved_ms(impls, device, rounds=rounds) if rounds is not None
             else {impl: median_ms(fn, device) for impl, fn in impls.items()})
    rows = []
    for impl, ms in times.items():
        row: Row = {"op": op, "case": case, "impl": impl, "ms": ms}
        if nbytes is not None:
            row["GB/s"] = nbytes / (ms * 1e-3) / 1e9
        rows.append(row)
    return rows


def per_param_chunks(G: torch.Tensor, num_params: int = 64) -> list[torch.Tensor]:
    """G split into per-parameter (T, n_p) blocks, as code that keeps per-parameter grads has."""
    return [c.clone() for c in torch.tensor_split(G, num_params, dim=1)]


def gram_cases(device: str, dtype: torch.dtype, T: int, N: int) -> list[Row]:
    G = torch.randn(T, N, device=device, dtype=dtype)
    chunks = per_param_chunks(G)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    impls = {
        "fastmtl": lambda: fm.ops.gram(G),
        "torch.mm": lambda: G @ G.T,
        "per-param loop": lambda: sum(c.to(acc) @ c.to(acc).T for c in chunks),
    }
    return _time_impls("gram", f"T={T} N={N:.0e} {_short(dtype)}", device, impls,
                       T * N * G.element_size())


def combine_cases(device: str, dtype: torch.dtype, T: int, N: int) -> list[Row]:
    G = torch.randn(T, N, device=device, dtype=dtype)
    w = torch.rand(T, device=device, dtype=torch.float64 if dtype == torch.float64 else
                   torch.float32)
    out = torch.empty(N, device=device, dtype=dtype)
    chunks = per_param_chunks(G)
    wg = w.to(dtype)
    impls = {
        "fastmtl": lambda: fm.ops.combine(w, G, out=out),
        "torch G.T@w": lambda: G.T @ wg,
        "per-param loop": lambda: [(wg[:, None] * c).sum(0) for c in chunks],
    }
    return _time_impls("combine", f"T={T} N={N:.0e} {_short(dtype)}", device, impls,
                       (T + 1) * N * G.element_size())


def mgda_cases(device: str, T: int) -> list[Row]:
    A = torch.randn(T, max(2 * T, 8), device=device, dtype=torch.float32)
    K = A @ A.T
    impls: dict[str, Callable[[], object]] = {}
    if hasattr(fm.aggregators, "MGDA"):
        agg = fm.aggregators.MGDA()
        impls["fastmtl"] = lambda: agg.weights(K)
    try:
        from torchjd.aggregation import MGDAWeighting

        tjd = MGDAWeighting()
        impls["torchjd"] = lambda: tjd(K)
    except ImportError:
        pass
    impls["numpy FW 250 (host)"] = lambda: _numpy_frank_wolfe(K.cpu().numpy())
    return _time_impls("mgda.weights", f"T={T}", device, impls, None)


def _numpy_frank_wolfe(K: np.ndarray, iters: int = 250, tol: float = 1e-5) -> np.ndarray:
    """The usual host-side MGDA solver (Frank–Wolfe on K, as in Sener & Koltun's code)."""
    T = K.shape[0]
    w = np.full(T, 1.0 / T)
    for _ in range(iters):
        t = int(np.argmin(K @ w))
        a, b, c = w @ K[:, t], w @ K @ w, K[t, t]
        gamma = 1.0 if c <= a else 0.0 if b <= a else (b - a) / (b + c - 2 * a)
        w = (1 - gamma) * w
        w[t] += gamma
        if gamma < tol:
            break
    return w


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
