r"""The Nash bargaining weights of Nash-MTL: α > 0 with (K α)_i = 1 / α_i for every task.

Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, eq. (2)/Theorem 5.1: the
Nash bargaining solution of the tasks is d = Σ α_i g_i with Gᵀ G α = 1/α. These are exactly the
stationarity conditions of the strictly convex, self-concordant

.. math::

    f(\alpha) = \tfrac12 \alpha^\top K \alpha - \sum_i \log \alpha_i ,\qquad
    \nabla f = K\alpha - 1/\alpha,\qquad \nabla^2 f = K + \operatorname{diag}(1/\alpha^2) \succ 0,

so the solution is unique when it exists, and it exists iff f is bounded below, i.e. iff no
a >= 0, a ≠ 0 has Gᵀa = 0: **iff 0 is not in the convex hull of the gradients** (the MGDA
min-norm point is non-zero; a Pareto-stationary point has no bargaining solution). Rank
deficiency alone is harmless (duplicated gradients share their weight equally).

Regularisation and scaling (a departure: the official code hands the raw equations to cvxpy and
falls back to the previous α when the solver fails). With D = diag(‖g_i‖) (floored at
``eps`` · max_j ‖g_j‖, D = I when all are 0), this solves

.. math::

    (\hat K + r I)\,\hat\alpha = 1/\hat\alpha,\qquad \hat K = D^{-1} K D^{-1},\qquad
    \alpha = D^{-1}\hat\alpha,

i.e. (K + r D²) α = 1/α: α_i (Kα)_i = 1 − r ‖g_i‖² α_i². The problem is scale-equivariant per
task (g_i → c g_i gives α_i → α_i / c) and the unit diagonal of K̂ makes r = ``reg`` (default
1e-6) a relative perturbation: α_i(Kα)_i = 1 − r α̂_i² (α̂_i = ‖g_i‖ α_i, about 1 to 30 on
random problems). When 0 is (nearly) in the hull, α̂ grows to at most about 1/√r along those
directions instead of diverging, so the output is always finite; a zero gradient gets
α̂_i = 1/√r and a finite α_i (its row adds nothing to d).

Algorithm: damped Newton from α̂₀ = √(T / 1ᵀ(K̂ + rI)1) · 1 (the minimiser of f along 1).
Each step solves H Δ = −∇f and takes, of the two candidates α̂ + Δ (if positive) and the
self-concordant damped step α̂ + Δ/(1 + λ) (λ² = −∇fᵀΔ, always positive, and decreasing f by
at least λ − log(1 + λ): Nesterov, *Introductory Lectures*, Thm 4.1.12), the one with the
lower f (a ``torch.where``). Quadratic convergence once λ < 0.38. Measured in float64 (steps
until α is within 1e-8 relative of the converged one; random, conflicting, wide (N = 1000) and
low-rank (N = T/4) Grams, gradient norms over two decades, T <= 128): 0 for T = 2 (the start
is exact by symmetry), 3–10 when the gradients are not Pareto-stationary, 13–19 when 0 is in
their hull (α̂ then grows toward 1/√r). Default budget ``max_iter`` = 25 steps.

``nash_bargaining(K, reg=1e-6, max_iter=25, eps=1e-8)`` picks an implementation (no host
sync on CUDA; the custom op ``fastmtl::nash_bargaining`` under ``torch.compile``):

==================  ===============================================================
CPU tensor          the steps in float64 numpy, stopping once λ <= 1e-10
CUDA, "triton"      ``fastmtl.kernels.nash``: ONE program, K̂ in registers, a
                    Gauss–Jordan solve per step, stops on device; T <= 128
CUDA, "torch"       ``nash_bargaining_reference``: torch ops, ``torch.linalg.solve_ex``
                    (no sync), exactly ``max_iter`` steps
==================  ===============================================================

All compute in float64 and return float64; non-finite K gives NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from fastmtl._checks import check_int, check_number
from fastmtl.kernels._limits import MAX_T
from fastmtl.solvers._common import check_square, solver_path

__all__ = ["nash_bargaining", "nash_bargaining_exact", "nash_bargaining_reference"]

_STOP = 1e-10  # Newton decrement below which the early-exiting implementations stop


def _check(K: object, reg: object, max_iter: object, eps: object) -> Tensor:
    K = check_square(K, "nash_bargaining")
    check_number("reg", reg, low=0, low_open=True, who="nash_bargaining")
    check_int("max_iter", max_iter, 0, who="nash_bargaining")
    check_number("eps", eps, low=0, high=1, low_open=True, high_open=True, who="nash_bargaining")
    return K.detach()


def _scaled(K: Tensor, reg: float, eps: float) -> tuple[Tensor, Tensor]:
    """(K̂ + rI, D) in float64 (module docstring)."""
    K = K.double()
    D = K.diagonal().clamp_min(0.0).sqrt()
    top = D.max()
    D = torch.where(top > 0, torch.maximum(D, eps * top), torch.ones_like(D))
    Kh = K / (D[:, None] * D[None, :])
    return Kh + reg * torch.eye(K.shape[0], dtype=K.dtype, device=K.device), D


def _objective(Kh: Tensor, x: Tensor) -> Tensor:
    """f(x) = ½ xᵀK̂x − Σ log x, +inf where some x_i <= 0."""
    pos = (x > 0).all()
    val = 0.5 * (x @ (Kh @ x)) - torch.log(torch.where(x > 0, x, 1.0)).sum()
    return torch.where(pos, val, torch.inf)


def nash_bargaining_reference(K: Tensor, reg: float = 1e-6, max_iter: int = 25,
                              eps: float = 1e-8) -> Tensor:
    """Damped Newton (module docstring) with torch ops, exactly ``max_iter`` steps: the spec of
    the Triton kernel. No data-dependent Python branch (traceable, no host sync). float64."""
    K = K.detach()
    Kh, D = _scaled(K, reg, eps)
    T = Kh.shape[0]
    x = torch.full((T,), 1.0, dtype=Kh.dtype, device=Kh.device) * (T / Kh.sum()).sqrt()
    for _ in range(max_iter):
        F = Kh @ x - 1.0 / x
        H = Kh + torch.diag(1.0 / (x * x))
        dx = torch.linalg.solve_ex(H, -F)[0]
        lam = (-(F @ dx)).clamp_min(0.0).sqrt()
        full = x + dx
        damped = torch.maximum(x + dx / (1.0 + lam), 0.5 * x / (1.0 + lam))
        x = torch.where(_objective(Kh, full) < _objective(Kh, damped), full, damped)
    return x / D + 0.0 * K.sum()  # non-finite K: NaN, never a finite answer


def _exact_numpy(K: np.ndarray, reg: float, max_iter: int, eps: float) -> np.ndarray:
    T = K.shape[0]
    if not np.isfinite(K).all():
        return np.full(T, np.nan)
    D = np.sqrt(np.maximum(np.diagonal(K), 0.0))
    top = D.max()
    D = np.maximum(D, eps * top) if top > 0 else np.ones(T)
    Kh = K / np.outer(D, D) + reg * np.eye(T)
    x = np.full(T, math.sqrt(T / Kh.sum()))

    def f(y: np.ndarray) -> float:
        return 0.5 * y @ (Kh @ y) - np.log(y).sum() if (y > 0).all() else math.inf

    for _ in range(max_iter):
        F = Kh @ x - 1.0 / x
        H = Kh + np.diag(1.0 / (x * x))
        dx = np.linalg.solve(H, -F)
        lam = math.sqrt(max(-float(F @ dx), 0.0))
        if not lam > _STOP:  # converged (or NaN from an overflow: keep the last iterate)
            break
        full = x + dx
        damped = np.maximum(x + dx / (1.0 + lam), 0.5 * x / (1.0 + lam))
        x = full if f(full) < f(damped) else damped
    return x / D


def nash_bargaining_exact(K: Tensor, reg: float = 1e-6, max_iter: int = 25,
                          eps: float = 1e-8) -> Tensor:
    """The Newton steps in float64 numpy with an early exit (CPU tensors only; host code,
    traceable only through ``nash_bargaining``'s custom op). float64."""
    if K.device.type != "cpu":
        raise ValueError(f"nash_bargaining_exact runs on CPU tensors, got {K.device}")
    A = K.detach().double().numpy()
    return torch.from_numpy(_exact_numpy(0.5 * (A + A.T), reg, max_iter, eps))


def _solve(K: Tensor, reg: float, max_iter: int, eps: float, impl: str) -> Tensor:
    if impl == "exact":
        return nash_bargaining_exact(K, reg, max_iter, eps)
    if impl == "triton":
        from fastmtl.kernels.nash import launch

        return launch(K, reg, max_iter, eps, _STOP)
    return nash_bargaining_reference(K, reg, max_iter, eps)


@torch.library.custom_op("fastmtl::nash_bargaining", mutates_args=())
def _nash_op(K: Tensor, reg: float, max_iter: int, eps: float, impl: str) -> Tensor:
    return _solve(K, reg, max_iter, eps, impl)


@_nash_op.register_fake
def _(K: Tensor, reg: float, max_iter: int, eps: float, impl: str) -> Tensor:
    return K.new_empty(K.shape[0], dtype=torch.float64)


def nash_bargaining(K: Tensor, reg: float = 1e-6, max_iter: int = 25,
                    eps: float = 1e-8) -> Tensor:
    """α (T,) float64 on K's device with (K + reg·diag(K)) α = 1/α (module docstring).

    ``reg``: the relative regulariser r > 0; ``max_iter``: the Newton budget (the CPU path
    stops earlier once converged); ``eps``: relative floor of the gradient norms. Not
    differentiable (K is detached). Raises ``TypeError``/``ValueError`` on bad arguments.
    """
    K = _check(K, reg, max_iter, eps)
    impl = solver_path(K, MAX_T["nash"], "exact")
    args = (float(reg), max_iter, float(eps), impl)
    if torch.compiler.is_compiling():
        return _nash_op(K, *args)
    return _solve(K, *args)
