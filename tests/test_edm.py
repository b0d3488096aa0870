"""EDM (Katrutsa et al. 2020): the equiangular direction from the normalised min-norm point."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_equivariant_and_scale_free, assert_nonfinite_gram_gives_nan
from conftest import device_backend_params

from fastmtl.aggregators.edm import EDM
from fastmtl.backend import use_backend
from fastmtl.solvers.simplex import min_norm_simplex_exact

PARAMS = device_backend_params()
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float64: 1e-9, torch.float32: 2e-5}


def gradients(T: int, kind: str = "interior", seed: int = 0, dtype=torch.float64,
              device="cpu") -> torch.Tensor:
    """(T, N) gradients with norms over two decades: "interior" (nearly orthogonal: every α_i
    > 0), "random" (N = 2T + 3) or "low_rank" (N = T // 2 + 1 < T)."""
    gen = torch.Generator().manual_seed(1000 * T + seed)
    N = T // 2 + 1 if kind == "low_rank" else 2 * T + 3
    G = torch.randn(T, N, generator=gen, dtype=torch.float64)
    if kind == "interior":
        G = torch.eye(T, N, dtype=torch.float64) + 0.3 * G / N**0.5
    G = G * 10 ** (2 * torch.rand(T, 1, generator=gen, dtype=torch.float64) - 1)
    return G.to(device=device, dtype=dtype)


def cosines(G: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    G, d = G.double().cpu(), d.double().cpu()
    return G @ d / (G.norm(dim=1) * d.norm())


def expected(G: torch.Tensor) -> torch.Tensor:
    """w_i = γ α_i/‖g_i‖ with α the exact min-norm point of the unit vectors (float64)."""
    G = G.double().cpu()
    n = G.norm(dim=1)
    U = G / n[:, None]
    v = min_norm_simplex_exact(U @ U.T) / n
    return v / v.sum()


@pytest.mark.parametrize("T", [1, 2, 3, 5, 10, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_equal_angles(dtype, T):
    """Interior α: d makes the same angle with every g_i; w on the simplex; w = γα/‖g‖."""
    G = gradients(T, dtype=dtype)
    agg = EDM()
    w = agg.weights(G @ G.T)
    d = agg(G)
    assert w.shape == (T,) and w.dtype == dtype
    assert (w >= 0).all() and abs(w.sum().item() - 1) <= TOL[dtype]
    cos = cosines(G, d)
    assert (cos.max() - cos.min()) <= 10 * TOL[dtype] and cos.min() > 0
    torch.testing.assert_close(w.double(), expected(G), rtol=10 * TOL[dtype], atol=0)


@pytest.mark.parametrize("T", [3, 10])
def test_support_angles_and_descent(T):
    """General position: equal angles on the support of α, no larger angle elsewhere."""
    G = gradients(T, "random", seed=1)
    w = EDM().weights(G @ G.T)
    alpha = w * G.norm(dim=1)
    alpha = alpha / alpha.sum()
    cos = cosines(G, w @ G)
    support = alpha > 1e-9
    assert (cos[support].max() - cos[support].min()) <= 1e-9
    assert (cos >= cos[support].min() - 1e-9).all()
    assert cos.min() > 0


def test_two_tasks_closed_form():
    G = gradients(2, "random", seed=2)
    n = G.norm(dim=1)
    d_ref = (G[0] / n[0] + G[1] / n[1]) / (1 / n[0] + 1 / n[1])
    torch.testing.assert_close(EDM()(G), d_ref, rtol=1e-12, atol=1e-12 * n.max().item())


def test_single_task_is_the_gradient():
    G = gradients(1, "random", seed=3)
    assert torch.equal(EDM().weights(G @ G.T), torch.ones(1, dtype=G.dtype))


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_zero_duplicated_and_rank_deficient(device, backend):
    """A zero gradient: w = e_i, d = 0 (several: w spread over them); all-zero K: w = 1/T;
    duplicated rows share their α; T > N: finite, on the simplex."""
    G = gradients(5, "random", seed=4, device=device)
    G[2] = 0
    dup = gradients(4, "interior", seed=5, device=device)[[0, 1, 2, 2]]
    low = gradients(9, "low_rank", seed=6, device=device)
    agg = EDM()
    with use_backend(backend):
        w = agg.weights(G @ G.T)
        G2 = G.clone()
        G2[4] = 0
        w2 = agg.weights(G2 @ G2.T)
        w0 = agg.weights(torch.zeros(3, 3, dtype=G.dtype, device=device))
        w_dup = agg.weights(dup @ dup.T)
        w_ref = agg.weights(dup[:3] @ dup[:3].T)
        w_low = agg.weights(low @ low.T)
    torch.testing.assert_close(w.cpu(), torch.eye(5, dtype=G.dtype)[2], rtol=0, atol=1e-6)
    assert torch.isfinite(w2).all() and abs(w2[[2, 4]].sum().item() - 1) <= 1e-6
    torch.testing.assert_close(w0.cpu(), torch.full((3,), 1 / 3, dtype=G.dtype))
    torch.testing.assert_close((w_dup[:2].cpu(), w_dup[2:].sum().cpu()),
                               (w_ref[:2].cpu(), w_ref[2].cpu()), rtol=1e-5, atol=1e-7)
    assert torch.isfinite(w_low).all() and (w_low >= 0).all()
    assert abs(w_low.sum().item() - 1) <= 1e-9


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_backends_agree(device, backend):
    """Every backend (the Triton simplex kernel under the interpreter) against the exact
    float64 weights, within the iterative solver's tolerance."""
    G = gradients(6, seed=7, device=device)
    with use_backend(backend):
        w = EDM().weights(G @ G.T)
    torch.testing.assert_close(w.cpu(), expected(G), rtol=1e-5, atol=1e-7)


def test_permutation_equivariance_and_scaling():
    assert_equivariant_and_scale_free(EDM(), gradients(7, "random", seed=8), rtol=1e-9, atol=0)


def test_nonfinite_gram_gives_nan_without_checks():
    assert_nonfinite_gram_gives_nan(EDM)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_iter.*0"):
        EDM(max_iter=0)
    with pytest.raises(ValueError, match="tol.*-1"):
        EDM(tol=-1.0)
    with pytest.raises(ValueError, match="eps.*1.5"):
        EDM(eps=1.5)
    with pytest.raises(ValueError, match="square"):
        EDM().weights(torch.ones(2, 3))
    assert repr(EDM()) == "EDM(max_iter=1000, tol=1e-06, eps=1e-08)"
