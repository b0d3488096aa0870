r"""Exact simplex min-norm solver for CPU tensors: Wolfe's min-norm-point algorithm on a Gram.

P. Wolfe, "Finding the nearest point in a polytope", Mathematical Programming 11 (1976).
The points are the (unseen) gradients g_i; only inner products K_ij = <g_i, g_j> are used.
A *corral* S (affinely independent points) carries barycentric weights λ > 0 with x = Σ λ_i g_i:

- major step: j = argmin_i (K_{:,S} λ)_i; stop when <x, g_j> >= ‖x‖² − ε (x is then the
  min-norm point of the hull: the KKT conditions of min_{w∈Δ} wᵀKw hold up to ε); else S += {j}.
- minor steps: μ = the affine min-norm point of S, from the bordered KKT system

  .. math:: \begin{bmatrix} K_{SS} & \mathbf 1 \\ \mathbf 1^\top & 0 \end{bmatrix}
            \begin{bmatrix} \mu \\ \nu \end{bmatrix} = \begin{bmatrix} 0 \\ 1 \end{bmatrix};

  if μ > 0, λ = μ; otherwise move λ toward μ until a weight hits 0, drop it, and repeat.

The inverse of the bordered matrix is kept: adding j is a rank-one block update with the Schur
complement s = dist²(g_j, aff S), dropping a point the matching rank-one downdate
M' = M_{−k,−k} − M_{−k,k} M_{k,−k} / M_kk (both O(|S|²) numpy work, no solve; a downdate with
a tiny pivot re-inverts instead). Finite termination in exact arithmetic; in float64 the
bordered matrix stays non-singular because a point in the affine hull of S (a duplicated
gradient, a zero row once x = 0, T > N) has <x, g_j> = ‖x‖² and s = 0 and is never added. A step
cap and ``pinv`` for a singular re-inversion guard the rounding cases; λ stays on the simplex
throughout. T = 2 is the closed form. About 15 µs of numpy a corral change: ~0.1–0.5 ms for
T = 10, ~2 ms for T = 40, 20–40 ms for T = 128 (measured, norms over two decades).
"""

from __future__ import annotations

import numpy as np

__all__ = ["wolfe_min_norm"]

_REL_EPS = 1e-12  # stop test: <x, g_j> >= ‖x‖² − _REL_EPS · max_i K_ii
_POS = 1e-15  # a barycentric weight at or below this (relative to 1) leaves the corral


def _inverse(A: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.inv(A)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(A)


def _drop(M: np.ndarray, B: np.ndarray, rows: np.ndarray, m: int, pos: int) -> int:
    """Remove position ``pos`` (>= 1) of the corral from the bordered inverse M[:m, :m]."""
    pivot = M[pos, pos]
    keep = np.r_[0:pos, pos + 1 : m]
    rows[: m - 1] = rows[keep]
    if abs(pivot) > 1e-10 * np.abs(M[:m, :m]).max():
        col = M[keep, pos]
        M[: m - 1, : m - 1] = M[np.ix_(keep, keep)] - np.outer(col, col) / pivot
    else:
        M[: m - 1, : m - 1] = _inverse(B[np.ix_(rows[: m - 1], rows[: m - 1])])
    return m - 1


def wolfe_min_norm(K: np.ndarray) -> np.ndarray:
    """w = argmin_{w ∈ Δ} wᵀ K w for a symmetric PSD float64 (T, T) K; NaN if K is not finite."""
    T = K.shape[0]
    if not np.isfinite(K).all():
        return np.full(T, np.nan)
    diag = np.diagonal(K)
    scale = float(diag.max())
    if scale <= 0.0:  # all gradients are zero: every point of the simplex is optimal
        return np.full(T, 1.0 / T)
    if T == 2:  # closed form: min over c of ‖c g_1 + (1 − c) g_2‖², 1/2 when g_1 = g_2
        den = K[0, 0] + K[1, 1] - 2.0 * K[0, 1]
        c = min(max((K[1, 1] - K[0, 1]) / den, 0.0), 1.0) if den > 0 else 0.5
        return np.array([c, 1.0 - c])
    eps = _REL_EPS * scale
    B = np.ones((T + 1, T + 1))  # [[K, 1], [1ᵀ, 0]]
    B[:T, :T] = K
    B[T, T] = 0.0
    first = int(np.argmin(diag))
    rows = np.empty(T + 1, dtype=np.intp)  # rows[:m]: the border T, then the corral
    rows[:2] = T, first
    m = 2
    M = np.zeros((T + 1, T + 1))  # M[:m, :m] = inverse of B[rows[:m]][:, rows[:m]]
    M[:2, :2] = [[-diag[first], 1.0], [1.0, 0.0]]
    w = np.zeros(T)  # λ scattered onto the T points
    w[first] = 1.0
    for _ in range(10 * T + 100):
        g = K @ w
        j = int(np.argmin(g))
        if g[j] >= float(w @ g) - eps or w[j] > 0.0:
            break
        # Add j: bordered-inverse update with the Schur complement s = dist²(g_j, aff(S)).
        b = B[rows[:m], j]
        u = M[:m, :m] @ b
        s = float(K[j, j] - b @ u)
        if not s > eps:  # g_j lies (numerically) in the affine hull of the corral
            break
        us = u / s
        M[:m, :m] += us[:, None] * u
        M[m, :m] = M[:m, m] = -us
        M[m, m] = 1.0 / s
        rows[m] = j
        m += 1
        mu = M[1:m, 0]
        while mu.min() <= _POS:
            # λ + θ(μ − λ) for the largest θ in [0, 1] that keeps every weight >= 0.
            lam = w[rows[1:m]]
            neg = mu <= _POS
            theta = min(1.0, float((lam[neg] / np.maximum(lam[neg] - mu[neg], _POS)).min()))
            lam = lam + theta * (mu - lam)
            keep = lam > _POS
            if keep.all():  # rounding: drop the smallest weight so the loop makes progress
                keep[int(np.argmin(lam))] = False
            w[:] = 0.0
            w[rows[1:m][keep]] = lam[keep]
            if not keep.any():  # cannot happen in exact arithmetic; restart at the vertex
                rows[1], m = j, 2
                M[:2, :2] = [[-diag[j], 1.0], [1.0, 0.0]]
            else:
                for pos in np.flatnonzero(~keep)[::-1] + 1:
                    m = _drop(M, B, rows, m, int(pos))
            mu = M[1:m, 0]
        w[:] = 0.0
        w[rows[1:m]] = mu
        if not w[j] > 0.0:  # the new point left at once: no progress is possible (rounding)
            break
    w = np.maximum(w, 0.0)
    return w / w.sum()
