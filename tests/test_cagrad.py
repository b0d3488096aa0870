"""CAGrad (Liu et al. 2021): the inner problem's optimality, the direction, the conventions."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_equivariant_and_scale_free, assert_nonfinite_gram_gives_nan
from conftest import device_backend_params

from fastmtl.aggregators.cagrad import CAGrad
from fastmtl.backend import use_backend
from fastmtl.solvers.cagrad import cagrad_simplex, cagrad_simplex_reference

PARAMS = device_backend_params()
KINDS = ("random", "scaled", "conflict", "low_rank")


def gradients(T: int, kind: str = "random", seed: int = 0, dtype=torch.float64, device="cpu"):
    """(T, N) gradients: "random" (N = 2T + 3), "scaled" (norms over three decades),
    "conflict" (all along ± one direction, plus 10% noise), "low_rank" (N = T // 2 + 1)."""
    gen = torch.Generator().manual_seed(1000 * T + seed)
    N = T // 2 + 1 if kind == "low_rank" else 2 * T + 3
    G = torch.randn(T, N, generator=gen, dtype=torch.float64)
    if kind == "scaled":
        G = G * 10 ** (3 * torch.rand(T, 1, generator=gen, dtype=torch.float64) - 1.5)
    if kind == "conflict":
        G = (torch.randn(T, 1, generator=gen, dtype=torch.float64)
             * torch.randn(1, N, generator=gen, dtype=torch.float64) + 0.1 * G)
    return G.to(device=device, dtype=dtype)


def objective(w: torch.Tensor, K: torch.Tensor, c: float) -> torch.Tensor:
    """F(w) = wᵀK1/T + c‖g0‖‖g_w‖, in float64."""
    w, K = w.double().cpu(), K.double().cpu()
    T = K.shape[0]
    return w @ K.sum(1) / T + c * (K.sum() / T**2).sqrt() * (w @ K @ w).clamp_min(0).sqrt()


def duality_gap(w: torch.Tensor, K: torch.Tensor, c: float) -> float:
    """F(w) − min_i ⟨g_i, d⟩ for d = g0 + √φ g_w/‖g_w‖ (in the ball): an upper bound on
    F(w) − min F, since min_i ⟨g_i, d'⟩ <= min F for every d' in the ball; relative to
    max_i ‖g_i‖²."""
    w, K = w.double().cpu(), K.double().cpu()
    T = K.shape[0]
    sqrt_phi = c * (K.sum() / T**2).sqrt()
    inner = K.sum(1) / T + sqrt_phi * (K @ w) / (w @ K @ w).sqrt()
    return ((objective(w, K, c) - inner.min()) / K.diagonal().max()).item()


@pytest.mark.parametrize("c", [0.1, 0.4, 0.9, 2.0])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 2, 3, 5, 10, 40])
def test_inner_problem_optimality(T, kind, c):
    """The primal-dual gap of the solver's w⋆ is at rounding level (or ‖g_w⋆‖ ≈ 0: the
    gradients are Pareto-stationary and c >= 1, where w⋆ is any hull point of 0)."""
    G = gradients(T, kind, seed=1)
    K = G @ G.T
    w = cagrad_simplex(K, c)
    assert w.shape == (T,) and torch.isfinite(w).all() and (w >= 0).all()
    assert abs(w.sum().item() - 1) <= 1e-12
    if (w @ K @ w).sqrt() <= 1e-6 * K.diagonal().max().sqrt():
        assert c >= 1 and objective(w, K, c) <= 1e-9 * K.diagonal().max()
    else:
        assert duality_gap(w, K, c) <= 1e-10


def test_degenerate_root_at_zero():
    """0 in the hull with c < 1: ψ(0) = 0, but the optimum is the vertex opposed to g0."""
    G = torch.tensor([[0.0144], [-2.6373]], dtype=torch.float64)
    w = cagrad_simplex(G @ G.T, 0.4)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0], dtype=torch.float64), rtol=0,
                               atol=1e-9)


@pytest.mark.parametrize("rescale", [0, 1, 2])
@pytest.mark.parametrize("T", [1, 2, 5, 10])
def test_direction(T, rescale):
    """ρd is on the sphere ‖ρd − g0‖ = √φ and attains the max-min value min_i ⟨g_i, ρd⟩ = F⋆."""
    c = 0.4
    G = gradients(T, seed=2)
    K = G @ G.T
    agg = CAGrad(c, rescale=rescale)
    w = agg.weights(K)
    rho = {0: 1.0, 1: 1 + c * c, 2: 1 + c}[rescale]
    d = rho * agg(G)
    g0 = G.mean(0)
    torch.testing.assert_close((d - g0).norm(), c * g0.norm())
    w_star = cagrad_simplex(K, c)
    torch.testing.assert_close((G @ d).min(), objective(w_star, K, c), rtol=1e-10, atol=0)
    torch.testing.assert_close(w @ G, d / rho)


def test_single_task_and_special_cases():
    c = 0.4
    G = gradients(1, seed=3)
    K = G @ G.T
    for rescale, factor in [(0, 1 + c), (1, (1 + c) / (1 + c * c)), (2, 1.0)]:
        torch.testing.assert_close(CAGrad(c, rescale=rescale).weights(K),
                                   torch.full((1,), factor, dtype=K.dtype))
    G = gradients(4, seed=4)
    torch.testing.assert_close(CAGrad(0.0)(G), G.mean(0))  # c = 0: the mean
    opposed = torch.cat([G[:2], -G[:2]])  # g0 = 0: d = g0 = 0
    w = CAGrad(c).weights(opposed @ opposed.T)
    torch.testing.assert_close(w, torch.full((4,), 1 / (4 * (1 + c * c)), dtype=G.dtype))
    stationary = torch.cat([G[:2], -G[:1] - G[1:2], G[2:3]])  # 0 in the hull, c >= 1: d = 0
    w = CAGrad(2.0).weights(stationary @ stationary.T)
    assert torch.equal(w, torch.zeros(4, dtype=G.dtype))


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_zero_duplicated_and_rank_deficient(device, backend):
    """Finite weights; a duplicated row gives the same direction as without it."""
    G = gradients(4, seed=5, device=device)
    zero = torch.cat([G, torch.zeros_like(G[:1])])
    low = gradients(7, "low_rank", seed=6, device=device)
    agg = CAGrad()
    with use_backend(backend):
        for M in (zero, low, torch.zeros(3, 5, dtype=G.dtype, device=device)):
            assert torch.isfinite(agg.weights(M @ M.T)).all()
        w = agg.weights(G @ G.T)
    torch.testing.assert_close(w.cpu(), CAGrad().weights(G.cpu() @ G.cpu().T), rtol=1e-4,
                               atol=1e-6)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("T,kind,c", [(1, "random", 0.4), (3, "conflict", 0.4), (5, "scaled", 0.9),
                                      (10, "random", 0.4), (6, "low_rank", 2.0),
                                      (4, "random", 0.0)])
def test_implementations_agree(device, backend, T, kind, c):
    """The selected path (the single-program kernel for "triton") against the torch-op search
    over the same simplex solver (K_s rounded differently, so the iterative solves differ at
    their tolerance, 1e-6) and against the exact CPU search; duality gap at that level."""
    G = gradients(T, kind, seed=11, device=device)
    K = G @ G.T
    with use_backend(backend):
        w = cagrad_simplex(K, c)
        ref = cagrad_simplex_reference(K, c)
    exact = cagrad_simplex(K.cpu(), c)
    assert w.dtype == K.dtype and w.device == K.device
    torch.testing.assert_close(w.cpu(), ref.cpu(), rtol=0, atol=1e-6)
    torch.testing.assert_close(w.cpu(), exact, rtol=0, atol=1e-5)
    if c > 0 and (exact @ K.cpu() @ exact) > 1e-6 * K.diagonal().max():
        assert duality_gap(w, K, c) <= 1e-6


def test_duplicated_rows():
    """A duplicate moves g0 (the mean counts it twice) but the problem stays well posed."""
    G = gradients(4, seed=7)
    Gd = torch.cat([G, G[:1]])
    w = cagrad_simplex(Gd @ Gd.T, 0.4)
    assert duality_gap(w, Gd @ Gd.T, 0.4) <= 1e-10


def test_permutation_equivariance_and_scaling():
    assert_equivariant_and_scale_free(CAGrad(), gradients(6, seed=8), rtol=1e-7, atol=1e-9)


@pytest.mark.compare
@pytest.mark.parametrize("kind", ["random", "scaled", "conflict"])
@pytest.mark.parametrize("T", [2, 3, 5, 10])
def test_matches_cvxpy_and_torchjd(T, kind):
    """torchjd's CAGrad (CLARABEL via cvxpy, no rescale): its objective is not below ours by
    more than CLARABEL's feasibility slack (its w may be -1e-11 off the simplex), and the
    directions agree to CLARABEL's accuracy."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("cvxpy")
    c = 0.4
    G = gradients(T, kind, seed=9)
    K = G @ G.T
    ours = CAGrad(c, rescale=0)
    theirs = aggregation.CAGradWeighting(c=c)(K)
    # torchjd's weights are 1/T + λ w⋆: recover w⋆ = (w − 1/T)/λ with Σ w⋆ = 1
    w_star = (theirs - 1 / T) / (theirs - 1 / T).sum()
    scale = K.diagonal().max()
    assert objective(cagrad_simplex(K, c), K, c) <= objective(w_star, K, c) + 1e-9 * scale
    d, d_jd = ours(G), aggregation.CAGrad(c=c)(G)
    assert (d - d_jd).norm() <= 1e-3 * d_jd.norm()


def test_nonfinite_gram_gives_nan_without_checks():
    assert_nonfinite_gram_gives_nan(CAGrad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="c must.*-1"):
        CAGrad(c=-1.0)
    with pytest.raises(ValueError, match="rescale.*3"):
        CAGrad(rescale=3)
    with pytest.raises(ValueError, match="steps.*-1"):
        CAGrad(steps=-1)
    with pytest.raises(ValueError, match="max_iter.*0"):
        CAGrad(max_iter=0)
    with pytest.raises(ValueError, match="norm_eps.*nan"):
        CAGrad(norm_eps=float("nan"))
    with pytest.raises(ValueError, match="c must.*inf"):
        cagrad_simplex(torch.eye(2), float("inf"))
    with pytest.raises(ValueError, match="square"):
        CAGrad().weights(torch.ones(2, 3))
    assert repr(CAGrad()).startswith("CAGrad(c=0.4, rescale=1")
