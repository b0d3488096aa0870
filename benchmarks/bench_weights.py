"""``weights(K)`` latency of every aggregator against torchjd's weighting on the same Gram.

    .venv/bin/python -m pytest benchmarks/bench_weights.py --benchmark-enable -q

T in {2, 10, 40, 128}; K = G Gᵀ of Gaussian gradients (N = 4096) whose norms span two decades.
On CUDA the timed call includes ``torch.cuda.synchronize()`` and ``extra_info["do_bench_ms"]``
holds ``triton.testing.do_bench``'s median. No assertions on time.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _common import time_small_call

import fastmtl as fm

TS = [2, 10, 40, 128]
N = 4096
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# fastmtl class (module, name, kwargs, needs losses) -> torchjd weighting name (or None)
METHODS = {
    "Mean": ("mean", "Mean", {}, "MeanWeighting"),
    "MGDA": ("mgda", "MGDA", {}, "MGDAWeighting"),
    "EDM": ("edm", "EDM", {}, None),
    "IMTLG": ("imtlg", "IMTLG", {}, "IMTLGWeighting"),
    "AlignedMTL": ("aligned_mtl", "AlignedMTL", {}, "AlignedMTLWeighting"),
    "CAGrad": ("cagrad", "CAGrad", {}, "CAGradWeighting"),  # torchjd needs c: TORCHJD_KWARGS
    "UPGrad": ("upgrad", "UPGrad", {}, "UPGradWeighting"),
    "NashMTL": ("nash_mtl", "NashMTL", {}, None),
    "PCGrad": ("pcgrad", "PCGrad", {"seed": 0}, "PCGradWeighting"),
    "GradVac": ("gradvac", "GradVac", {"seed": 0}, "GradVacWeighting"),
}

TORCHJD_KWARGS = {"CAGradWeighting": {"c": 0.4}}  # same c as fastmtl's default


def setup_gram(T: int, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(T, N, generator=gen) * 10 ** (2 * torch.rand(T, 1, generator=gen) - 1)
    return fm.ops.gram(G.to(device))


def _weighting(method: str, impl: str):
    module, cls, kwargs, tjd_name = METHODS[method]
    if impl == "fastmtl":
        try:
            mod = importlib.import_module(f"fastmtl.aggregators.{module}")
        except ImportError:
            pytest.skip(f"fastmtl.aggregators.{module} not present")
        return getattr(mod, cls)(**kwargs).weights
    if tjd_name is None:
        pytest.skip(f"torchjd has no Gramian weighting for {method}")
    aggregation = pytest.importorskip("torchjd.aggregation")
    return getattr(aggregation, tjd_name)(**TORCHJD_KWARGS.get(tjd_name, {}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("impl", ["fastmtl", "torchjd"])
@pytest.mark.parametrize("method", list(METHODS))
def test_weights(benchmark, method, impl, T, device):
    K = setup_gram(T, device)
    fn = _weighting(method, impl)
    try:
        fn(K)  # warm-up: imports, kernel compilation
    except Exception as exc:  # a peer failing on a case is a row, not a crash
        pytest.skip(f"{impl} {method} failed at T={T}: {exc.__class__.__name__}: {exc}")
    benchmark.group = f"weights-{method}-{device}-T{T}"
    benchmark.extra_info.update(method=method, impl=impl, T=T, device=device)
    time_small_call(benchmark, fn, K, device=device)
