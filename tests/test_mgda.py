"""fm.aggregators.MGDA: the min-norm direction of the (normalised) task gradients."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_nonfinite_gram_gives_nan
from conftest import device_backend_params

import fastmtl as fm
from fastmtl.backend import use_backend
from fastmtl.solvers import min_norm_simplex_exact

PARAMS = device_backend_params()
DTYPES = [torch.float32, torch.float64]
NORMALIZATIONS = ["none", "l2", "loss", "loss+"]
TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def problem(T: int, N: int = 50, seed: int = 0, dtype=torch.float64, device="cpu"):
    """Per-task gradients with norms over two decades, and positive losses."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(T, N, generator=gen, dtype=torch.float64)
    G = G * 10 ** (2 * torch.rand(T, 1, generator=gen, dtype=torch.float64) - 1)
    losses = 0.1 + torch.rand(T, generator=gen, dtype=torch.float64)
    return G.to(device=device, dtype=dtype), losses.to(device=device, dtype=dtype)


def kkt_residual(w: torch.Tensor, K: torch.Tensor) -> float:
    """Largest KKT violation of min_{w∈Δ} wᵀKw relative to max_i K_ii (see test_simplex)."""
    w, K = w.double().cpu(), K.double().cpu()
    g = K @ w
    f = w @ g
    scale = K.diagonal().max()
    support = w > 1e-6
    return max(((f - g).max() / scale).item(), ((g - f)[support].max() / scale).item(),
               abs(w.sum().item() - 1), (-w).max().item())


def normalizer(G: torch.Tensor, losses: torch.Tensor, normalization: str) -> torch.Tensor:
    norms = G.norm(dim=1)
    return {"none": torch.ones_like(norms), "l2": norms, "loss": losses,
            "loss+": losses * norms}[normalization]


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("T", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device,backend", PARAMS)
def test_direction_does_not_conflict(device, backend, dtype, T, normalization):
    """<g_i, d> >= 0 for every task, and the weights are α / D with α the KKT point for the
    normalised gradients."""
    G, losses = problem(T, seed=T, dtype=dtype, device=device)
    agg = fm.aggregators.MGDA(normalization)
    with use_backend(backend):
        w = agg.weights(G @ G.T, losses)
        d = agg(G, losses)
    assert w.shape == (T,) and w.dtype == dtype and w.device == G.device
    G64 = G.double()
    d64 = d.double()
    inner = G64 @ d64
    assert (inner >= -TOL[dtype] * G64.norm(dim=1) * d64.norm()).all()
    D = normalizer(G64, losses.double(), normalization)
    alpha = w.double() * D
    Gn = G64 / D[:, None]
    assert kkt_residual(alpha, Gn @ Gn.T) <= 10 * TOL[dtype]


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_normalization_is_mgda_on_normalised_gradients(dtype, normalization):
    """MGDA(norm)(G) == MGDA()(D⁻¹G): the same direction, with D folded into w."""
    G, losses = problem(6, seed=1, dtype=dtype)
    D = normalizer(G, losses, normalization)
    d = fm.aggregators.MGDA(normalization)(G, losses)
    d_ref = fm.aggregators.MGDA()(G / D[:, None])
    torch.testing.assert_close(d, d_ref, rtol=TOL[dtype], atol=TOL[dtype] * d_ref.norm().item())


def test_fold_normalization_false_gives_alpha():
    """Sener's convention: the α of the normalised problem scale the raw gradients."""
    G, losses = problem(5, seed=2)
    folded = fm.aggregators.MGDA("loss+").weights(G @ G.T, losses)
    alpha = fm.aggregators.MGDA("loss+", fold_normalization=False).weights(G @ G.T, losses)
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=alpha.dtype))
    torch.testing.assert_close(folded * normalizer(G, losses, "loss+"), alpha)


def test_single_task():
    G, losses = problem(1, seed=3)
    K = G @ G.T
    assert torch.equal(fm.aggregators.MGDA().weights(K), torch.ones(1, dtype=K.dtype))
    w = fm.aggregators.MGDA("l2").weights(K)
    torch.testing.assert_close(w, 1 / G.norm(dim=1))
    w = fm.aggregators.MGDA("loss+").weights(K, losses)
    torch.testing.assert_close(w, 1 / (losses * G.norm(dim=1)))


@pytest.mark.kernels
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("device,backend", PARAMS)
def test_permutation_equivariance(device, backend, normalization):
    G, losses = problem(7, seed=4, device=device)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0)).to(device)
    agg = fm.aggregators.MGDA(normalization)
    with use_backend(backend):
        w = agg.weights(G @ G.T, losses)
        wp = agg.weights(G[perm] @ G[perm].T, losses[perm])
    torch.testing.assert_close(wp, w[perm], rtol=1e-5, atol=1e-6)


@pytest.mark.kernels
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("device,backend", PARAMS)
def test_zero_gradients_and_losses_are_finite(device, backend, normalization):
    G, losses = problem(5, seed=5, device=device)
    G[1] = 0
    losses[3] = 0
    agg = fm.aggregators.MGDA(normalization)
    with use_backend(backend):
        w = agg.weights(G @ G.T, losses)
        w_zero = agg.weights(torch.zeros(4, 4, dtype=G.dtype, device=device),
                             torch.zeros(4, dtype=G.dtype, device=device))
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert torch.isfinite(w_zero).all() and (w_zero >= 0).all()
    d = w @ G
    assert torch.isfinite(d).all()
    if normalization in ("none", "l2"):  # a zero gradient is in the hull: MGDA stops
        assert d.norm() <= 1e-6 * G.norm(dim=1).max()


@pytest.mark.kernels
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device,backend", PARAMS)
def test_backends_agree(device, backend, dtype, normalization):
    """Each backend against the exact solver on the same normalised Gram."""
    G, losses = problem(8, seed=6, dtype=dtype, device=device)
    K = G @ G.T
    with use_backend(backend):
        w = fm.aggregators.MGDA(normalization).weights(K, losses)
    D = normalizer(G.double().cpu(), losses.double().cpu(), normalization)
    Gn = G.double().cpu() / D[:, None]
    alpha = min_norm_simplex_exact(Gn @ Gn.T)
    torch.testing.assert_close(w.double().cpu() * D, alpha, rtol=0, atol=10 * TOL[dtype])


@pytest.mark.compare
@pytest.mark.parametrize("T", [2, 3, 5, 10])
def test_matches_torchjd(T):
    aggregation = pytest.importorskip("torchjd.aggregation")
    G, _ = problem(T, seed=7)
    K = G @ G.T
    ours = fm.aggregators.MGDA().weights(K)
    # torchjd's plain Frank–Wolfe converges sublinearly: 3000 steps give weights to ~1e-3.
    theirs = aggregation.MGDAWeighting(epsilon=1e-9, max_iters=3000)(K)
    scale = K.diagonal().max()
    assert (ours @ K @ ours) <= (theirs @ K @ theirs) + 1e-12 * scale  # ours is exact
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-2)
    d_theirs = aggregation.MGDA(epsilon=1e-9, max_iters=3000)(G)
    torch.testing.assert_close(fm.aggregators.MGDA()(G), d_theirs, rtol=0,
                               atol=1e-2 * G.norm(dim=1).max().item())


def test_nonfinite_gram_gives_nan_without_checks():
    assert_nonfinite_gram_gives_nan(fm.aggregators.MGDA)


def test_bad_arguments():
    with pytest.raises(ValueError, match="'l1'"):
        fm.aggregators.MGDA("l1")
    with pytest.raises(ValueError, match="max_iter.*0"):
        fm.aggregators.MGDA(max_iter=0)
    with pytest.raises(ValueError, match="tol.*-1"):
        fm.aggregators.MGDA(tol=-1.0)
    with pytest.raises(ValueError, match="eps.*0"):
        fm.aggregators.MGDA(eps=0.0)
    with pytest.raises(ValueError, match="fold_normalization"):
        fm.aggregators.MGDA(fold_normalization="yes")
    agg = fm.aggregators.MGDA("loss")
    with pytest.raises(ValueError, match="losses"):
        agg.weights(torch.eye(3))
    with pytest.raises(ValueError, match=r"losses must have shape \(3,\)"):
        agg.weights(torch.eye(3), torch.ones(2))
    with pytest.raises(ValueError, match="square"):
        fm.aggregators.MGDA().weights(torch.ones(2, 3))
    assert "loss" in repr(agg)
