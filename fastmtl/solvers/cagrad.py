r"""CAGrad's inner problem on a Gram matrix, as a root search over simplex min-norm problems.

Liu et al. (NeurIPS 2021) pick the update d = g0 + (√φ/‖g_w⋆‖) g_w⋆ from

.. math::

    w^\star = \arg\min_{w \in \Delta_T} F(w), \qquad
    F(w) = g_w^\top g_0 + \sqrt\phi\, \|g_w\| = w^\top b + \sqrt\phi \sqrt{w^\top K w},

with g_w = Gᵀw, g0 = Gᵀ1/T, b = K1/T, φ = c²‖g0‖² = c² 1ᵀK1/T² (all from K). F is convex
but not smooth where g_w = 0. ``cagrad_simplex`` solves it with the solver MGDA uses:

- For s >= 0 let w(s) = argmin_{w∈Δ} ‖g_w + s g0‖² = argmin_{w∈Δ} wᵀ K_s w, the min-norm point
  of the shifted gradients g_i + s g0, whose Gram is K_s = K + s(b1ᵀ + 1bᵀ) + s²‖g0‖² 11ᵀ
  (PSD). Its KKT conditions, (K w + s b)_i >= μ with equality on the support, are those of F
  at w when √φ/‖g_w‖ = 1/s. So w⋆ = w(s⋆) for a root s⋆ of
  ψ(s) = ‖g_{w(s)}‖ − s√φ, and every root s > 0 is optimal (F is convex); ‖g_{w⋆}‖ is the
  same for every minimiser, so the root s⋆ = ‖g_{w⋆}‖/√φ is unique.
- ψ(0) = ‖MGDA point‖ >= 0 and ψ(s_hi) <= 0 at s_hi = max_i ‖g_i‖/√φ (‖g_w‖ <= max_i ‖g_i‖),
  so [0, s_hi] brackets it. ``steps`` steps alternate an Illinois (modified regula falsi) step
  and a bisection step, each one ``min_norm_simplex`` solve on K_s. Illinois converges
  superlinearly where ψ is smooth (it is, piecewise: on a fixed support g_{w(s)} is affine in
  s); its point is kept at least 1e-3 of the bracket away from either end (so a root close to
  an end is bracketed within 1e-3 of the width in one step), and the bisections halve the
  bracket every other step. The answer is w at the end of the final bracket with the smaller
  relative residual |ψ|/(‖g_w‖ + s√φ).
- 0 in the hull makes ψ(0) = 0 without s = 0 being a root of the problem: for c < 1 the root is
  s⋆ > 0 (ψ > 0 below it) and the guard moves the search off 0; for c > 1, F >= 0 = F(w(0)),
  ψ < 0 on s > 0, the bracket closes on 0 and ‖g_w⋆‖ → 0 (the aggregator's Pareto-stationary
  case).

All of it is computed in float64 (K_s subtracts terms of size s²‖g0‖²), with no data-dependent
Python branch on device: ``cagrad_simplex`` picks (opaque to ``torch.compile`` as the custom op
``fastmtl::cagrad_simplex``, never a host sync on CUDA)

==================  ===============================================================
CPU tensor          the root search over exact Wolfe solves (float64 numpy), ending
                    early once the bracket or the residual is at rounding level
                    (typically 6–12 solves instead of ``steps`` + 2)
CUDA, "triton"      ONE single-program Triton kernel (``fastmtl.kernels.cagrad``): the
                    whole search, each solve the pairwise Frank–Wolfe of the simplex
                    kernel on K_s formed row by row; T <= 1024
CUDA, "torch"       ``cagrad_simplex_reference``: the search in torch ops over
                    ``min_norm_simplex`` (~20 small ops a step)
==================  ===============================================================

Measured on random, rank-deficient, conflicting and badly scaled K (T <= 40, c in
{0.1, 0.4, 0.9, 2}) by the primal-dual gap F(w) − min_i ⟨g_i, d⟩ relative to max_i ‖g_i‖² (an
upper bound on F(w) − min F): at most 1e-13 with ``steps`` = 24 (the default), 4e-6 with 16,
1e-3 with 12.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from fastmtl._checks import check_int, check_number
from fastmtl.kernels._limits import MAX_T
from fastmtl.solvers._common import check_square, solver_path
from fastmtl.solvers.simplex import min_norm_simplex, min_norm_simplex_exact

__all__ = ["cagrad_simplex", "cagrad_simplex_reference"]

_GUARD = 1e-3  # = fastmtl.kernels.cagrad._GUARD
_ROUNDING = 4.0 * torch.finfo(torch.float64).eps  # early exit of the host search


def _check(K: object, c: object, steps: object) -> Tensor:
    K = check_square(K, "cagrad_simplex")
    check_number("c", c, low=0, who="cagrad_simplex")
    check_int("steps", steps, 0, who="cagrad_simplex")
    return K.detach()


def cagrad_simplex_reference(K: Tensor, c: float, steps: int = 24, max_iter: int = 1000,
                             tol: float = 1e-6) -> Tensor:
    """The root search of the module docstring in torch ops, each w(s) from
    ``min_norm_simplex`` (exactly ``steps`` + 2 solves, no data-dependent branch): the spec of
    the Triton kernel. Same arguments and result as ``cagrad_simplex``."""
    K = _check(K, c, steps)
    return _root_search(K, c, steps, lambda Ks: min_norm_simplex(Ks, max_iter, tol), False)


def _support_root(K: Tensor, b: Tensor, phi: Tensor, w: Tensor) -> float:
    """The root of ψ if w⋆ had w's support S (host, float64 numpy; NaN if none).

    On a fixed support the KKT system K_S w_S + s b_S = μ1, 1ᵀw_S = 1 makes w_S = u + s v
    affine in s (two bordered solves), so ‖g_w‖² = s²·vᵀKv + 2s·uᵀKv + uᵀKu and ψ(s) = 0 is
    the quadratic (vᵀKv − φ)s² + 2(uᵀKv)s + uᵀKu = 0: its positive root.
    """
    A, bv, wv = K.numpy(), b.numpy(), w.numpy()
    S = np.flatnonzero(wv > 0)
    m = S.size
    border = np.ones((m + 1, m + 1))
    border[:m, :m], border[m, m] = A[np.ix_(S, S)], 0.0
    rhs = np.zeros((m + 1, 2))
    rhs[m, 0], rhs[:m, 1] = 1.0, -bv[S]
    sol = np.linalg.lstsq(border, rhs, rcond=None)[0][:m]
    KS = A[np.ix_(S, S)]
    u, v = sol[:, 0], sol[:, 1]
    qa, qb, qc = v @ KS @ v - float(phi), 2.0 * (u @ KS @ v), max(u @ KS @ u, 0.0)
    if abs(qa) <= 1e-14 * (abs(qb) + qc):
        return -qc / qb if qb != 0 else math.nan
    disc = qb * qb - 4.0 * qa * qc
    if disc < 0:
        return math.nan
    roots = [(-qb + sign * math.sqrt(disc)) / (2.0 * qa) for sign in (1.0, -1.0)]
    positive = [r for r in roots if r > 0]
    return min(positive) if positive else math.nan


def _root_search(K: Tensor, c: float, steps: int, simplex, early_exit: bool) -> Tensor:
    """w⋆ by the Illinois/bisection search, w(s) = ``simplex``(K_s). ``early_exit`` (host
    only, CPU tensors) tries the support root (``_support_root``) of the last solve first when
    it lies inside the bracket, and stops once the bracket or the better end's relative
    residual is at rounding level: usually 3–6 solves."""
    dt = K.dtype
    K = K.to(torch.float64)
    K = 0.5 * (K + K.mT)
    T = K.shape[0]
    ones = torch.ones(T, dtype=K.dtype, device=K.device)
    b = K.sum(1) / T
    g0sq = (b.sum() / T).clamp_min(0.0)
    sqrt_phi = c * g0sq.sqrt()
    positive = sqrt_phi > 0
    top = K.diagonal().clamp_min(0.0).sqrt().max()

    def solve(s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """w(s), ψ(s) and the relative residual |ψ| / (‖g_w‖ + s√φ) (1 when both are 0)."""
        Ks = K + s * (b[:, None] + b[None, :]) + (s * s * g0sq) * torch.outer(ones, ones)
        w = simplex(Ks)
        norm, radius = (w @ K @ w).clamp_min(0.0).sqrt(), s * sqrt_phi
        total = norm + radius
        rel = torch.where(total > 0, (norm - radius).abs() / torch.where(total > 0, total, 1.0),
                          1.0)
        return w, norm - radius, rel

    lo = K.new_zeros(())
    hi = torch.where(positive, top / torch.where(positive, sqrt_phi, 1.0), 1.0)
    w_lo, f_lo, r_lo = solve(lo)
    w_hi, f_hi, r_hi = solve(hi)
    w = torch.where(f_lo.abs() <= f_hi.abs(), w_lo, w_hi)
    fa, fb = f_lo, f_hi  # Illinois values (halved when the same end is kept twice)
    side = K.new_zeros(())  # which end the last Illinois step moved (+1: lo, -1: hi)
    for k in range(steps):
        illinois = k % 2 == 0
        if illinois:
            den = fa - fb
            s = torch.where(den > 0, lo + (hi - lo) * (fa / torch.where(den > 0, den, 1.0)),
                            0.5 * (lo + hi))
            gap = _GUARD * (hi - lo)  # never within a 1e-3 fraction of an end
            s = torch.minimum(torch.maximum(s, lo + gap), hi - gap)
        else:
            s = 0.5 * (lo + hi)
        if early_exit:
            guess = _support_root(K, b, sqrt_phi**2, w)
            if bool(lo < guess) and bool(guess < hi):
                s = K.new_tensor(guess)
        w, f, r = solve(s)
        up = f > 0  # the root lies above s
        lo, hi = torch.where(up, s, lo), torch.where(up, hi, s)
        w_lo, w_hi = torch.where(up, w, w_lo), torch.where(up, w_hi, w)
        r_lo, r_hi = torch.where(up, r, r_lo), torch.where(up, r_hi, r)
        if illinois:  # keeping the same end twice halves the other end's value
            fa, fb = (torch.where(up, f, torch.where(side < 0, 0.5 * fa, fa)),
                      torch.where(up, torch.where(side > 0, 0.5 * fb, fb), f))
            side = torch.where(up, 1.0, -1.0)
        else:
            fa, fb = torch.where(up, f, fa), torch.where(up, fb, f)
            side = K.new_zeros(())
        if early_exit and bool((torch.minimum(r_lo, r_hi) <= _ROUNDING)
                               | (hi - lo <= _ROUNDING * hi)):
            break
    w_best = torch.where(r_hi <= r_lo, w_hi, w_lo)
    vertex = (torch.arange(T, device=K.device) == b.argmin()).to(K.dtype)
    w = torch.where(positive, w_best, vertex)
    return (w + 0.0 * K.sum()).to(dt)


def _solve(K: Tensor, c: float, steps: int, max_iter: int, tol: float, impl: str) -> Tensor:
    if impl == "triton":
        from fastmtl.kernels.cagrad import launch

        return launch(0.5 * (K + K.mT), c, steps, max_iter, tol)
    if impl == "exact":
        return _root_search(K, c, steps, min_norm_simplex_exact, True)
    return _root_search(K, c, steps, lambda Ks: min_norm_simplex(Ks, max_iter, tol), False)


@torch.library.custom_op("fastmtl::cagrad_simplex", mutates_args=())
def _cagrad_simplex_op(K: Tensor, c: float, steps: int, max_iter: int, tol: float,
                       impl: str) -> Tensor:
    return _solve(K, c, steps, max_iter, tol, impl)


@_cagrad_simplex_op.register_fake
def _(K: Tensor, c: float, steps: int, max_iter: int, tol: float, impl: str) -> Tensor:
    return K.new_empty(K.shape[0], dtype=torch.float64)


def cagrad_simplex(K: Tensor, c: float, steps: int = 24, max_iter: int = 1000,
                   tol: float = 1e-6) -> Tensor:
    """w⋆ = argmin_{w∈Δ} wᵀK1/T + c ‖g0‖ √(wᵀKw) (module docstring): (T,) in K's dtype.

    ``steps``: root-search steps (each one simplex min-norm solve; the CPU search may stop
    earlier, at rounding level); ``max_iter``, ``tol``: the iterative simplex solver's budget
    and KKT tolerance on CUDA (the CPU solver is exact). With c = 0 or g0 = 0 (φ = 0) F is
    linear and w⋆ = the vertex argmin_i b_i. Non-finite K gives NaN. Not differentiable.
    """
    K = _check(K, c, steps)
    impl = solver_path(K, MAX_T["cagrad"], "exact")
    args = (K.to(torch.float64), float(c), steps, max_iter, float(tol), impl)
    w = _cagrad_simplex_op(*args) if torch.compiler.is_compiling() else _solve(*args)
    return w.to(K.dtype)
