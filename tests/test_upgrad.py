"""fm.aggregators.UPGrad: the sum of the projections of p_i g_i onto the dual cone of G."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_compiles
from conftest import device_backend_params

import fastmtl as fm
from fastmtl.aggregators.upgrad import UPGrad
from fastmtl.backend import use_backend

PARAMS = device_backend_params()
DTYPES = [torch.float32, torch.float64]
REG = 1e-4


def problem(T: int, kind: str = "gauss", seed: int = 0, N: int = 40, dtype=torch.float64,
            device="cpu"):
    """Gradients G (T, N): "gauss" (norms over two decades), "conflict" (± one direction plus
    noise: strong pairwise conflicts), "opposed" (g and −g pairs: 0 in the hull)."""
    gen = torch.Generator().manual_seed(1000 * T + seed)
    G = torch.randn(T, N, generator=gen, dtype=torch.float64)
    if kind == "conflict":
        sign = torch.where(torch.rand(T, 1, generator=gen) < 0.5, -1.0, 1.0).double()
        G = sign * torch.randn(1, N, generator=gen, dtype=torch.float64) + 0.2 * G
    elif kind == "opposed":
        G = torch.cat([G[: (T + 1) // 2], -G[: T // 2] + 0.01 * G[(T + 1) // 2:]])
    G = G * 10 ** (2 * torch.rand(T, 1, generator=gen, dtype=torch.float64) - 1)
    return G.to(device=device, dtype=dtype)


def weights(agg, K, backend):
    with use_backend(backend):
        return agg.weights(K)


CASES = [(T, kind) for T in (1, 2, 3, 5, 10) for kind in ("gauss", "conflict", "opposed")]


@pytest.mark.kernels
@pytest.mark.parametrize("T,kind", CASES, ids=[f"T{T}-{k}" for T, k in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device,backend", PARAMS)
def test_direction_does_not_conflict(device, backend, dtype, T, kind):
    """⟨g_j, d⟩ >= −reg_eps · tr K · w_j (the regularisation is the only slack), w >= 1/T."""
    G = problem(T, kind, dtype=dtype, device=device)
    K = fm.ops.gram(G)
    w = weights(UPGrad(), K, backend)
    assert w.shape == (T,) and w.dtype == dtype and w.device == G.device
    K64, w64 = K.double().cpu(), w.double().cpu()
    slack = REG * K64.trace() * w64 + 1e-5 * K64.trace() * (dtype == torch.float32)
    assert (K64 @ w64 >= -slack - 1e-9 * K64.trace()).all()
    assert (w64 >= 1 / T - 1e-6).all()
    d = fm.ops.combine(w, G).double().cpu()
    assert (G.double().cpu() @ d >= -slack - 1e-5 * K64.trace()).all()


@pytest.mark.parametrize("T", [2, 3, 5, 10])
@pytest.mark.parametrize("kind", ["conflict", "opposed"])
def test_each_projection_satisfies_kkt(T, kind):
    """v^(i) >= e_i/T, μ = K̃v^(i) >= 0, μ_j (v^(i) − e_i/T)_j = 0: the KKT conditions of
    min_{v >= e_i/T} vᵀK̃v; and the weights are their sum."""
    agg = UPGrad()
    K = fm.ops.gram(problem(T, kind, seed=1))
    V = agg.projections(K)
    Kt = agg.normalized_gram(K)
    torch.testing.assert_close(Kt, K / K.trace() + REG * torch.eye(T, dtype=K.dtype))
    lower = torch.eye(T, dtype=torch.float64) / T
    mu = V @ Kt
    assert (V - lower).min() >= -1e-14
    assert mu.min() >= -1e-14
    assert (mu * (V - lower)).abs().max() <= 1e-14
    torch.testing.assert_close(agg.weights(K), V.sum(0))


@pytest.mark.parametrize("T", [2, 4, 7])
def test_no_conflict_gives_the_mean(T):
    """K >= 0 entrywise: every v^(i) = e_i/T exactly, so d = the mean gradient."""
    G = problem(T, seed=2).abs()
    w = UPGrad().weights(fm.ops.gram(G))
    assert torch.equal(w, torch.full((T,), 1.0 / T, dtype=torch.float64))
    torch.testing.assert_close(fm.aggregators.upgrad.UPGrad()(G), G.mean(0))


def test_single_task_is_the_gradient():
    G = problem(1, seed=3)
    assert torch.equal(UPGrad().weights(fm.ops.gram(G)), torch.ones(1, dtype=torch.float64))
    assert torch.equal(UPGrad().weights(torch.zeros(1, 1)), torch.ones(1))


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_permutation_equivariance(device, backend):
    G = problem(7, "conflict", seed=4, device=device)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0)).to(device)
    w = weights(UPGrad(), fm.ops.gram(G), backend)
    wp = weights(UPGrad(), fm.ops.gram(G[perm]), backend)
    torch.testing.assert_close(wp, w[perm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("c", [1e-6, 1e-3, 1e4])
def test_scale_invariant_weights(c):
    """Default norm_eps = 0: w(c²K) = w(K); torchjd's norm_eps = 1e-4 falls back to the mean."""
    K = fm.ops.gram(problem(5, "conflict", seed=5))
    torch.testing.assert_close(UPGrad().weights(c * c * K), UPGrad().weights(K))
    tiny = 1e-5 * K / K.trace()
    mean = torch.full((5,), 0.2, dtype=torch.float64)
    assert torch.equal(UPGrad(norm_eps=1e-4).weights(tiny), mean)


@pytest.mark.kernels
@pytest.mark.parametrize("case", ["duplicated", "rank_deficient", "zero_row", "all_zero",
                                  "opposite"])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_degenerate_gradients(device, backend, case):
    G = problem(6, seed=6, N=20, device=device)
    if case == "duplicated":
        G[3] = G[1]
    elif case == "rank_deficient":
        G = G[:, :2].clone()
    elif case == "zero_row":
        G[2] = 0
    elif case == "all_zero":
        G = torch.zeros_like(G)
    else:
        G[1] = -G[0]
    K = fm.ops.gram(G)
    w = weights(UPGrad(), K, backend)
    assert torch.isfinite(w).all() and (w >= 1 / 6 - 1e-12).all()
    K64 = K.double().cpu()
    assert (K64 @ w.cpu() >= -REG * K64.trace() * w.cpu() - 1e-12).all()
    if case == "all_zero":
        assert torch.equal(w.cpu(), torch.full((6,), 1 / 6, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gram(dtype):
    K = fm.ops.gram(problem(4, "conflict", seed=7, dtype=torch.float32)).to(dtype)
    w = UPGrad().weights(K)
    assert w.dtype == dtype and torch.isfinite(w).all()


def test_preference():
    """pref replaces 1/T; zero preference drops a task's own projection."""
    K = fm.ops.gram(problem(3, "conflict", seed=8))
    agg = UPGrad(pref=[0.5, 0.25, 0.25])
    V = agg.projections(K)
    assert torch.allclose(V.diagonal(), V.diagonal().clamp_min(0)) and V[0, 0] >= 0.5
    torch.testing.assert_close(UPGrad(pref=[1 / 3] * 3).weights(K), UPGrad().weights(K))
    assert torch.equal(UPGrad(pref=[0.0, 0.0, 0.0]).weights(K), torch.zeros(3).double())
    with pytest.raises(ValueError, match="pref has 3 entries but K is 2"):
        agg.weights(torch.eye(2))


@pytest.mark.compare
@pytest.mark.parametrize("T", [2, 3, 5, 10])
@pytest.mark.parametrize("kind", ["gauss", "conflict", "opposed"])
def test_matches_torchjd(T, kind):
    aggregation = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")
    G = problem(T, kind, seed=9)
    K = fm.ops.gram(G)
    theirs = aggregation.UPGradWeighting()(K)
    torch.testing.assert_close(UPGrad().weights(K), theirs, rtol=0, atol=1e-10)
    torch.testing.assert_close(UPGrad(norm_eps=1e-4).weights(1e-6 * K),
                               aggregation.UPGradWeighting()(1e-6 * K), rtol=0, atol=1e-10)
    pref = torch.linspace(0.2, 1.0, T, dtype=torch.float64)
    torch.testing.assert_close(UPGrad(pref=pref).weights(K),
                               aggregation.UPGradWeighting(pref)(K), rtol=0, atol=1e-10)
    torch.testing.assert_close(UPGrad()(G), aggregation.UPGrad()(G), rtol=0,
                               atol=1e-9 * G.norm(dim=1).max().item())


@pytest.mark.parametrize("T", [2, 5])
def test_traces_under_torch_compile(T):
    K = fm.ops.gram(problem(T, "conflict", seed=10, dtype=torch.float32))
    agg = UPGrad()
    assert_compiles(agg, K)


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm_eps.*-1"):
        UPGrad(norm_eps=-1.0)
    with pytest.raises(ValueError, match="reg_eps.*0"):
        UPGrad(reg_eps=0.0)
    with pytest.raises(ValueError, match="reg_eps.*nan"):
        UPGrad(reg_eps=float("nan"))
    with pytest.raises(ValueError, match="max_iter.*0"):
        UPGrad(max_iter=0)
    with pytest.raises(ValueError, match="pref.*-1"):
        UPGrad(pref=[1.0, -1.0])
    with pytest.raises(ValueError, match="pref"):
        UPGrad(pref=[[1.0]])
    with pytest.raises(ValueError, match="square"):
        UPGrad().weights(torch.ones(2, 3))
    assert "reg_eps=0.0001" in repr(UPGrad())


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nonfinite_gram_gives_nan_without_checks():
    K = torch.eye(3)
    K[0, 1] = K[1, 0] = float("nan")
    assert torch.isnan(UPGrad(check=False).weights(K)).all()
    K = torch.eye(3)
    K[0, 0] = float("inf")
    assert torch.isnan(UPGrad(check=False).weights(K)).all()
    with pytest.raises(ValueError, match="non-finite"):
        UPGrad().weights(K)
