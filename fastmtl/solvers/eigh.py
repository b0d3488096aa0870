r"""Symmetric eigendecomposition of a small T×T matrix, with no host synchronisation on CUDA.

``symmetric_eigh(K)`` returns (λ, V) with K = V diag(λ) Vᵀ, λ ascending and V orthogonal, as
``torch.linalg.eigh`` does (of the symmetric part (K + Kᵀ)/2). On CUDA ``torch.linalg.eigh``
checks the solver's status on the host (a synchronisation, which also breaks CUDA-graph
capture), so there the decomposition is a cyclic Jacobi method instead:

==================  ===============================================================
CPU tensor          ``torch.linalg.eigh`` (LAPACK), ``max_sweeps`` unused
CUDA, "triton"      one single-program Triton kernel (``fastmtl.kernels.eigh``),
                    T <= 128; it stops on device once a sweep rotates nothing
CUDA, "torch"       ``symmetric_eigh_reference``: the same Jacobi method with torch
                    ops, always ``max_sweeps`` sweeps (~40 small ops a round,
                    T − 1 rounds a sweep: thousands of launches, a fallback only)
==================  ===============================================================

With ``FASTMTL_BACKEND=triton`` and ``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors
(how the tests check it). Under ``torch.compile`` it is the opaque custom op ``fastmtl::eigh``.
Work dtype: float64 for float64 K, float32 otherwise; non-finite K gives NaN λ and V.

The Jacobi method (Golub & Van Loan, §8.5; parallel "round-robin" ordering, Brent & Luk 1985):
the T (padded to an even M) indices are paired M − 1 times so that every pair (p, q) meets once
a sweep; in a round all M/2 disjoint pairs rotate at once, A ← JᵀAJ, V ← VJ, with for each pair

.. math::

    \tau = \frac{a_{qq} - a_{pp}}{2 a_{pq}},\quad
    t = \frac{\operatorname{sign}\tau}{|\tau| + \sqrt{1+\tau^2}},\quad
    c = \frac{1}{\sqrt{1+t^2}},\quad s = tc,\quad
    a_{pp} \leftarrow a_{pp} - t a_{pq},\ a_{qq} \leftarrow a_{qq} + t a_{pq},\ a_{pq} \leftarrow 0.

A pair rotates only if |a_pq| > ε √|a_pp a_qq| + (ε/100) max_i |K_ii| (ε: machine epsilon): the
relative test of Demmel & Veselić (1992), which resolves small eigenvalues of graded PSD
matrices to high relative accuracy, with an absolute floor far below the rank cut of
``kept_eigenvalues``. Once no pair rotates a sweep changes nothing, so the kernel's early stop
and the reference's fixed sweeps agree. Convergence is quadratic: measured on random,
low-rank, duplicated-row, clustered and graded (12 decades) K, float32 reaches its rounding
level within 6–10 sweeps for T <= 40 and float64 within 6–16 (the graded T = 40 case needs 16,
T = 64 up to 19); the default ``max_sweeps`` = 16 is a budget, not a cost, for the kernel.
Accuracy: ‖VΛVᵀ − K‖/‖K‖ and ‖VᵀV − I‖ about T·ε (LAPACK: a few ε).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmtl._checks import check_int
from fastmtl.kernels._limits import MAX_T
from fastmtl.ops._common import acc_dtype
from fastmtl.solvers._common import check_square, solver_path

__all__ = ["MAX_SWEEPS", "kept_eigenvalues", "symmetric_eigh", "symmetric_eigh_reference"]

MAX_SWEEPS = 16
_FLOOR = 1e-2  # absolute rotation floor, in units of ε · max_i |K_ii|


def _check(K: object, max_sweeps: object) -> Tensor:
    K = check_square(K, "symmetric_eigh")
    check_int("max_sweeps", max_sweeps, 1, who="symmetric_eigh")
    return K.detach()


def _round_robin(M: int, device: torch.device) -> Tensor:
    """(M − 1, M) partner table for an even M: row r pairs j with P[r, j] (and P[r, P[r, j]] = j);
    over the M − 1 rows every pair meets once (the circle method: M − 1 is fixed, the others
    turn)."""
    j = torch.arange(M, device=device)
    r = torch.arange(M - 1, device=device)[:, None]
    p = torch.remainder(2 * r - j, M - 1)
    p = torch.where(j == M - 1, r, p)
    return torch.where(j == r, M - 1, p)


def symmetric_eigh_reference(K: Tensor, max_sweeps: int = MAX_SWEEPS) -> tuple[Tensor, Tensor]:
    """The Jacobi method of the module docstring with torch ops, exactly ``max_sweeps`` sweeps
    (no data-dependent Python branch: traceable, sync-free on any device): the spec of the
    Triton kernel. Returns (λ ascending, V) in the work dtype."""
    K = _check(K, max_sweeps)
    dt = acc_dtype(K.dtype)
    T = K.shape[0]
    M = T + T % 2
    A = K.new_zeros((M, M), dtype=dt)
    A[:T, :T] = 0.5 * (K.to(dt) + K.to(dt).mT)
    V = torch.eye(M, dtype=dt, device=K.device)
    eps = torch.finfo(dt).eps
    floor = _FLOOR * eps * A.diagonal().abs().max()
    j = torch.arange(M, device=K.device)
    eye = j[:, None] == j[None, :]
    table = _round_robin(M, K.device)
    for _ in range(max_sweeps):
        for r in range(M - 1):
            p = table[r]
            first = j < p
            d = A.diagonal()
            dp = d[p]
            apq = A[torch.minimum(j, p), torch.maximum(j, p)]  # the same entry for j and p(j)
            app, aqq = torch.where(first, d, dp), torch.where(first, dp, d)
            rot = apq.abs() > eps * (app * aqq).abs().sqrt() + floor
            tau = (aqq - app) / (2.0 * torch.where(rot, apq, 1.0))
            t = torch.where(tau >= 0, 1.0, -1.0) / (tau.abs() + (1.0 + tau * tau).sqrt())
            t = torch.where(rot, t, 0.0)
            c = (1.0 + t * t).rsqrt()
            s = torch.where(first, -t * c, t * c)  # J[p(j), j]
            A = ((c[:, None] * c[None, :]) * A + (s[:, None] * s[None, :]) * A[p][:, p]) + (
                (c[:, None] * s[None, :]) * A[:, p] + (s[:, None] * c[None, :]) * A[p, :])
            A = torch.where(eye, (d + torch.where(first, -t, t) * apq)[:, None], A)
            A = torch.where((j[None, :] == p[:, None]) & rot[:, None], 0.0, A)
            V = V * c[None, :] + V[:, p] * s[None, :]
    lam, order = A.diagonal()[:T].sort()
    return _nan_if_not_finite(lam, V[:T, :T][:, order], K)


def _nan_if_not_finite(lam: Tensor, V: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    probe = 0.0 * K.sum()  # 0·inf = 0·NaN = NaN: non-finite K never gives a finite answer
    return lam + probe, V + probe


def _lapack(K: Tensor) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh of the symmetric part (CPU); a non-finite K gives NaN, never raises."""
    A = K.to(acc_dtype(K.dtype))
    A = 0.5 * (A + A.mT)
    lam, V = torch.linalg.eigh(torch.where(torch.isfinite(A), A, 0.0))
    return _nan_if_not_finite(lam, V, K)


def _solve(K: Tensor, max_sweeps: int, impl: str) -> tuple[Tensor, Tensor]:
    if impl == "lapack":
        return _lapack(K)
    if impl == "triton":
        from fastmtl.kernels.eigh import launch

        return launch(K, max_sweeps)
    return symmetric_eigh_reference(K, max_sweeps)


@torch.library.custom_op("fastmtl::eigh", mutates_args=())
def _eigh_op(K: Tensor, max_sweeps: int, impl: str) -> tuple[Tensor, Tensor]:
    return _solve(K, max_sweeps, impl)


@_eigh_op.register_fake
def _(K: Tensor, max_sweeps: int, impl: str) -> tuple[Tensor, Tensor]:
    T, dt = K.shape[0], acc_dtype(K.dtype)
    return K.new_empty(T, dtype=dt), K.new_empty((T, T), dtype=dt)


def symmetric_eigh(K: Tensor, max_sweeps: int = MAX_SWEEPS) -> tuple[Tensor, Tensor]:
    """(λ, V): the eigendecomposition of the symmetric part of K (T, T), λ ascending, V
    orthogonal, both in the work dtype (float64 for float64 K, else float32), on K's device.

    ``max_sweeps``: the Jacobi budget on CUDA (see the module docstring); the CPU path is
    LAPACK. Eigenvector signs (and bases of repeated eigenvalues) are arbitrary, as with
    ``torch.linalg.eigh``. Not differentiable (K is detached).
    """
    K = _check(K, max_sweeps)
    impl = solver_path(K, MAX_T["eigh"], "lapack")
    if torch.compiler.is_compiling():
        return _eigh_op(K, max_sweeps, impl)
    return _solve(K, max_sweeps, impl)


def kept_eigenvalues(lam: Tensor, rtol: float | None = None) -> Tensor:
    """The mask λ_i > rtol · max_j λ_j of the numerically nonzero eigenvalues of a PSD matrix
    (all False when max λ <= 0). Default rtol = T · ε (ε of λ's dtype), the rank rule of
    ``torch.linalg.matrix_rank``/``pinv`` and of torchjd's and the official Aligned-MTL code."""
    if rtol is None:
        rtol = lam.shape[-1] * torch.finfo(lam.dtype).eps
    top = lam.max(dim=-1, keepdim=True).values
    return (lam > rtol * top) & (top > 0)
