"""IMTL-G (Liu et al. 2021): the direction with equal cosines to every task gradient."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_equivariant_and_scale_free, assert_nonfinite_gram_gives_nan
from conftest import device_backend_params

from fastmtl.aggregators.imtlg import IMTLG
from fastmtl.backend import use_backend

PARAMS = device_backend_params()
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def gradients(T: int, N: int | None = None, seed: int = 0, dtype=torch.float64, device="cpu"):
    """(T, N) Gaussian gradients (N = 2T + 3 by default) with norms over two decades."""
    gen = torch.Generator().manual_seed(1000 * T + seed)
    G = torch.randn(T, N or 2 * T + 3, generator=gen, dtype=torch.float64)
    G = G * 10 ** (2 * torch.rand(T, 1, generator=gen, dtype=torch.float64) - 1)
    return G.to(device=device, dtype=dtype)


def cosines(G: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    G, d = G.double().cpu(), d.double().cpu()
    return G @ d / (G.norm(dim=1) * d.norm())


def paper_alpha(G: torch.Tensor) -> torch.Tensor:
    """α_{2..T} = g_1ᵀU(DᵀU)⁻¹, α_1 = 1 − Σα, from the gradients themselves (float64)."""
    G = G.double().cpu()
    u = G / G.norm(dim=1, keepdim=True)
    D, U = (G[0] - G[1:]).T, (u[0] - u[1:]).T
    rest = torch.linalg.solve((D.T @ U).T, (G[0] @ U)[:, None]).squeeze(1)
    return torch.cat([1 - rest.sum(0, keepdim=True), rest])


@pytest.mark.parametrize("T", [1, 2, 3, 5, 10, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_equal_cosines(dtype, T):
    G = gradients(T, dtype=dtype)
    agg = IMTLG()
    w = agg.weights(G @ G.T)
    d = agg(G)
    assert w.shape == (T,) and w.dtype == dtype
    assert abs(w.double().sum().item() - 1) <= TOL[dtype] * T
    cos = cosines(G, d)
    assert (cos.max() - cos.min()) <= TOL[dtype] * T
    if T >= 2:
        torch.testing.assert_close(w.double(), paper_alpha(G), rtol=0, atol=TOL[dtype] * T)


def test_single_task():
    G = gradients(1)
    assert torch.equal(IMTLG().weights(G @ G.T), torch.ones(1, dtype=G.dtype))


def test_zero_gradient_gets_no_weight():
    """A zero gradient gets w_i = 0 and the others are balanced among themselves."""
    G = gradients(5, seed=1)
    G[3] = 0
    w = IMTLG().weights(G @ G.T)
    rest = [0, 1, 2, 4]
    torch.testing.assert_close(w[3], torch.zeros((), dtype=G.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(w[rest], IMTLG().weights(G[rest] @ G[rest].T), rtol=1e-9,
                               atol=1e-12)
    w0 = IMTLG().weights(torch.zeros(3, 3))
    assert torch.equal(w0, torch.zeros(3))  # no direction with Σ w = 1: zero weights


def test_duplicated_and_parallel_gradients():
    """Duplicates share their weight equally (the same d); a positive multiple c·g_i shares
    the coefficient of u_i (w_i = c w_j): the same direction, another length (Σ w = 1)."""
    G = gradients(4, seed=2)
    w_ref = IMTLG().weights(G @ G.T)
    Gd = torch.cat([G, G[1:2]])
    w = IMTLG().weights(Gd @ Gd.T)
    torch.testing.assert_close(w[1], w[4], rtol=1e-9, atol=0)
    torch.testing.assert_close(w @ Gd, w_ref @ G, rtol=1e-9, atol=1e-9)
    Gp = torch.cat([G, 3.0 * G[2:3]])
    w = IMTLG().weights(Gp @ Gp.T)
    torch.testing.assert_close(w[2], 3.0 * w[4], rtol=1e-9, atol=0)
    assert cosines((w @ Gp)[None], w_ref @ G).item() >= 1 - 1e-12


def test_rank_deficient_is_least_squares():
    """T > N: d ∝ Uᵀ (U Uᵀ)⁺ 1, the minimum-norm least-squares solution of U x = 1."""
    G = gradients(9, N=4, seed=3)
    w = IMTLG().weights(G @ G.T)
    assert torch.isfinite(w).all() and abs(w.sum().item() - 1) <= 1e-9
    U = G / G.norm(dim=1, keepdim=True)
    x = U.T @ torch.linalg.pinv(U @ U.T, hermitian=True) @ torch.ones(9, dtype=G.dtype)
    d = w @ G
    torch.testing.assert_close(d / d.norm() * torch.sign(d @ x), x / x.norm(), rtol=0,
                               atol=1e-9)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device,backend", PARAMS)
def test_backends_agree(device, backend, dtype):
    """Every backend (the Triton Jacobi kernel under the interpreter) against the paper's
    formula, and with a zero and a duplicated row."""
    G = gradients(6, seed=4, dtype=dtype, device=device)
    Gz = torch.cat([G[:3], torch.zeros_like(G[:1]), G[:2]])
    with use_backend(backend):
        w = IMTLG().weights(G @ G.T)
        wz = IMTLG().weights(Gz @ Gz.T)
    torch.testing.assert_close(w.double().cpu(), paper_alpha(G), rtol=0, atol=10 * TOL[dtype])
    assert torch.isfinite(wz).all() and abs(wz[3].item()) <= TOL[dtype]
    torch.testing.assert_close(wz[[0, 1]].cpu(), wz[[4, 5]].cpu(), rtol=TOL[dtype], atol=0)


def test_permutation_equivariance_and_scaling():
    assert_equivariant_and_scale_free(IMTLG(), gradients(7, seed=5), rtol=1e-9, atol=1e-12)


@pytest.mark.compare
@pytest.mark.parametrize("case", ["full", "duplicated", "zero_row"])
@pytest.mark.parametrize("T", [2, 3, 5, 10])
def test_matches_torchjd(T, case):
    """torchjd's K⁺√diag(K) / Σ: the same weights for invertible K and duplicated rows."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    G = gradients(T, seed=6)
    if case == "duplicated":
        G = torch.cat([G, G[:1]])
    if case == "zero_row":
        G = torch.cat([G, torch.zeros_like(G[:1])])
    K = G @ G.T
    torch.testing.assert_close(IMTLG().weights(K), aggregation.IMTLGWeighting()(K), rtol=0,
                               atol=1e-9)
    d = aggregation.IMTLG()(G)
    torch.testing.assert_close(IMTLG()(G), d, rtol=0, atol=1e-9 * G.norm(dim=1).max().item())


def test_nonfinite_gram_gives_nan_without_checks():
    assert_nonfinite_gram_gives_nan(IMTLG)


def test_bad_arguments():
    with pytest.raises(ValueError, match="eps.*0"):
        IMTLG(eps=0.0)
    with pytest.raises(ValueError, match="max_sweeps.*0"):
        IMTLG(max_sweeps=0)
    with pytest.raises(ValueError, match="square"):
        IMTLG().weights(torch.ones(2, 3))
    assert repr(IMTLG()) == "IMTLG(eps=1e-08, max_sweeps=16)"
