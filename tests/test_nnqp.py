"""fm.solvers.nnqp.dual_cone_projection: V[b] = argmin_{v >= U[b]} vᵀMv, every implementation.

In the default process the ``kernels`` tests run the CPU path (exact pivoting in numpy); in the
interpreter process (``TRITON_INTERPRET=1 FASTMTL_BACKEND=triton pytest -m kernels``) they run
the Triton kernel on CPU tensors. The torch reference is called directly.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import device_backend_params

from fastmtl.backend import use_backend
from fastmtl.solvers.nnqp import (
    default_max_iter,
    dual_cone_projection,
    dual_cone_projection_exact,
    dual_cone_projection_reference,
)

PARAMS = device_backend_params()
KINDS = ("gauss", "conflict", "low_rank", "scaled")
KKT_TOL = 1e-10  # relative to max|U| (the solvers work in float64)


def upgrad_problem(T: int, kind: str = "gauss", seed: int = 0, device="cpu"):
    """(M, U) of UPGrad: M = K / tr K + 1e-4 I, U = I / T, for K = A Aᵀ of the given kind:
    "gauss" (N = 2T + 3), "conflict" (± one shared direction + noise), "low_rank" (N = T // 4),
    "scaled" (row norms over four decades)."""
    gen = torch.Generator().manual_seed(100 * T + seed)
    A = torch.randn(T, 2 * T + 3, generator=gen, dtype=torch.float64)
    if kind == "conflict":
        sign = torch.where(torch.rand(T, 1, generator=gen) < 0.5, -1.0, 1.0).double()
        A = sign * torch.randn(1, 2 * T + 3, generator=gen, dtype=torch.float64) + 0.3 * A
    elif kind == "low_rank":
        A = A[:, : max(1, T // 4)]
    elif kind == "scaled":
        A = A * 10 ** (4 * torch.rand(T, 1, generator=gen, dtype=torch.float64) - 2)
    K = A @ A.T
    M = K / K.trace() + 1e-4 * torch.eye(T, dtype=torch.float64)
    U = torch.eye(T, dtype=torch.float64) / T
    return M.to(device), U.to(device)


def kkt_residual(V: torch.Tensor, M: torch.Tensor, U: torch.Tensor) -> float:
    """max over rows of: max(U − V), max(−MV), max |(MV)_j (V − U)_j|, relative to max|U|."""
    V, M, U = V.double().cpu(), M.double().cpu(), U.double().cpu()
    mu = V @ M
    scale = U.abs().max().clamp_min(1e-300)
    return max((U - V).max().item(), (-mu).max().item(),
               (mu * (V - U)).abs().max().item() / scale.item()) / scale.item()


def brute_force(M: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Enumerate the free sets F: v_F solves (Mv)_F = 0 with v = u off F; keep the KKT point."""
    T = M.shape[0]
    for r in range(T + 1):
        for F in itertools.combinations(range(T), r):
            v = u.clone()
            if F:
                f = torch.tensor(F)
                B = torch.tensor([j for j in range(T) if j not in F], dtype=torch.long)
                v[f] = torch.linalg.solve(M[f][:, f], -M[f][:, B] @ u[B])
            if kkt_residual(v[None], M, u[None]) <= 1e-12:
                return v
    raise AssertionError("no KKT point: M is not positive definite")


def solve(M, U, backend, **kw):
    with use_backend(backend):
        return dual_cone_projection(M, U, **kw)


CASES = [(T, kind) for T in (1, 2, 3, 5, 10) for kind in KINDS] + [(40, "conflict")]


@pytest.mark.kernels
@pytest.mark.parametrize("T,kind", CASES, ids=[f"T{T}-{k}" for T, k in CASES])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_kkt(device, backend, T, kind):
    M, U = upgrad_problem(T, kind, device=device)
    V = solve(M, U, backend)
    assert V.shape == (T, T) and V.dtype == torch.float64 and V.device == M.device
    assert kkt_residual(V, M, U) <= KKT_TOL


@pytest.mark.parametrize("T", [2, 3, 4, 5])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(2))
def test_matches_brute_force(T, kind, seed):
    M, U = upgrad_problem(T, kind, seed=seed)
    expected = torch.stack([brute_force(M, U[b]) for b in range(T)])
    for V in (dual_cone_projection(M, U), dual_cone_projection_reference(M, U)):
        torch.testing.assert_close(V, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("T", [3, 6])
def test_general_lower_bounds(T):
    """Any bounds, negative ones and more problems than tasks included (B = 2T)."""
    gen = torch.Generator().manual_seed(T)
    M, _ = upgrad_problem(T, "conflict")
    U = torch.randn(2 * T, T, generator=gen, dtype=torch.float64)
    for V in (dual_cone_projection(M, U), dual_cone_projection_reference(M, U)):
        assert kkt_residual(V, M, U) <= KKT_TOL
        torch.testing.assert_close(V[0], brute_force(M, U[0]), rtol=0, atol=1e-12)


@pytest.mark.kernels
@pytest.mark.parametrize("T,kind", [(5, "conflict"), (10, "scaled"), (40, "low_rank")])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_implementations_agree(device, backend, T, kind):
    M, U = upgrad_problem(T, kind, seed=3, device=device)
    V = solve(M, U, backend)
    exact = dual_cone_projection_exact(M.cpu(), U.cpu())
    ref = dual_cone_projection_reference(M, U)
    torch.testing.assert_close(V.cpu(), exact, rtol=0, atol=1e-12)
    torch.testing.assert_close(ref.cpu(), exact, rtol=0, atol=1e-12)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_permutation_equivariance(device, backend):
    M, U = upgrad_problem(7, "conflict", seed=5, device=device)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1)).to(device)
    V = solve(M, U, backend)
    Vp = solve(M[perm][:, perm], U[perm][:, perm], backend)
    torch.testing.assert_close(Vp, V[perm][:, perm], rtol=0, atol=1e-12)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_degenerate(device, backend):
    """Duplicated and zero rows in K, a zero bound row, T = 1, a float32 input."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(6, 30, generator=gen, dtype=torch.float64)[[0, 1, 1, 2, 3, 3]]
    A[4] = 0
    K = A @ A.T
    M = (K / K.trace() + 1e-4 * torch.eye(6, dtype=torch.float64)).to(device)
    U = (torch.eye(6, dtype=torch.float64) / 6).to(device)
    U[2] = 0
    V = solve(M, U, backend)
    assert torch.isfinite(V).all() and kkt_residual(V, M, U) <= KKT_TOL
    assert torch.equal(V[2], torch.zeros(6, dtype=torch.float64, device=device))
    one = solve(torch.full((1, 1), 2.0, device=device), torch.full((1, 1), 0.5, device=device),
                backend)
    assert one.tolist() == [[0.5]]
    V32 = solve(M.float(), U.float(), backend)
    assert V32.dtype == torch.float64 and kkt_residual(V32, M.float(), U.float()) <= 1e-6


@pytest.mark.kernels
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("device,backend", PARAMS)
def test_nonfinite_gives_nan(device, backend):
    M, U = upgrad_problem(4, device=device)
    M[0, 3] = M[3, 0] = float("nan")
    assert torch.isnan(solve(M, U, backend)).all()
    assert torch.isnan(dual_cone_projection_reference(M, U, 3)).all()
    M[0, 3] = M[3, 0] = float("inf")
    assert torch.isnan(solve(M, U, backend)).all()


def test_budget():
    """A zero budget returns the bounds; the default budget is 4T + 20 pivots."""
    M, U = upgrad_problem(6, "conflict")
    assert torch.equal(dual_cone_projection_reference(M, U, 0), U)
    assert default_max_iter(6) == 44
    assert kkt_residual(dual_cone_projection_reference(M, U), M, U) <= KKT_TOL


@pytest.mark.compare
@pytest.mark.parametrize("T", [3, 6, 10])
def test_matches_quadprog(T):
    quadprog = pytest.importorskip("quadprog")
    M, U = upgrad_problem(T, "conflict", seed=9)
    V = dual_cone_projection(M, U)
    for b in range(T):
        ref = quadprog.solve_qp(M.numpy(), torch.zeros(T).double().numpy(),
                                torch.eye(T).double().numpy(), U[b].numpy())[0]
        torch.testing.assert_close(V[b], torch.from_numpy(ref), rtol=0, atol=1e-10)


def test_traces_under_torch_compile():
    M, U = upgrad_problem(5, "conflict")
    fn = torch.compile(dual_cone_projection, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(M, U), dual_cone_projection(M, U))


def test_bad_input():
    M, U = upgrad_problem(3)
    with pytest.raises(ValueError, match="square"):
        dual_cone_projection(torch.ones(2, 3), U)
    with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
        dual_cone_projection(M, torch.ones(3, 2))
    with pytest.raises(TypeError, match="floating"):
        dual_cone_projection(M, U.long())
    with pytest.raises(TypeError, match="torch.Tensor"):
        dual_cone_projection([[1.0]], U)
    with pytest.raises(ValueError, match="max_iter.*-1"):
        dual_cone_projection(M, U, max_iter=-1)
    with pytest.raises(ValueError, match="CPU"):
        dual_cone_projection_exact(M.to("meta"), U.to("meta"))
    assert dual_cone_projection(M, U[:0]).shape == (0, 3)
