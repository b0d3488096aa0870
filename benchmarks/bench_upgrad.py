"""UPGrad ``weights(K)`` latency: fastmtl against torchjd's ``UPGradWeighting`` on the same Gram.

    .venv/bin/python -m pytest benchmarks/bench_upgrad.py --benchmark-enable -q

CPU: pytest-benchmark wall time of one call (fastmtl: the T dual-cone QPs solved together by
exact principal pivoting in float64 numpy; torchjd: T quadprog calls through qpsolvers). CUDA
(skipped without a GPU): host time of a call plus ``torch.cuda.synchronize()``, and
``triton.testing.do_bench`` in ``extra_info["do_bench_ms"]``. Two Gram families: Gaussian
gradients (norms over two decades) and strongly conflicting ones (± one direction plus noise).
No assertions on time: the numbers are for the table.
"""

from __future__ import annotations

import pytest
import torch
from _common import time_small_call

import fastmtl as fm
from fastmtl.aggregators.upgrad import UPGrad

TS = [2, 10, 40, 128]
N = 4096
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def setup_gram(T: int, kind: str, device: str, seed: int = 0) -> torch.Tensor:
    """K = G Gᵀ (float32): "gauss" or "conflict" gradients (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(T, N, generator=gen)
    if kind == "conflict":
        sign = torch.where(torch.rand(T, 1, generator=gen) < 0.5, -1.0, 1.0)
        G = sign * torch.randn(1, N, generator=gen) + 0.3 * G
    G = G * 10 ** (2 * torch.rand(T, 1, generator=gen) - 1)
    return fm.ops.gram(G.to(device))


def _weighting(impl: str):
    if impl == "fastmtl":
        return UPGrad().weights
    aggregation = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")
    return aggregation.UPGradWeighting()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gauss", "conflict"])
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("impl", ["fastmtl", "torchjd"])
def test_upgrad_weights(benchmark, impl, T, kind, device):
    K = setup_gram(T, kind, device)
    fn = _weighting(impl)
    fn(K)  # warm-up: imports, kernel compilation
    benchmark.group = f"upgrad-{device}-{kind}-T{T}"
    benchmark.extra_info.update(impl=impl, T=T, kind=kind, device=device)
    # ~0.3–1 s a call at T >= 128 on CPU: a few rounds are enough
    time_small_call(benchmark, fn, K, device=device, rounds=3 if T >= 128 else None)
