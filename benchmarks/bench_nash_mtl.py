"""Nash-MTL ``weights(K)`` latency: fastmtl against torchjd's ``NashMTL`` weighting (cvxpy/ECOS).

    .venv/bin/python -m pytest benchmarks/bench_nash_mtl.py --benchmark-enable -q

torchjd's Nash-MTL weighting takes a matrix, not a Gram: it is handed the Cholesky factor L
of the same K (L Lᵀ = K, T × T), so both solve the same problem and neither pays for a
(T, N) product. Both are stateful; the timed calls are steady-state updates
(``update_weights_every=1``: a solve every call), after a warm-up call that builds torchjd's
cvxpy problem. fastmtl on CPU: damped Newton in float64 numpy (stops once converged); on CUDA
(skipped without a GPU): one Triton program, host time plus ``torch.cuda.synchronize()``, and
``triton.testing.do_bench`` in ``extra_info["do_bench_ms"]``. No assertions on time.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _common import time_small_call

import fastmtl as fm
from fastmtl.aggregators.nash_mtl import NashMTL

TS = [2, 10, 40, 128]
N = 4096
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def setup_gram(T: int, device: str, seed: int = 0) -> torch.Tensor:
    """K = G Gᵀ (float32) for Gaussian gradients with norms over one decade."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(T, N, generator=gen) * 10 ** (torch.rand(T, 1, generator=gen) - 0.5)
    return fm.ops.gram(G.to(device))


def _weighting(impl: str, T: int, K: torch.Tensor):
    if impl == "fastmtl":
        agg = NashMTL()
        return agg.weights, K
    aggregation = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("cvxpy")
    L = torch.linalg.cholesky(K.double()).to(K.dtype)
    return aggregation.NashMTL(n_tasks=T).weighting, L


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("impl", ["fastmtl", "torchjd"])
def test_nash_mtl_weights(benchmark, impl, T, device):
    K = setup_gram(T, device)
    fn, arg = _weighting(impl, T, K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(arg)  # warm-up: imports, kernel compilation, torchjd's cvxpy problem
    benchmark.group = f"nash_mtl-{device}-T{T}"
    benchmark.extra_info.update(impl=impl, T=T, device=device)
    # torchjd: seconds a call at T >= 40 on CPU: a few rounds are enough
    time_small_call(benchmark, fn, arg, device=device,
                    rounds=3 if impl == "torchjd" and T >= 40 else None)
