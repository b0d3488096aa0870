"""fm.ops.gram vs ``G @ G.T`` (torch.mm) vs a per-parameter, pair-by-pair loop (LibMTL-style).

Bytes moved: the op reads G once, T·N·itemsize (K is negligible).
"""

from __future__ import annotations

import pytest
from _common import cases, measure, naive_gram, task_gradients

import fastmtl as fm


@pytest.mark.parametrize("dtype,T,N,impl", cases(("fastmtl", "torch_mm", "per_param_loop")))
def test_gram(benchmark, dtype, T, N, impl):
    G, per_task = task_gradients(T, N, dtype)
    fn = {
        "fastmtl": lambda: fm.ops.gram(G),
        "torch_mm": lambda: G @ G.T,
        "per_param_loop": lambda: naive_gram(per_task),
    }[impl]
    benchmark.group = f"gram {str(dtype).removeprefix('torch.')} T={T} N={N:.0e}"
    measure(benchmark, fn, bytes_moved=T * N * G.element_size(), op="gram", impl=impl,
            T=T, N=N, dtype=str(dtype), backend=fm.backend.select(G))
