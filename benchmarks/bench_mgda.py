"""MGDA ``weights(K)`` latency: fastmtl against torchjd's ``MGDAWeighting`` on the same Gram.

    .venv/bin/python -m pytest benchmarks/bench_mgda.py --benchmark-enable -q

CPU: pytest-benchmark wall time of one call (fastmtl: exact active set in float64 numpy; torchjd:
Frank–Wolfe with its defaults, epsilon 1e-3 and at most 100 steps, one host sync a step).
CUDA (skipped without a GPU): the host time of a call plus ``torch.cuda.synchronize()``, and
``triton.testing.do_bench`` (CUDA events) in ``extra_info["do_bench_ms"]``. No assertions on
time: the numbers are for the table.
"""

from __future__ import annotations

import pytest
import torch
from _common import time_small_call

import fastmtl as fm

TS = [2, 10, 40]
N = 4096
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def setup_gram(T: int, device: str, seed: int = 0) -> torch.Tensor:
    """K = G Gᵀ for Gaussian task gradients whose norms span two decades (float32)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(T, N, generator=gen) * 10 ** (2 * torch.rand(T, 1, generator=gen) - 1)
    return fm.ops.gram(G.to(device))


def _weighting(impl: str):
    if impl == "fastmtl":
        return fm.aggregators.MGDA().weights
    aggregation = pytest.importorskip("torchjd.aggregation")
    return aggregation.MGDAWeighting()


def _run(benchmark, impl: str, T: int, device: str) -> None:
    K = setup_gram(T, device)
    fn = _weighting(impl)
    fn(K)  # warm-up: imports, kernel compilation
    benchmark.group = f"mgda-{device}-T{T}"
    benchmark.extra_info.update(impl=impl, T=T, device=device)
    time_small_call(benchmark, fn, K, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("impl", ["fastmtl", "torchjd"])
def test_mgda_weights(benchmark, impl, T, device):
    _run(benchmark, impl, T, device)


@pytest.mark.parametrize("normalization", ["l2", "loss+"])
@pytest.mark.parametrize("device", DEVICES)
def test_mgda_normalized_weights(benchmark, normalization, device):
    """The normalisations add a few elementwise ops around the same solve (T = 10)."""
    K = setup_gram(10, device)
    losses = torch.linspace(0.5, 2.0, 10, device=device)
    agg = fm.aggregators.MGDA(normalization)
    agg.weights(K, losses)
    benchmark.group = f"mgda-{device}-T10-normalized"
    benchmark(agg.weights, K, losses)
