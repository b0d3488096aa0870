"""fm.solvers.min_norm_simplex: w = argmin_{w ∈ Δ} wᵀKw, on every implementation that runs here.

In the default process the ``kernels`` tests run the CPU path (exact active set); in the
interpreter process (``TRITON_INTERPRET=1 FASTMTL_BACKEND=triton pytest -m kernels``) they run
the single-program Triton kernel on CPU tensors. The torch reference is called directly.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import device_backend_params

import fastmtl as fm
from fastmtl.backend import use_backend
from fastmtl.solvers import min_norm_simplex_exact, min_norm_simplex_reference, simplex

PARAMS = device_backend_params()
DTYPES = [torch.float32, torch.float64]
# KKT tolerance relative to max_i K_ii: the iterative solvers stop at tol = 1e-6.
KKT_TOL = {torch.float64: 2e-6, torch.float32: 2e-5}
KINDS = ("full", "interior", "scaled")
# T = 40 once per dtype: each kernel step is ~20 interpreted ops under TRITON_INTERPRET=1.
CASES = [(T, kind, dtype) for T in (1, 2, 3, 5, 10) for kind in KINDS for dtype in DTYPES]
CASES += [(40, "full", torch.float32), (40, "interior", torch.float64)]


def gram(T: int, kind: str = "full", seed: int = 0, dtype=torch.float64, device="cpu"):
    """K = A Aᵀ: "full" (N = 2T + 3), "interior" (orthogonal-ish rows: all weights > 0),
    "scaled" (row norms over 4 decades), "wide" (N = 1000), "low_rank" (N = T // 2)."""
    gen = torch.Generator().manual_seed(1000 * T + seed)
    N = {"low_rank": max(1, T // 2), "wide": 1000}.get(kind, 2 * T + 3)
    A = torch.randn(T, N, generator=gen, dtype=torch.float64)
    if kind == "interior":
        A = torch.eye(T, N, dtype=torch.float64) * (1 + torch.rand(T, 1, generator=gen)) + 0.05 * A
    if kind == "scaled":
        A = A * 10 ** (4 * torch.rand(T, 1, generator=gen, dtype=torch.float64) - 2)
    return (A @ A.T).to(device=device, dtype=dtype)


def kkt_residual(w: torch.Tensor, K: torch.Tensor) -> float:
    """Largest violation of the KKT conditions, relative to max_i K_ii: (Kw)_i >= wᵀKw for all
    i, = on the support (w_i > 1e-6), plus |Σw − 1| and max(−w)."""
    w, K = w.double().cpu(), K.double().cpu()
    g = K @ w
    f = w @ g
    scale = K.diagonal().max().clamp_min(1e-300)
    below = (f - g).max() / scale
    support = w > 1e-6
    above = ((g - f)[support].max() / scale) if support.any() else torch.tensor(0.0)
    return max(below.item(), above.item(), abs(w.sum().item() - 1), (-w).max().item())


def objective(w: torch.Tensor, K: torch.Tensor) -> float:
    w, K = w.double().cpu(), K.double().cpu()
    return (w @ K @ w / K.diagonal().max()).item()


def brute_force(K: torch.Tensor) -> torch.Tensor:
    """Enumerate the supports S: solve [K_SS 1; 1ᵀ 0][μ; ν] = [0; 1], keep μ >= 0, take the best."""
    K = K.double()
    T = K.shape[0]
    best, best_f = None, float("inf")
    for r in range(1, T + 1):
        for S in itertools.combinations(range(T), r):
            idx = torch.tensor(S)
            A = torch.ones(r + 1, r + 1, dtype=torch.float64)
            A[:r, :r] = K[idx][:, idx]
            A[r, r] = 0
            rhs = torch.zeros(r + 1, dtype=torch.float64)
            rhs[r] = 1
            sol = torch.linalg.lstsq(A, rhs).solution
            if (sol[:r] < -1e-12).any():
                continue
            w = torch.zeros(T, dtype=torch.float64)
            w[idx] = sol[:r].clamp_min(0)
            w = w / w.sum()
            f = (w @ K @ w).item()
            if f < best_f - 1e-14:
                best, best_f = w, f
    return best


def solve(K, backend, **kw):
    with use_backend(backend):
        return fm.solvers.min_norm_simplex(K, **kw)


@pytest.mark.kernels
@pytest.mark.parametrize("T,kind,dtype", CASES,
                         ids=[f"T{T}-{k}-{str(d)[6:]}" for T, k, d in CASES])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_kkt(device, backend, dtype, T, kind):
    K = gram(T, kind, dtype=dtype, device=device)
    w = solve(K, backend)
    assert w.shape == (T,) and w.dtype == dtype and w.device == K.device
    assert kkt_residual(w, K) <= KKT_TOL[dtype]
    if kind == "interior":
        assert (w > 0).all()


def _two_tasks(impl: str):
    """The T = 2 closed form: "host" (float64 numpy, CPU tensors) or "torch" (any device)."""
    return fm.solvers.min_norm_simplex if impl == "host" else simplex._two_tasks


@pytest.mark.parametrize("impl", ["host", "torch"])
@pytest.mark.parametrize("seed", range(5))
def test_two_tasks_closed_form(seed, impl):
    K = gram(2, "full", seed=seed)
    w = _two_tasks(impl)(K)
    c = ((K[1, 1] - K[0, 1]) / (K[0, 0] + K[1, 1] - 2 * K[0, 1])).clamp(0, 1)
    torch.testing.assert_close(w, torch.stack([c, 1 - c]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("impl", ["host", "torch"])
def test_two_tasks_degenerate(impl):
    solve2 = _two_tasks(impl)
    same = torch.ones(2, 2, dtype=torch.float64)  # g1 = g2: 0/0 guarded, any w is optimal
    assert torch.equal(solve2(same), torch.tensor([0.5, 0.5]).double())
    dominated = torch.tensor([[1.0, 1.0], [1.0, 4.0]])  # <g1, g2> >= |g1|²: the vertex e_1
    assert torch.equal(solve2(dominated), torch.tensor([1.0, 0.0]))
    assert torch.equal(solve2(torch.zeros(2, 2)), torch.tensor([0.5, 0.5]))
    assert torch.isnan(solve2(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))).all()


@pytest.mark.kernels
@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_kernel_tiny_T(device, backend, T):
    """The kernel itself at T = 1, 2 (the public function takes the closed form there)."""
    if backend != "triton":
        pytest.skip("runs the Triton kernel only")
    from fastmtl.kernels.simplex import launch

    K = gram(T, "full", seed=4, device=device)
    expected = simplex._two_tasks(K) if T == 2 else torch.ones(1, dtype=K.dtype)
    torch.testing.assert_close(launch(K, 1000, 1e-6), expected.to(device), rtol=0, atol=1e-12)


@pytest.mark.parametrize("T", [3, 4, 6])
@pytest.mark.parametrize("kind", ["full", "scaled", "low_rank"])
@pytest.mark.parametrize("seed", range(3))
def test_matches_brute_force(T, kind, seed):
    K = gram(T, kind, seed=seed)
    ref = brute_force(K)
    exact = fm.solvers.min_norm_simplex(K)
    iterative = min_norm_simplex_reference(K, 3000, 1e-9)
    assert objective(exact, K) <= objective(ref, K) + 1e-12
    assert objective(iterative, K) <= objective(ref, K) + 1e-9
    if kind != "low_rank":  # strictly convex: the minimiser is unique
        torch.testing.assert_close(exact, ref, rtol=0, atol=1e-9)


@pytest.mark.compare
@pytest.mark.parametrize("T", [3, 5, 10])
def test_matches_quadprog(T):
    quadprog = pytest.importorskip("quadprog")
    import numpy as np

    K = gram(T, "scaled", seed=7)
    C = np.concatenate([np.ones((T, 1)), np.eye(T)], axis=1)
    b = np.concatenate([[1.0], np.zeros(T)])
    ref = quadprog.solve_qp(K.numpy() + 1e-12 * np.eye(T), np.zeros(T), C, b, meq=1)[0]
    w = fm.solvers.min_norm_simplex(K)
    assert objective(w, K) <= objective(torch.from_numpy(ref), K) + 1e-9


@pytest.mark.kernels
@pytest.mark.parametrize("T", [3, 5, 10])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_permutation_equivariance(device, backend, T):
    K = gram(T, "scaled", seed=3, device=device)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(T)).to(device)
    w = solve(K, backend)
    wp = solve(K[perm][:, perm], backend)
    torch.testing.assert_close(wp, w[perm], rtol=0, atol=1e-5)


def _degenerate(name: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    if name == "duplicates":
        A = torch.randn(6, 30, generator=gen, dtype=torch.float64)[[0, 1, 1, 2, 3, 3, 3, 4, 5]]
    elif name == "zero_row":
        A = torch.randn(6, 30, generator=gen, dtype=torch.float64)
        A[2] = 0
    elif name == "all_zero":
        A = torch.zeros(5, 3, dtype=torch.float64)
    elif name == "identical":
        A = torch.ones(4, 3, dtype=torch.float64)
    elif name == "opposite":  # g and −g: 0 is in the hull
        A = torch.randn(1, 7, generator=gen, dtype=torch.float64)
        A = torch.cat([A, -A, 2 * A])
    return (A @ A.T).to(device=device, dtype=dtype)


DEGENERATE = ["T_greater_than_N", "duplicates", "zero_row", "all_zero", "identical", "opposite"]


@pytest.mark.kernels
@pytest.mark.parametrize("name", DEGENERATE)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device,backend", PARAMS)
def test_rank_deficient(device, backend, dtype, name):
    K = _degenerate(name, device, dtype)
    w = solve(K, backend)
    assert torch.isfinite(w).all()
    assert (w >= 0).all() and abs(w.double().sum().item() - 1) <= 1e-6
    assert kkt_residual(w, K) <= KKT_TOL[dtype]
    if name in ("zero_row", "opposite"):  # 0 is in the hull
        assert objective(w, K) <= KKT_TOL[dtype]


@pytest.mark.kernels
@pytest.mark.parametrize("T,kind", [(3, "scaled"), (5, "full"), (10, "scaled"), (40, "wide")])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device,backend", PARAMS)
def test_implementations_agree(device, backend, dtype, T, kind):
    """The dispatched path (exact on CPU, the kernel under the interpreter) against the torch
    reference and the exact solver: same weights for these strictly convex problems."""
    K = gram(T, kind, seed=11, dtype=dtype, device=device)
    w = solve(K, backend)
    ref = min_norm_simplex_reference(K, 2000, 1e-6)
    exact = min_norm_simplex_exact(K.cpu())
    atol = 1e-4 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(w.double().cpu(), exact.double(), rtol=0, atol=atol)
    torch.testing.assert_close(ref.double().cpu(), exact.double(), rtol=0, atol=atol)
    assert abs(objective(w, K) - objective(exact, K)) <= KKT_TOL[dtype]


@pytest.mark.kernels
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_nonfinite_gives_nan(device, backend, T):
    K = gram(T, device=device)
    K[0, T - 1] = K[T - 1, 0] = float("nan")
    assert torch.isnan(solve(K, backend)).all()
    K[0, T - 1] = K[T - 1, 0] = float("inf")
    assert torch.isnan(solve(K, backend)).all()
    assert torch.isnan(min_norm_simplex_reference(K, 5)).all()


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_half_precision_input(device, backend, dtype):
    K = gram(5, "interior", dtype=dtype, device=device)
    w = solve(K, backend)
    assert w.dtype == dtype and torch.isfinite(w).all()
    assert kkt_residual(w, K.double()) <= 2e-2


def test_budget_is_respected():
    """A one-step budget still returns a point of the simplex (of the reference, traceable)."""
    K = gram(10, "scaled")
    w = min_norm_simplex_reference(K, max_iter=1, tol=1e-6)
    assert (w >= 0).all() and abs(w.sum().item() - 1) < 1e-12
    assert objective(w, K) <= K.diagonal().min().item() / K.diagonal().max().item() + 1e-12


def test_bad_input():
    with pytest.raises(ValueError, match="square"):
        fm.solvers.min_norm_simplex(torch.ones(2, 3))
    with pytest.raises(ValueError, match="square"):
        fm.solvers.min_norm_simplex(torch.ones(3))
    with pytest.raises(ValueError, match="square"):
        fm.solvers.min_norm_simplex(torch.ones(0, 0))
    with pytest.raises(TypeError, match="floating"):
        fm.solvers.min_norm_simplex(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fm.solvers.min_norm_simplex([[1.0]])
    with pytest.raises(ValueError, match="max_iter"):
        fm.solvers.min_norm_simplex(torch.eye(3), max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        fm.solvers.min_norm_simplex(torch.eye(3), tol=-1.0)
