"""fm.ops.project vs ``C @ G`` (torch.mm) vs a per-parameter loop over tasks (LibMTL-style).

T' = T: the PCGrad / GradVac case, projected per-task gradients from a T x T coefficient matrix.
Bytes moved: the op reads G once and writes P, (T + T')·N·itemsize (C is negligible).
"""

from __future__ import annotations

import pytest
import torch
from _common import cases, measure, task_gradients

import fastmtl as fm


def naive_project(C: list[list[float]], per_task: list[list[torch.Tensor]]) -> list:
    """p_k^p = Σ_i C_ki g_i^p, output row by output row and parameter by parameter."""
    out = []
    for k in range(len(C)):
        row = []
        for p in range(len(per_task[0])):
            acc = per_task[0][p].float() * C[k][0]
            for i in range(1, len(per_task)):
                acc.add_(per_task[i][p].float(), alpha=C[k][i])
            row.append(acc.to(per_task[0][p].dtype))
        out.append(row)
    return out


@pytest.mark.parametrize("dtype,T,N,impl", cases(("fastmtl", "torch_mm", "per_param_loop")))
def test_project(benchmark, dtype, T, N, impl):
    G, per_task = task_gradients(T, N, dtype)
    gen = torch.Generator(device=G.device).manual_seed(T)
    C = torch.randn(T, T, generator=gen, device=G.device, dtype=torch.float32)
    C_in = C.to(dtype)  # torch's matmul needs matching dtypes
    C_host = C.tolist()  # the loop's scalar coefficients (no device sync per multiply-add)
    fn = {
        "fastmtl": lambda: fm.ops.project(C, G),
        "torch_mm": lambda: C_in @ G,
        "per_param_loop": lambda: naive_project(C_host, per_task),
    }[impl]
    benchmark.group = f"project {str(dtype).removeprefix('torch.')} T={T} N={N:.0e}"
    measure(benchmark, fn, bytes_moved=2 * T * N * G.element_size(), op="project",
            impl=impl, T=T, N=N, dtype=str(dtype), backend=fm.backend.select(G))
