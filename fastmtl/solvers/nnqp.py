r"""Projections onto the dual cone of the task gradients: a batch of lower-bounded QPs (UPGrad).

For a symmetric positive definite M (T, T) and lower bounds U (B, T), row b of the result is

.. math::

    v^{(b)} = \arg\min_{v \ge u^{(b)}} v^\top M v .

With M = G̃ G̃ᵀ this is the dual form of the projection of G̃ᵀu onto the dual cone
{x : G̃x >= 0} (Quinton & Rey 2024, Proposition 1): the projection is G̃ᵀv. v is optimal iff
(KKT, with μ = M v the multiplier up to a factor 2)

.. math::

    v \ge u,\qquad \mu = M v \ge 0,\qquad \mu_j (v_j - u_j) = 0\ \ \forall j,

so v_j = u_j or (Mv)_j = 0, i.e. ⟨g̃_j, G̃ᵀv⟩ >= 0 for every j. With z = v − u >= 0 it is the
linear complementarity problem LCP(q, M), q = M u, w = M z + q >= 0, zᵀw = 0, and M is a
P-matrix, so the solution is unique.

Algorithm (every implementation): principal pivoting on the tableau w = M z + q (Murty 1988,
*Linear Complementarity, Linear and Nonlinear Programming*, ch. 4). The basic variables start
as w (free set F = ∅, z = 0); a principal pivot on j swaps w_j and z_j, a rank-one update

.. math::

    A' = A - a_{:j} a_{j:} / p,\quad A'_{jj} = 1/p,\quad A'_{rj} = a_{rj}/p,\quad
    A'_{jk} = -a_{jk}/p,\qquad p = a_{jj} > 0,

of the augmented tableau A = [M | q] (principal pivot transforms of a P-matrix keep a positive
diagonal, so p never vanishes). The current values of the basic variables are the last column;
it stops when none is below −τ (τ = 1e-12 · max_j |u_j| · max(1, max_j M_jj)). The entering
index is the most negative value for the first ``2T + 10`` pivots, then the least index with a
negative value: Murty's least-index rule, finite for P-matrices from any complementary basis.
Measured in the UPGrad setting (B = T problems; Gaussian, conflicting, wide and low-rank
Grams with norms over two decades; 20 seeds): the most-negative rule needs on average about
T/2 pivots a problem and at most T + 2 (T = 10: 9, T = 40: 42, T = 128: 115, low-rank
worst), so the least-index fallback and the default budget 4 T + 20 are never reached.

``dual_cone_projection(M, U, max_iter=None)`` picks an implementation (no host sync on CUDA;
opaque to ``torch.compile`` as the custom op ``fastmtl::dual_cone_projection``):

==================  ===============================================================
CPU tensor          exact: the pivoting in float64 numpy, all problems in lockstep
                    (stops when every problem is solved; a cap of 100 T + 1000 pivots)
CUDA, "triton"      ``fastmtl.kernels.nnqp``: one program per problem, one launch, the
                    tableau in registers, stops on device; T <= 128
CUDA, "torch"       ``dual_cone_projection_reference``: the same pivots with torch ops,
                    batched over problems, exactly ``max_iter`` steps (a no-op once solved)
==================  ===============================================================

All compute in float64 (the problems are T×T; float32 Grams are rounded once) and return
float64. ``max_iter`` (default 4 T + 20) caps the pivots of the iterative implementations; an
unfinished problem returns its last basic solution, which satisfies v >= u only where the
pivoting left it so (never observed within the default). Non-finite M or U gives NaN rows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastmtl._checks import check_int
from fastmtl.kernels._limits import MAX_T
from fastmtl.solvers._common import solver_path

__all__ = ["default_max_iter", "dual_cone_projection", "dual_cone_projection_exact",
           "dual_cone_projection_reference", "normalized_gram", "upgrad_weights"]

_CHUNK_ELEMENTS = 2**18  # CPU path: problems pivoted together hold at most ~this many entries
_TOL = 1e-12  # infeasibility threshold relative to max|u_b| · max(1, max_j M_jj)


def default_max_iter(T: int) -> int:
    """The default pivot budget of the iterative implementations: 4 T + 20."""
    return 4 * T + 20


def _switch(T: int) -> int:
    """Pivots after which the entering rule changes from most-negative to least-index."""
    return 2 * T + 10


def _check(M: object, U: object, max_iter: object) -> tuple[Tensor, Tensor]:
    for name, t in (("M", M), ("U", U)):
        if not isinstance(t, Tensor):
            raise TypeError(f"dual_cone_projection: {name} must be a torch.Tensor, "
                            f"got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"dual_cone_projection: {name} must be floating, got {t.dtype}")
    assert isinstance(M, Tensor) and isinstance(U, Tensor)
    if M.dim() != 2 or M.shape[0] != M.shape[1] or M.shape[0] < 1:
        raise ValueError("dual_cone_projection: M must be a square (T, T) matrix with T >= 1, "
                         f"got shape {tuple(M.shape)}")
    if U.dim() != 2 or U.shape[1] != M.shape[0]:
        raise ValueError(f"dual_cone_projection: U must have shape (B, {M.shape[0]}), "
                         f"got {tuple(U.shape)}")
    if U.device != M.device:
        raise ValueError(f"dual_cone_projection: U is on {U.device} but M is on {M.device}")
    check_int("max_iter", max_iter, 0, who="dual_cone_projection", none_ok=True)
    return M.detach(), U.detach()


def _nan_if_not_finite(V: Tensor, M: Tensor, U: Tensor) -> Tensor:
    # 0·inf = 0·NaN = NaN: a non-finite input never gives finite weights.
    return V + 0.0 * (M.sum() + U.sum(dim=1, keepdim=True))


def _thresholds(M: Tensor, U: Tensor) -> Tensor:
    """τ_b = _TOL · max_j |u_bj| · max(1, max_j M_jj), (B, 1)."""
    scale = M.diagonal().max().clamp_min(1.0)
    return _TOL * U.abs().amax(dim=1, keepdim=True) * scale


def dual_cone_projection_reference(M: Tensor, U: Tensor, max_iter: int | None = None) -> Tensor:
    """The pivoting (module docstring) with torch ops, batched over the B problems: the spec of
    the Triton kernel. Exactly ``max_iter`` pivot steps (a step is a no-op for a solved
    problem), no data-dependent Python branch: traceable, no host sync. float64."""
    M, U = M.detach().double(), U.detach().double()
    B, T = U.shape
    budget = default_max_iter(T) if max_iter is None else max_iter
    idx = torch.arange(T, device=M.device)
    A = M.expand(B, T, T).clone()
    q = U @ M  # (B, T): q_b = M u_b (M symmetric)
    free = torch.zeros(B, T, dtype=torch.bool, device=M.device)
    tau = _thresholds(M, U)
    for step in range(budget):
        bad = q < -tau
        active = bad.any(dim=1, keepdim=True)
        if step < _switch(T):
            j = torch.where(bad, q, torch.inf).argmin(dim=1, keepdim=True)
        else:
            j = torch.where(bad, idx, T).argmin(dim=1, keepdim=True)
        col = A.gather(2, j[:, :, None].expand(B, T, 1)).squeeze(2)  # (B, T)
        row = A.gather(1, j[:, :, None].expand(B, 1, T)).squeeze(1)  # (B, T)
        p = col.gather(1, j)  # (B, 1)
        p = torch.where(active, p, 1.0)
        qj = q.gather(1, j)
        is_j = idx == j  # (B, T)
        upd = A - col[:, :, None] * row[:, None, :] / p[:, :, None]
        upd = torch.where(is_j[:, None, :], (col / p)[:, :, None], upd)
        upd = torch.where(is_j[:, :, None], (-row / p)[:, None, :], upd)
        upd = torch.where(is_j[:, :, None] & is_j[:, None, :], (1.0 / p)[:, :, None], upd)
        qn = torch.where(is_j, -qj / p, q - col * qj / p)
        A = torch.where(active[:, :, None], upd, A)
        q = torch.where(active, qn, q)
        free = free ^ (is_j & active)
    V = torch.where(free, q, 0.0) + U
    return _nan_if_not_finite(V, M, U)


def _exact_numpy(M: np.ndarray, U: np.ndarray) -> np.ndarray:
    """All B problems pivot in lockstep; a solved problem's step is masked to a no-op."""
    B, T = U.shape
    if not (np.isfinite(M).all() and np.isfinite(U).all()):
        return np.full((B, T), np.nan)
    A = np.empty((B, T, T))
    A[:] = M
    q = U @ M
    free = np.zeros((B, T), dtype=bool)
    tau = (_TOL * max(1.0, float(M.diagonal().max()))) * np.abs(U).max(axis=1)
    ar = np.arange(B)
    for step in range(100 * T + 1000):
        bad = q < -tau[:, None]
        j = q.argmin(axis=1) if step < _switch(T) else bad.argmax(axis=1)
        act = bad[ar, j]
        if not act.any():
            break
        col = A[ar, :, j]
        row = A[ar, j, :]
        p = row[ar, j]
        s = np.where(act, 1.0 / p, 0.0)
        colp = col * s[:, None]
        A -= colp[:, :, None] * row[:, None, :]
        A[ar, :, j] = np.where(act[:, None], colp, col)
        A[ar, j, :] = np.where(act[:, None], -row * s[:, None], row)
        A[ar, j, j] = np.where(act, s, p)
        qj = q[ar, j]
        q -= colp * qj[:, None]
        q[ar, j] = np.where(act, -qj * s, qj)
        free[ar, j] ^= act
    return np.where(free, q, 0.0) + U


def _exact_chunked(M: np.ndarray, U: np.ndarray) -> np.ndarray:
    T = M.shape[0]
    chunk = max(8, _CHUNK_ELEMENTS // (T * T))  # keep each batch of tableaux in cache
    return np.concatenate([_exact_numpy(M, U[i:i + chunk]) for i in range(0, U.shape[0], chunk)])


def dual_cone_projection_exact(M: Tensor, U: Tensor) -> Tensor:
    """The pivoting in float64 numpy until every problem is solved (CPU tensors only; host
    code, traceable only through ``dual_cone_projection``'s custom op). float64."""
    if M.device.type != "cpu":
        raise ValueError(f"dual_cone_projection_exact runs on CPU tensors, got {M.device}")
    A = M.detach().double().numpy()
    return torch.from_numpy(_exact_chunked(0.5 * (A + A.T), U.detach().double().numpy()))


def _solve(M: Tensor, U: Tensor, max_iter: int, impl: str) -> Tensor:
    if impl == "exact":
        return dual_cone_projection_exact(M, U)
    if impl == "triton":
        from fastmtl.kernels.nnqp import launch

        return launch(M, U, max_iter, _switch(M.shape[0]), _TOL)
    return dual_cone_projection_reference(M, U, max_iter)


@torch.library.custom_op("fastmtl::dual_cone_projection", mutates_args=())
def _dual_cone_op(M: Tensor, U: Tensor, max_iter: int, impl: str) -> Tensor:
    return _solve(M, U, max_iter, impl)


@_dual_cone_op.register_fake
def _(M: Tensor, U: Tensor, max_iter: int, impl: str) -> Tensor:
    return U.new_empty(U.shape, dtype=torch.float64)


def _implementation(M: Tensor) -> str:
    return solver_path(M, MAX_T["nnqp"], "exact")


def dual_cone_projection(M: Tensor, U: Tensor, max_iter: int | None = None) -> Tensor:
    """V (B, T), float64, on M's device: row b = argmin_{v >= U[b]} vᵀ M v, M symmetric PD.

    ``max_iter``: the pivot budget of the iterative implementations (default 4 T + 20); the
    CPU path is exact and ignores it. Not differentiable (inputs are detached). Raises
    ``TypeError``/``ValueError`` for non-tensor, non-floating or mis-shaped inputs.
    """
    M, U = _check(M, U, max_iter)
    budget = default_max_iter(M.shape[0]) if max_iter is None else max_iter
    impl = _implementation(M)
    if U.shape[0] == 0:
        return U.new_zeros(U.shape, dtype=torch.float64)
    if torch.compiler.is_compiling():
        return _dual_cone_op(M, U, budget, impl)
    return _solve(M, U, budget, impl)


def normalized_gram(K: Tensor, norm_eps: float = 0.0, reg_eps: float = 1e-4) -> Tensor:
    """UPGrad's K̃ (float64): K / tr K (0 when tr K < norm_eps or tr K = 0) + reg_eps · I.
    Non-finite K gives NaN everywhere."""
    K = K.detach().double()
    tr = K.diagonal().sum()
    keep = (tr >= norm_eps) & (tr > 0)
    Kn = torch.where(keep, K / torch.where(keep, tr, 1.0), 0.0) + 0.0 * K.sum()
    return Kn + reg_eps * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)


def upgrad_weights(K: Tensor, pref: Tensor, norm_eps: float = 0.0, reg_eps: float = 1e-4,
                   max_iter: int | None = None) -> Tensor:
    """UPGrad's w = Σ_i argmin_{v >= pref_i e_i} vᵀK̃v, K̃ = ``normalized_gram(K)``; (T,) float64.

    Eagerly on CPU the normalisation, the T problems and the sum run in one float64 numpy
    pass (no torch op per step); elsewhere ``dual_cone_projection`` on ``normalized_gram``.
    """
    if K.device.type == "cpu" and not torch.compiler.is_compiling() \
            and _implementation(K) == "exact":
        A = K.detach().double().numpy()
        if not np.isfinite(A).all():
            return torch.full((A.shape[0],), torch.nan, dtype=torch.float64)
        A = 0.5 * (A + A.T)
        tr = float(np.trace(A))
        M = A / tr if tr >= norm_eps and tr > 0 else np.zeros_like(A)
        M.flat[:: M.shape[0] + 1] += reg_eps
        U = np.diag(pref.detach().double().numpy())
        return torch.from_numpy(_exact_chunked(M, U).sum(axis=0))
    M = normalized_gram(K, norm_eps, reg_eps)
    return dual_cone_projection(M, torch.diag(pref.to(M)), max_iter).sum(dim=0)
