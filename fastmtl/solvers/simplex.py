r"""The simplex min-norm problem on a Gram matrix: the QP at the heart of MGDA.

.. math::

    w^\star = \arg\min_{w \in \Delta_T} w^\top K w, \qquad
    \Delta_T = \{w \in \mathbb R^T : w \ge 0,\ \textstyle\sum_i w_i = 1\},

for a symmetric PSD K = G Gᵀ (T, T): w⋆ gives the min-norm point d = Gᵀw⋆ of the convex hull of
the rows of G. w is optimal iff (KKT) (Kw)_i >= wᵀKw for every i, with equality where w_i > 0.
Rank-deficient K (T > N, duplicated or zero gradients) has a set of minimisers; any one of them
is returned, always finite and on the simplex. Non-finite K gives NaN weights.

``min_norm_simplex(K, max_iter=1000, tol=1e-6)`` picks an implementation (never a host sync on
CUDA, so it can be captured in a CUDA graph; opaque to ``torch.compile`` as the custom op
``fastmtl::min_norm_simplex``):

==================  ===============================================================
T = 1, T = 2        closed form, any device: w = [1]; for T = 2
                    w_1 = clamp((K22 − K12) / (K11 + K22 − 2 K12), 0, 1), 1/2 on 0/0
                    (torch ops; in float64 numpy on CPU tensors)
CPU tensor          exact: Wolfe's min-norm-point active-set method in float64 numpy
                    (``_wolfe.py``; finite termination, ``max_iter``/``tol`` unused)
CUDA, "triton"      one single-program Triton kernel (``fastmtl.kernels.simplex``),
                    pairwise Frank–Wolfe, stops on device; T <= 1024
CUDA, "torch"       ``min_norm_simplex_reference``: the same algorithm with torch ops,
                    ``max_iter`` steps always (no early exit without a sync)
==================  ===============================================================

With ``FASTMTL_BACKEND=triton`` and ``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors
(how the tests check it). The compiled extension has no simplex solver: "cuda" uses Triton.

The iterative algorithm (reference and kernel) is pairwise Frank–Wolfe with exact line search
and second-order pair selection (the SMO step of SVM solvers, Fan, Chen & Lin, JMLR 2005):

.. math::

    g = Kw,\quad v = \arg\max_{w_i>0} g_i,\quad
    s = \arg\max_{g_v-g_i>\tau} \frac{(g_v-g_i)^2}{K_{ii}+K_{vv}-2K_{iv}},\quad
    \gamma = \min\Big(\frac{g_v-g_s}{K_{ss}+K_{vv}-2K_{sv}},\, w_v\Big),\quad
    w \leftarrow w + \gamma(e_s - e_v),

τ_i = ``tol`` · wᵀKw + 4ε · m (n_v + n_i) for candidate i, n_i = √K_ii, m = Σ_j w_j n_j >= ‖d‖,
ε the machine epsilon of the work dtype: 4ε·m·n_i bounds the rounding noise of (Kw)_i, so badly
scaled gradients (norms over many decades) are still resolved in float32. It stops once no
g_v − g_i exceeds τ_i: then for d = Gᵀw and every task
⟨g_i, d⟩ = (Kw)_i >= (1 − tol) ‖d‖² − 4ε m (n_v + n_i), a common descent direction up to
rounding. Pairwise FW converges linearly on polytopes (Lacoste-Julien & Jaggi, NeurIPS 2015):
measured on random, correlated and badly scaled K (N >= 4T) it takes 2–6 steps a task (T = 10:
20–75, T = 40: 10–240, T = 128: 10–1800 in float64; fewer in float32), square Gaussian
G (N = T) about 15–30 steps a task, far fewer than the plain Frank–Wolfe of Sener & Koltun.
When 0 is nearly in the hull of a rank-deficient G (T ≈ 2N) it may use the whole budget, which
still gives a point of the simplex with a tiny ‖d‖ (raise ``max_iter`` for T >= 100).
It starts at the uniform point if its objective sum(K)/T² is at most min_i K_ii, else at the
vertex of the shortest gradient.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from fastmtl._checks import check_int, check_number
from fastmtl.kernels._limits import MAX_T
from fastmtl.ops._common import acc_dtype
from fastmtl.solvers._common import check_square, solver_path
from fastmtl.solvers._wolfe import wolfe_min_norm

__all__ = ["min_norm_simplex", "min_norm_simplex_exact", "min_norm_simplex_reference"]

_NOISE = 4.0  # rounding-noise multiple in the stop test (see the module docstring)


def _check(K: object, max_iter: object, tol: object) -> Tensor:
    K = check_square(K, "min_norm_simplex")
    check_int("max_iter", max_iter, 1, who="min_norm_simplex")
    check_number("tol", tol, low=0, who="min_norm_simplex", bool_ok=True)
    return K.detach()


def _nan_if_not_finite(w: Tensor, K: Tensor) -> Tensor:
    return w + 0.0 * K.sum()  # 0·inf = 0·NaN = NaN: non-finite K never gives finite weights


def _two_tasks(K: Tensor) -> Tensor:
    """Closed form for T = 2: min over c of ‖c g_1 + (1 − c) g_2‖², 1/2 when g_1 = g_2.

    num = (K22 − K12, K11 − K12) sums to den = K11 + K22 − 2 K12, so w = clamp(num / den, 0, 1)
    is (c, 1 − c); 0/0 (g_1 = g_2) is replaced by 1/2 by the ``where``, never a NaN.
    """
    num = K.diagonal().flip(0) - K[0, 1]
    den = num.sum()
    w = torch.where(den > 0, (num / den).clamp(0.0, 1.0), 0.5)
    return _nan_if_not_finite(w, K)


def min_norm_simplex_reference(K: Tensor, max_iter: int = 1000, tol: float = 1e-6) -> Tensor:
    """Pairwise Frank–Wolfe (module docstring) with torch ops: the spec of the Triton kernel.

    Exactly ``max_iter`` steps (a step is a no-op once g_v − min g <= τ), no data-dependent
    Python branch, so it is traceable and runs on any device without a host sync. Computes in
    float32 (float64 for float64 K); returns that dtype. g = Kw is recomputed each step (the
    kernel keeps it incrementally and refreshes it).
    """
    K = K.detach().to(acc_dtype(K.dtype))
    T = K.shape[0]
    idx = torch.arange(T, device=K.device)
    diag = K.diagonal()
    norms = diag.clamp_min(0.0).sqrt()
    noise = _NOISE * torch.finfo(K.dtype).eps
    uniform = K.sum() / (T * T) <= diag.min()
    w = torch.where(uniform, 1.0 / T, (idx == diag.argmin()).to(K.dtype))
    for _ in range(max_iter):
        g = K @ w
        gmax, v = torch.where(w > 0, g, -math.inf).max(0, keepdim=True)
        diff = gmax - g
        thr = tol * (w @ g).clamp_min(0.0) + noise * (w @ norms) * (norms.gather(0, v) + norms)
        viol = diff > thr
        kv = K.index_select(0, v).squeeze(0)
        den = torch.where(viol, (diag + diag.gather(0, v) - 2.0 * kv).clamp_min(0.0), 1.0)
        gain, s = torch.where(viol, diff * diff / den, -1.0).max(0, keepdim=True)
        ds, dens = diff.gather(0, s), den.gather(0, s)
        gam = torch.where(gain >= 0, torch.minimum(ds / dens, w.gather(0, v)), 0.0)
        w = torch.where(idx == s, w + gam, torch.where(idx == v, w - gam, w))
    return _nan_if_not_finite(w, K)


def min_norm_simplex_exact(K: Tensor) -> Tensor:
    """Wolfe's active-set method in float64 numpy (CPU tensors only; host code, not traceable
    except through ``min_norm_simplex``'s custom op). Returns K's work dtype."""
    if K.device.type != "cpu":
        raise ValueError(f"min_norm_simplex_exact runs on CPU tensors, got {K.device}")
    work = acc_dtype(K.dtype)
    A = K.detach().to(work).numpy().astype(np.float64)
    w = wolfe_min_norm(0.5 * (A + A.T))
    return torch.from_numpy(w).to(work)


def _solve(K: Tensor, max_iter: int, tol: float, impl: str) -> Tensor:
    if impl == "exact":
        return min_norm_simplex_exact(K)
    if impl == "triton":
        from fastmtl.kernels.simplex import launch

        return launch(K, max_iter, tol)
    return min_norm_simplex_reference(K, max_iter, tol)


@torch.library.custom_op("fastmtl::min_norm_simplex", mutates_args=())
def _min_norm_simplex_op(K: Tensor, max_iter: int, tol: float, impl: str) -> Tensor:
    return _solve(K, max_iter, tol, impl)


@_min_norm_simplex_op.register_fake
def _(K: Tensor, max_iter: int, tol: float, impl: str) -> Tensor:
    return K.new_empty(K.shape[0], dtype=acc_dtype(K.dtype))


def min_norm_simplex(K: Tensor, max_iter: int = 1000, tol: float = 1e-6) -> Tensor:
    """w = argmin_{w ∈ Δ} wᵀ K w for a PSD (T, T) K: (T,) in K's dtype, on K's device.

    ``max_iter``: the step budget of the iterative solvers (CUDA); 2–30 T steps usually reach
    ``tol``. ``tol``: stop once max_{w_i>0} (Kw)_i − min_i (Kw)_i <= tol · wᵀKw (plus a rounding
    allowance, see the module docstring), i.e. the KKT conditions hold up to ``tol`` relative to
    ‖d‖². The CPU path is exact (float64) and ignores both. Not differentiable (K is
    detached). Raises ``TypeError``/``ValueError`` for a non-square or
    non-floating K, ``max_iter < 1`` or ``tol < 0``.
    """
    K = _check(K, max_iter, tol)
    T = K.shape[0]
    if T == 1:
        return _nan_if_not_finite(torch.ones(1, dtype=K.dtype, device=K.device), K)
    impl = solver_path(K, MAX_T["simplex"], "exact")
    if T == 2 and impl != "exact":  # on the host the exact solver has the same closed form
        return _two_tasks(K.to(acc_dtype(K.dtype))).to(K.dtype)
    if torch.compiler.is_compiling():
        w = _min_norm_simplex_op(K, max_iter, float(tol), impl)
    else:
        w = _solve(K, max_iter, float(tol), impl)
    return w.to(K.dtype)

