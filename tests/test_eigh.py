"""fm.solvers.eigh: symmetric eigendecomposition without host synchronisation.

In the default process the ``kernels`` tests run the CPU path (LAPACK); in the interpreter
process (``TRITON_INTERPRET=1 FASTMTL_BACKEND=triton pytest -m kernels``) they run the
single-program Triton Jacobi kernel on CPU tensors. The torch Jacobi reference is called
directly (it is what CUDA runs without Triton).
"""

from __future__ import annotations

import pytest
import torch
from conftest import device_backend_params

from fastmtl.backend import use_backend
from fastmtl.solvers.eigh import kept_eigenvalues, symmetric_eigh, symmetric_eigh_reference

PARAMS = device_backend_params()
DTYPES = [torch.float32, torch.float64]
KINDS = ("full", "low_rank", "graded", "duplicated")
# ‖VΛVᵀ − K‖/‖K‖ and ‖VᵀV − I‖: about T·ε for Jacobi.
TOL = {torch.float32: 2e-5, torch.float64: 1e-13}


def matrix(T: int, kind: str, seed: int = 0, dtype=torch.float64, device="cpu"):
    """Symmetric PSD test matrices: "full" (N = 2T + 3), "low_rank" (N = T // 2), "graded"
    (eigenvalues over 12 decades), "duplicated" (repeated rows: repeated zero eigenvalues)."""
    gen = torch.Generator().manual_seed(100 * T + seed)
    A = torch.randn(T, 2 * T + 3, generator=gen, dtype=torch.float64)
    if kind == "low_rank":
        A = A[:, : max(1, T // 2)]
    if kind == "duplicated":
        A = A[torch.arange(T) // 2]
    K = A @ A.T
    if kind == "graded":
        Q, _ = torch.linalg.qr(torch.randn(T, T, generator=gen, dtype=torch.float64))
        K = Q @ torch.diag(10.0 ** (-12 * torch.arange(T, dtype=torch.float64) / T)) @ Q.T
    return K.to(device=device, dtype=dtype)


def check_decomposition(lam, V, K):
    T = K.shape[0]
    K64, lam64, V64 = K.double().cpu(), lam.double().cpu(), V.double().cpu()
    scale = K64.abs().max().clamp_min(1e-300)
    tol = TOL[K.dtype] * max(1, T / 10)
    assert lam.shape == (T,) and V.shape == (T, T)
    assert (lam64[1:] >= lam64[:-1]).all(), "eigenvalues must be ascending"
    assert ((V64 @ torch.diag(lam64) @ V64.T - K64).abs().max() / scale) <= tol
    assert (V64.T @ V64 - torch.eye(T, dtype=torch.float64)).abs().max() <= tol
    exact = torch.linalg.eigvalsh(K64)
    assert ((lam64 - exact).abs().max() / scale) <= tol


CASES = [(T, kind, dtype) for T in (1, 2, 3, 5, 10) for kind in KINDS for dtype in DTYPES]
CASES += [(17, "full", torch.float32), (17, "duplicated", torch.float64)]


@pytest.mark.kernels
@pytest.mark.parametrize("T,kind,dtype", CASES,
                         ids=lambda v: str(v).removeprefix("torch.") if not isinstance(v, int)
                         else str(v))
@pytest.mark.parametrize("device,backend", PARAMS)
def test_decomposition(device, backend, T, kind, dtype):
    K = matrix(T, kind, dtype=dtype, device=device)
    with use_backend(backend):
        lam, V = symmetric_eigh(K)
    assert lam.dtype == dtype and V.dtype == dtype and lam.device == K.device
    check_decomposition(lam, V, K)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [2, 5, 10, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_reference(dtype, T, kind):
    """The torch Jacobi reference (the kernel's spec) with the default sweep budget."""
    K = matrix(T, kind, seed=1, dtype=dtype)
    check_decomposition(*symmetric_eigh_reference(K), K)


def test_reference_sweeps_converge():
    """Converged sweeps rotate nothing: more sweeps change nothing (the kernel stops early)."""
    K = matrix(10, "full", seed=2)
    lam, V = symmetric_eigh_reference(K, 12)
    lam2, V2 = symmetric_eigh_reference(K, 20)
    assert torch.equal(lam, lam2) and torch.equal(V, V2)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_symmetric_part_zero_and_nonfinite(device, backend):
    K = matrix(4, "full", dtype=torch.float64, device=device)
    skew = torch.triu(torch.ones(4, 4, dtype=torch.float64, device=device), 1)
    bad = K.clone()
    bad[1, 2] = float("nan")
    with use_backend(backend):
        lam, V = symmetric_eigh(K + skew - skew.T)  # only (K + Kᵀ)/2 is decomposed
        lam0, V0 = symmetric_eigh(torch.zeros(3, 3, device=device))
        lam_nan, V_nan = symmetric_eigh(bad)
    check_decomposition(lam, V, K)
    assert torch.equal(lam0, torch.zeros(3, device=device))
    check_decomposition(lam0, V0, torch.zeros(3, 3))
    assert torch.isnan(lam_nan).all() and torch.isnan(V_nan).all()


def test_kept_eigenvalues():
    lam = torch.tensor([-1e-20, 1e-17, 1e-3, 1.0], dtype=torch.float64)
    assert kept_eigenvalues(lam).tolist() == [False, False, True, True]
    assert kept_eigenvalues(lam, rtol=0.01).tolist() == [False, False, False, True]
    assert not kept_eigenvalues(torch.zeros(3)).any()
    assert not kept_eigenvalues(torch.full((2,), float("nan"))).any()


def test_traces_under_torch_compile():
    K = matrix(5, "full", dtype=torch.float32)
    compiled = torch.compile(symmetric_eigh, fullgraph=True, backend="aot_eager")
    lam, V = compiled(K)
    check_decomposition(lam, V, K)
    K3 = matrix(3, "full", dtype=torch.float64)  # the reference unrolls every round: keep T small
    reference = torch.compile(symmetric_eigh_reference, fullgraph=True, backend="aot_eager")
    check_decomposition(*reference(K3, 6), K3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="square"):
        symmetric_eigh(torch.ones(2, 3))
    with pytest.raises(TypeError, match="floating"):
        symmetric_eigh(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_sweeps.*0"):
        symmetric_eigh(torch.eye(2), max_sweeps=0)
