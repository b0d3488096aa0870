"""Aligned-MTL (Senushkin et al. 2023): gradients aligned to condition number 1, averaged."""

from __future__ import annotations

import pytest
import torch
from _helpers import (
    assert_compiles,
    assert_equivariant_and_scale_free,
    assert_nonfinite_gram_gives_nan,
)
from conftest import device_backend_params

from fastmtl.aggregators.aligned_mtl import AlignedMTL
from fastmtl.backend import use_backend

PARAMS = device_backend_params()
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def gradients(T: int, N: int | None = None, seed: int = 0, dtype=torch.float64, device="cpu"):
    """(T, N) Gaussian gradients (N = 2T + 3 by default) with norms over one decade."""
    gen = torch.Generator().manual_seed(1000 * T + seed)
    G = torch.randn(T, N or 2 * T + 3, generator=gen, dtype=torch.float64)
    G = G * 10 ** (torch.rand(T, 1, generator=gen, dtype=torch.float64) - 0.5)
    return G.to(device=device, dtype=dtype)


def balance_matrix(K: torch.Tensor, **kwargs) -> torch.Tensor:
    """B, read off the weights: with π = e_j, w = B e_j is B's j-th column."""
    T = K.shape[0]
    return torch.stack([AlignedMTL(pref=torch.eye(T)[j], **kwargs).weights(K)
                        for j in range(T)], dim=1)


def check_aligned(K: torch.Tensor, B: torch.Tensor, tol: float) -> None:
    """B K B = λ_min P: the aligned Gram has r equal nonzero eigenvalues (condition number 1),
    λ_min(K) the smallest nonzero eigenvalue, and B is symmetric."""
    K64, B64 = K.double().cpu(), B.double().cpu()
    lam = torch.linalg.eigvalsh(K64)
    r = int((lam > K.shape[0] * torch.finfo(K.dtype).eps * lam.max()).sum())
    aligned = torch.linalg.eigvalsh(B64 @ K64 @ B64)
    smallest = lam[-r]
    assert (aligned[-r:] - smallest).abs().max() <= tol * lam.max()
    assert aligned[:-r].abs().sum() <= tol * lam.max()  # the T − r others are 0
    torch.testing.assert_close(B64, B64.T, rtol=0, atol=tol)


@pytest.mark.parametrize("T", [1, 2, 3, 5, 10, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_condition_number_one(dtype, T):
    G = gradients(T, dtype=dtype)
    K = G @ G.T
    B = balance_matrix(K)
    check_aligned(K, B, TOL[dtype] * T)
    w = AlignedMTL().weights(K)
    assert w.shape == (T,) and w.dtype == dtype
    torch.testing.assert_close(w, B @ torch.full((T,), 1.0 / T, dtype=dtype))
    aligned = B.double() @ G.double()  # Ĝ = B G: orthogonal rows, all of norm √λ_min
    smallest = torch.linalg.eigvalsh(K.double())[0].sqrt()
    torch.testing.assert_close(aligned.norm(dim=1), smallest.expand(T), rtol=TOL[dtype] * T,
                               atol=0)


def test_single_task_and_zero():
    G = gradients(1)
    torch.testing.assert_close(AlignedMTL().weights(G @ G.T), torch.ones(1, dtype=G.dtype))
    torch.testing.assert_close(AlignedMTL(pref=[2.5]).weights(G @ G.T),
                               torch.full((1,), 2.5, dtype=G.dtype))
    assert torch.equal(AlignedMTL().weights(torch.zeros(3, 3)), torch.full((3,), 1 / 3))


@pytest.mark.parametrize("case", ["low_rank", "duplicated", "zero_row"])
def test_rank_deficient(case):
    """T > N, duplicated rows, a zero row: B aligns the span (λ_min = smallest kept)."""
    G = gradients(8, N=3, seed=1) if case == "low_rank" else gradients(6, seed=1)
    if case == "duplicated":
        G = torch.cat([G, G[:2]])
    if case == "zero_row":
        G = torch.cat([G, torch.zeros_like(G[:1])])
    K = G @ G.T
    check_aligned(K, balance_matrix(K), 1e-9)
    w = AlignedMTL().weights(K)
    assert torch.isfinite(w).all()
    if case == "duplicated":
        torch.testing.assert_close(w[:2], w[-2:], rtol=1e-9, atol=1e-12)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device,backend", PARAMS)
def test_backends_agree(device, backend, dtype):
    """Every backend (the Triton Jacobi kernel under the interpreter) against the float64
    formula, full rank and with duplicated rows."""
    G = gradients(5, seed=2, dtype=dtype, device=device)
    Gd = torch.cat([G[:3], G[:2]])
    with use_backend(backend):
        w = AlignedMTL().weights(G @ G.T)
        wd = AlignedMTL(scale="median").weights(Gd @ Gd.T)
    K = G.double().cpu() @ G.double().cpu().T
    lam, V = torch.linalg.eigh(K)
    B = lam[0].sqrt() * V @ torch.diag(lam.rsqrt()) @ V.T
    torch.testing.assert_close(w.double().cpu(), B.mean(1), rtol=0, atol=10 * TOL[dtype])
    torch.testing.assert_close(wd[:2].cpu(), wd[3:].cpu(), rtol=0, atol=10 * TOL[dtype])


def test_preferences_and_official_scale():
    """d is linear in π; the official code sums the aligned gradients (π = 1: T times d)."""
    G = gradients(4, seed=3)
    K = G @ G.T
    pref = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=G.dtype)
    B = balance_matrix(K)
    torch.testing.assert_close(AlignedMTL(pref=pref).weights(K), B @ pref)
    torch.testing.assert_close(AlignedMTL(pref=[1.0] * 4).weights(K), 4 * AlignedMTL().weights(K))
    with pytest.raises(ValueError, match="pref has 4 entries but K has T = 3"):
        AlignedMTL(pref=pref).weights(K[:3, :3])


def test_permutation_equivariance_and_scaling():
    assert_equivariant_and_scale_free(AlignedMTL(), gradients(7, seed=4), rtol=1e-9, atol=1e-12)


@pytest.mark.compare
@pytest.mark.parametrize("scale", ["min", "median", "rmse"])
@pytest.mark.parametrize("case", ["full", "low_rank", "duplicated"])
@pytest.mark.parametrize("T", [2, 3, 5, 10])
def test_matches_torchjd(T, case, scale):
    """torchjd's AlignedMTL: the same B, tolerance and default (mean) preferences."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    G = gradients(T, N=max(1, T // 2) if case == "low_rank" else None, seed=5)
    if case == "duplicated":
        G = torch.cat([G, G[:1]])
    K = G @ G.T
    ours = AlignedMTL(scale=scale).weights(K)
    theirs = aggregation.AlignedMTLWeighting(scale_mode=scale)(K)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)
    pref = torch.linspace(0.5, 1.5, K.shape[0], dtype=G.dtype)
    torch.testing.assert_close(AlignedMTL(pref=pref, scale=scale)(G),
                               aggregation.AlignedMTL(pref_vector=pref, scale_mode=scale)(G),
                               rtol=0, atol=1e-9 * G.norm(dim=1).max().item())


@pytest.mark.parametrize("T", [2, 5])
def test_traces_under_torch_compile_with_pref(T):
    """The default AlignedMTL traces in the shared property tests; here with preferences."""
    G = gradients(T, dtype=torch.float32)
    K = G @ G.T
    agg = AlignedMTL(pref=[0.5, 1.0, 2.0, 1.0, 0.5][:T], scale="median")
    assert_compiles(agg, K)


def test_nonfinite_gram_gives_nan_without_checks():
    assert_nonfinite_gram_gives_nan(AlignedMTL)


def test_bad_arguments():
    with pytest.raises(ValueError, match="'max'"):
        AlignedMTL(scale="max")
    with pytest.raises(ValueError, match="pref"):
        AlignedMTL(pref=[])
    with pytest.raises(ValueError, match="pref.*nan"):
        AlignedMTL(pref=[1.0, float("nan")])
    with pytest.raises(ValueError, match="rtol.*2"):
        AlignedMTL(rtol=2.0)
    with pytest.raises(ValueError, match="max_sweeps.*0"):
        AlignedMTL(max_sweeps=0)
    assert "scale='min'" in repr(AlignedMTL())
