"""fm.ops.combine vs ``G.T @ w`` vs a per-parameter loop over tasks (LibMTL-style).

Bytes moved: the op reads G once and writes d, T·N·itemsize + N·itemsize.
"""

from __future__ import annotations

import pytest
import torch
from _common import cases, measure, naive_combine, task_gradients

import fastmtl as fm


@pytest.mark.parametrize("dtype,T,N,impl", cases(("fastmtl", "torch_mv", "per_param_loop")))
def test_combine(benchmark, dtype, T, N, impl):
    G, per_task = task_gradients(T, N, dtype)
    w = torch.rand(T, device=G.device, dtype=torch.float32)
    w_in = w.to(dtype)  # torch's matmul needs matching dtypes
    fn = {
        "fastmtl": lambda: fm.ops.combine(w, G),
        "torch_mv": lambda: G.T @ w_in,
        "per_param_loop": lambda: naive_combine(w, per_task),
    }[impl]
    benchmark.group = f"combine {str(dtype).removeprefix('torch.')} T={T} N={N:.0e}"
    measure(benchmark, fn, bytes_moved=(T + 1) * N * G.element_size(), op="combine",
            impl=impl, T=T, N=N, dtype=str(dtype), backend=fm.backend.select(G))
