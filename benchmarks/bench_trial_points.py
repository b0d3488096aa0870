"""fm.ops.trial_points vs K separate ``z - t * d`` vs one broadcast expression.

    .venv/bin/python -m pytest benchmarks/bench_trial_points.py --benchmark-enable -q

Bytes moved by the op: z and d read once, Z written once, (2 + K)·N·itemsize.
"""

from __future__ import annotations

import pytest
import torch
from _common import DEVICE, DTYPES, measure

import fastmtl as fm
from fastmtl.ops.trial_points import trial_points

KS = (4, 10)
NS = (10**5, 10**6, 10**7)


@pytest.mark.parametrize("impl", ["fastmtl", "broadcast", "loop"])
@pytest.mark.parametrize("N", NS, ids=lambda n: f"N{n:.0e}")
@pytest.mark.parametrize("K", KS, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_trial_points(benchmark, dtype, K, N, impl):
    if DEVICE.type == "cpu" and K * N > 2 * 10**7:
        pytest.skip("K*N > 2e7 on CPU")
    gen = torch.Generator(device=DEVICE).manual_seed(N)
    z = torch.randn(N, generator=gen, device=DEVICE).to(dtype)
    d = torch.randn(N, generator=gen, device=DEVICE).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    steps = 0.5 ** torch.arange(K, device=DEVICE, dtype=acc)
    fn = {
        "fastmtl": lambda: trial_points(z, d, steps),
        "broadcast": lambda: z.unsqueeze(0) - steps.to(dtype)[:, None] * d,
        "loop": lambda: torch.stack([z - t * d for t in steps.tolist()]),
    }[impl]
    benchmark.group = f"trial_points {str(dtype).removeprefix('torch.')} K={K} N={N:.0e}"
    measure(benchmark, fn, bytes_moved=(2 + K) * N * z.element_size(), op="trial_points",
            impl=impl, K=K, N=N, dtype=str(dtype), backend=fm.backend.select(z))
