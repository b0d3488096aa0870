"""fm.aggregators.NashMTL: the Nash bargaining weights, the norm clip and the update period."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_nonfinite_gram_gives_nan
from conftest import device_backend_params

import fastmtl as fm
from fastmtl.aggregators.nash_mtl import NashMTL
from fastmtl.backend import use_backend

PARAMS = device_backend_params()
DTYPES = [torch.float32, torch.float64]
REG = 1e-6


def problem(T: int, seed: int = 0, N: int = 40, spread: float = 1.0, dtype=torch.float64,
            device="cpu"):
    """Gaussian gradients (T, N) with norms over ``spread`` decades."""
    gen = torch.Generator().manual_seed(1000 * T + seed)
    G = torch.randn(T, N, generator=gen, dtype=torch.float64)
    G = G * 10 ** (spread * (torch.rand(T, 1, generator=gen, dtype=torch.float64) - 0.5))
    return G.to(device=device, dtype=dtype)


def weights(agg, K, backend):
    with use_backend(backend):
        return agg.weights(K)


@pytest.mark.kernels
@pytest.mark.parametrize("T", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device,backend", PARAMS)
def test_bargaining_solution_and_clip(device, backend, dtype, T):
    """Unclipped: α_i (Kα)_i = 1 up to the regulariser; clipped: w = α · min(1, 1/‖d‖)."""
    G = problem(T, seed=T, dtype=dtype, device=device)
    K = fm.ops.gram(G)
    alpha = weights(NashMTL(max_norm=0.0), K, backend)
    assert alpha.shape == (T,) and alpha.dtype == dtype and alpha.device == G.device
    a, K64 = alpha.double().cpu(), K.double().cpu()
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(a * (K64 @ a), 1 - REG * K64.diagonal() * a**2, rtol=0, atol=tol)
    w = weights(NashMTL(), K, backend).double().cpu()
    norm = (a @ K64 @ a).sqrt()  # = √T at the solution
    assert abs(norm.item() - math.sqrt(T)) <= 1e-4 * math.sqrt(T)
    torch.testing.assert_close(w, a * min(1.0, 1.0 / norm.item()), rtol=1e-6, atol=0)
    d = fm.ops.combine(w.to(dtype).to(device), G).double()
    assert d.norm() <= 1 + 1e-5
    assert (G.double() @ d > 0).all()  # a common descent direction


@pytest.mark.parametrize("max_norm", [0.0, -1.0, math.inf, 100.0])
def test_clip_disabled_or_inactive(max_norm):
    K = fm.ops.gram(problem(4, seed=1))
    torch.testing.assert_close(NashMTL(max_norm=max_norm).weights(K),
                               fm.solvers.nash.nash_bargaining(K))


def test_single_task():
    """T = 1: α = 1/‖g‖ (times 1/√(1 + reg)), d = g/‖g‖ and the clip at 1 leaves it alone."""
    G = problem(1, seed=2)
    w = NashMTL().weights(fm.ops.gram(G))
    torch.testing.assert_close(w, 1 / (G.norm(dim=1) * math.sqrt(1 + REG)), rtol=1e-12, atol=0)
    torch.testing.assert_close(NashMTL()(G), G[0] / G[0].norm(), rtol=1e-6, atol=0)
    torch.testing.assert_close(NashMTL(max_norm=0.5)(G), 0.5 * G[0] / G[0].norm(), rtol=1e-6,
                               atol=0)


@pytest.mark.parametrize("every", [1, 3])
def test_update_weights_every(every):
    """α is recomputed on calls 0, k, 2k, ... and reused in between (clip from the current K)."""
    Ks = [fm.ops.gram(problem(3, seed=s)) for s in range(7)]
    agg = NashMTL(max_norm=0.0, update_weights_every=every)
    for t, K in enumerate(Ks):
        w = agg.weights(K)
        fresh = fm.solvers.nash.nash_bargaining(Ks[t - t % every])
        torch.testing.assert_close(w, fresh, rtol=0, atol=0)
    assert agg.step == 7
    clipped = NashMTL(max_norm=0.1, update_weights_every=2)
    alpha = fm.solvers.nash.nash_bargaining(Ks[0])
    clipped.weights(Ks[0])
    w1 = clipped.weights(Ks[1])
    torch.testing.assert_close(w1, alpha * 0.1 / (alpha @ Ks[1] @ alpha).sqrt())


def test_state_dict_round_trip_and_reset():
    Ks = [fm.ops.gram(problem(4, seed=s)) for s in range(5)]
    a, b = NashMTL(update_weights_every=2), NashMTL(update_weights_every=2)
    for K in Ks[:3]:
        a.weights(K)
    state = a.state_dict()
    assert state["step"] == 3 and set(state["state"]) == {"alpha"}
    b.load_state_dict(state)
    for K in Ks[3:]:
        torch.testing.assert_close(a.weights(K), b.weights(K), rtol=0, atol=0)
    a.reset()
    assert a.step == 0 and a.state_dict()["state"] == {}
    torch.testing.assert_close(a.weights(Ks[4]), NashMTL().weights(Ks[4]))


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_permutation_equivariance(device, backend):
    G = problem(6, seed=3, device=device)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0)).to(device)
    w = weights(NashMTL(), fm.ops.gram(G), backend)
    wp = weights(NashMTL(), fm.ops.gram(G[perm]), backend)
    torch.testing.assert_close(wp, w[perm], rtol=1e-9, atol=0)


@pytest.mark.kernels
@pytest.mark.parametrize("case", ["duplicated", "rank_deficient", "zero_row", "all_zero",
                                  "opposite"])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_degenerate_gradients_are_finite(device, backend, case):
    G = problem(5, seed=4, N=12, device=device)
    if case == "duplicated":
        G[3] = G[1]
    elif case == "rank_deficient":
        G = G[:, :2].clone()  # T > N: 0 is in the hull, no bargaining solution
    elif case == "zero_row":
        G[2] = 0
    elif case == "all_zero":
        G = torch.zeros_like(G)
    else:
        G[1] = -G[0]
    for agg in (NashMTL(), NashMTL(max_norm=0.0)):
        w = weights(agg, fm.ops.gram(G), backend)
        assert torch.isfinite(w).all() and (w > 0).all()
        d = fm.ops.combine(w, G)
        assert torch.isfinite(d).all()
        if agg.max_norm > 0:
            assert d.norm() <= 1 + 1e-6


@pytest.mark.parametrize("c", [1e-4, 1e3])
def test_direction_is_scale_free(c):
    """α_i ∝ 1/‖g_i‖ under rescaling, so d does not change (and is clipped to norm 1)."""
    G = problem(5, seed=5)
    d = NashMTL(max_norm=0.0)(G)
    atol = 1e-10 * d.norm().item()  # entries of d are cancellations: compare to its norm
    torch.testing.assert_close(NashMTL(max_norm=0.0)(c * G), d, rtol=0, atol=atol)
    scales = torch.logspace(-2, 2, 5, dtype=torch.float64)[:, None]
    torch.testing.assert_close(NashMTL(max_norm=0.0)(scales * G), d, rtol=0, atol=atol)


@pytest.mark.compare
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("T", [2, 3, 5, 10])
@pytest.mark.parametrize("seed", range(3))
def test_matches_torchjd(T, seed):
    """Against torchjd's NashMTL (the official CCP with cvxpy/ECOS). Its CCP can stop with
    some α_i(Kα)_i well above 1 (an inactive constraint; often when gradient norms span two
    decades), so the comparison is on norms within one decade, where it solves the equations."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("cvxpy")
    G = problem(T, seed=seed, N=30, spread=1.0)
    K = G @ G.T
    theirs = aggregation.NashMTL(n_tasks=T, max_norm=0.0).weighting(G)
    assert ((theirs * (K @ theirs)) - 1).abs().max() <= 1e-3
    ours = NashMTL(max_norm=0.0).weights(K)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)
    clipped = aggregation.NashMTL(n_tasks=T, max_norm=1.0).weighting(G)
    torch.testing.assert_close(NashMTL().weights(K), clipped, rtol=1e-4, atol=0)


@pytest.mark.parametrize("T", [2, 5])
@pytest.mark.parametrize("every", [1, 2])
def test_traces_under_torch_compile(T, every):
    torch._dynamo.reset()
    G = problem(T, seed=6, dtype=torch.float32)
    Ks = [fm.ops.gram(G), fm.ops.gram(2 * G)]
    eager, agg = NashMTL(update_weights_every=every), NashMTL(update_weights_every=every)
    compiled = torch.compile(agg.weights, fullgraph=True, backend="aot_eager")
    for K in Ks:
        torch.testing.assert_close(compiled(K), eager.weights(K))
    assert agg.step == eager.step == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_norm.*nan"):
        NashMTL(max_norm=float("nan"))
    with pytest.raises(ValueError, match="update_weights_every.*0"):
        NashMTL(update_weights_every=0)
    with pytest.raises(ValueError, match="max_iter.*0"):
        NashMTL(max_iter=0)
    with pytest.raises(ValueError, match="reg.*0"):
        NashMTL(reg=0.0)
    with pytest.raises(ValueError, match="square"):
        NashMTL().weights(torch.ones(2, 3))
    assert "update_weights_every=1" in repr(NashMTL())


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nonfinite_gram_gives_nan_without_checks():
    assert_nonfinite_gram_gives_nan(NashMTL, T=3)
