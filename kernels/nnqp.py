r"""Triton kernel of ``fm.solvers.dual_cone_projection``: row b of V is argmin_{v >= u_b} vᵀMv.

One launch, one program per problem b (UPGrad: B = T problems), no host synchronisation. Each
program keeps the (T, T) tableau of LCP(M u_b, M) in registers (a padded BLOCK × BLOCK tile,
float64) and pivots until no basic variable is below −τ_b or ``max_iter`` pivots were made
(a ``while`` loop on device). A principal pivot on j (see ``fastmtl.solvers.nnqp``, the spec
being ``dual_cone_projection_reference``):

.. math::

    A' = A - a_{:j} a_{j:} / p,\quad A'_{jj} = 1/p,\quad A'_{rj} = a_{rj}/p,\quad
    A'_{jk} = -a_{jk}/p,\quad q' = q - a_{:j} q_j / p,\quad q'_j = -q_j / p,

with p = a_jj > 0. Row and column j are read out of the tile with masked reductions, so a
pivot is O(BLOCK²) register work and no memory traffic. The entering index is the most negative
basic value for the first ``switch`` pivots, then the least index (Murty's finite rule).
Padded lanes hold zeros and are never infeasible, so they are never pivoted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastmtl.kernels._limits import MAX_T as _LIMITS
from fastmtl.kernels._utils import device_guard, next_power_of_2, pad_rows

__all__ = ["MAX_T", "launch"]

MAX_T = _LIMITS["nnqp"]  # larger T runs the torch path (``_limits``)
# Warps per BLOCK: no register spills to BLOCK 64 on sm_80/sm_90 with triton 3.6 and 3.7
# (``aot``; with M's rows padded to 16 elements, ``pad_rows``: unpadded odd T spilled 0.1 KB).
_WARPS = {16: 1, 32: 8, 64: 8, 128: 16}
# Spill budget (``kernels.aot``): spill bytes per thread for each BLOCK, the worst of
# sm_80/sm_90 over every T with triton 3.7.1 and 3.6.0, rounded up to 64 B: none to T = 64.
SPILL_BUDGET = {"_dual_cone_kernel": ("BLOCK", {16: 0, 32: 0, 64: 0, 128: 1408})}


@triton.jit(do_not_specialize=["T"])  # one binary per BLOCK: ld carries the alignment
def _dual_cone_kernel(m_ptr, u_ptr, v_ptr, T, ld, max_iter, switch, tol, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < T
    rows = offs[:, None]
    cols = offs[None, :]
    tile_mask = mask[:, None] & mask[None, :]
    A = tl.load(m_ptr + rows * ld + cols, mask=tile_mask, other=0.0).to(tl.float64)
    u = tl.load(u_ptr + b * T + offs, mask=mask, other=0.0).to(tl.float64)
    q = tl.sum(A * u[None, :], axis=1)  # q = M u (M symmetric)
    diag_max = tl.max(tl.sum(tl.where(rows == cols, A, 0.0), axis=1), axis=0)
    tau = tol * tl.max(tl.abs(u), axis=0) * tl.maximum(diag_max, 1.0)
    free = offs < 0  # all False
    finite = tl.sum(A, axis=1) + q  # NaN/inf anywhere makes the output NaN

    it = tl.program_id(0) * 0
    bad = mask & (q < -tau)
    go = (tl.max(bad.to(tl.int32), axis=0) > 0) & (it < max_iter)
    while go:
        most = tl.argmin(tl.where(bad, q, float("inf")), axis=0)
        least = tl.argmin(tl.where(bad, offs, BLOCK), axis=0)
        j = tl.where(it < switch, most, least)
        col = tl.sum(tl.where(cols == j, A, 0.0), axis=1)
        row = tl.sum(tl.where(rows == j, A, 0.0), axis=0)
        p = tl.sum(tl.where(offs == j, col, 0.0), axis=0)
        qj = tl.sum(tl.where(offs == j, q, 0.0), axis=0)
        colp = col / p
        A = A - colp[:, None] * row[None, :]
        A = tl.where(cols == j, colp[:, None], A)
        A = tl.where(rows == j, -row[None, :] / p, A)
        A = tl.where((rows == j) & (cols == j), 1.0 / p, A)
        q = tl.where(offs == j, -qj / p, q - colp * qj)
        free = free ^ (offs == j)
        it += 1
        bad = mask & (q < -tau)
        go = (tl.max(bad.to(tl.int32), axis=0) > 0) & (it < max_iter)

    v = tl.where(free, q, 0.0) + u + 0.0 * tl.sum(finite, axis=0)
    tl.store(v_ptr + b * T + offs, v, mask=mask)


def launch(M: torch.Tensor, U: torch.Tensor, max_iter: int, switch: int,
           tol: float) -> torch.Tensor:
    """V (B, T) float64 for validated M (T, T) and U (B, T), 1 <= T <= MAX_T, B >= 1."""
    T = M.shape[0]
    if T > MAX_T:
        raise ValueError(f"the dual-cone kernel handles T <= {MAX_T}, got T = {T}")
    M, ld = pad_rows(M, M.dtype)
    U = U.contiguous()
    B = U.shape[0]
    V = torch.empty(B, T, dtype=torch.float64, device=M.device)
    block = max(16, next_power_of_2(T))
    num_warps = _WARPS[block]
    with device_guard(M):
        _dual_cone_kernel[(B,)](M, U, V, T, ld, max_iter, switch, float(tol), BLOCK=block,
                                num_warps=num_warps)
    return V
