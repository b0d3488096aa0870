r"""Triton kernel of ``fm.solvers.nash_bargaining``: α > 0 with (K + r·diag K) α = 1/α.

ONE program, one launch, no host synchronisation; the spec is ``nash_bargaining_reference``.
The program loads K into a padded BLOCK × BLOCK float64 tile, scales it to K̂ + rI
(K̂ = D⁻¹KD⁻¹, D = diag(‖g_i‖) floored at eps·max‖g‖) and runs damped Newton on
f(x) = ½ xᵀ(K̂ + rI)x − Σ log x from x₀ = √(T / 1ᵀ(K̂ + rI)1)·1:

.. math::

    F = (\hat K + rI)x - 1/x,\quad H = \hat K + rI + \operatorname{diag}(1/x^2),\quad
    \Delta = -H^{-1} F,\quad \lambda = \sqrt{-F^\top \Delta},

then x ← the one of x + Δ (when positive) and x + Δ/(1 + λ) with the lower f. H Δ = −F is
solved in registers by Gauss–Jordan elimination without pivoting (H is symmetric positive
definite): T rank-one updates of the tile, the pivot row and column read with masked
reductions. The loop (a ``while`` on device) ends after ``max_iter`` steps or once λ <= stop.
The candidates are compared through f(x + Δ) − f(x_damped) = ½(aᵀK̂a − bᵀK̂b) − Σ log(a_i/b_i),
the logarithm taken in float32 (only its sign matters). Output α = x / D, float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastmtl.kernels._limits import MAX_T as _LIMITS
from fastmtl.kernels._utils import device_guard, next_power_of_2, pad_rows

__all__ = ["MAX_T", "launch"]

MAX_T = _LIMITS["nash"]  # larger T runs the torch path (``_limits``)
# Warps per BLOCK: no register spills to BLOCK 64 on sm_80/sm_90 with triton 3.6 and 3.7
# (``aot``; with K's rows padded to 16 elements, ``pad_rows``: unpadded odd T spilled 0.3 KB).
_WARPS = {16: 2, 32: 8, 64: 8, 128: 32}
# Spill budget (``kernels.aot``): spill bytes per thread for each BLOCK, the worst of
# sm_80/sm_90 over every T with triton 3.7.1 and 3.6.0, rounded up to 64 B: none to T = 64;
# at BLOCK 128 two float64 tiles (K̂, H) outgrow the 64 registers a thread of 32 warps has.
SPILL_BUDGET = {"_nash_kernel": ("BLOCK", {16: 0, 32: 0, 64: 0, 128: 960})}


@triton.jit(do_not_specialize=["T"])  # one binary per BLOCK: ld carries the alignment
def _nash_kernel(k_ptr, a_ptr, T, ld, reg, eps, max_iter, stop, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < T
    rows = offs[:, None]
    cols = offs[None, :]
    on_diag = (rows == cols) & mask[:, None]
    K = tl.load(k_ptr + rows * ld + cols, mask=mask[:, None] & mask[None, :],
                other=0.0).to(tl.float64)
    finite = tl.sum(tl.sum(K, axis=1), axis=0)  # NaN/inf anywhere makes the output NaN
    D = tl.sqrt(tl.maximum(tl.sum(tl.where(on_diag, K, 0.0), axis=1), 0.0))
    top = tl.max(D, axis=0)
    D = tl.where(top > 0, tl.maximum(D, eps * top), 1.0)
    D = tl.where(mask, D, 1.0)
    Kh = K / (D[:, None] * D[None, :]) + tl.where(on_diag, reg, 0.0)
    tn = tl.sum(mask.to(tl.float64), axis=0)
    x = tl.where(mask, tl.sqrt(tn / tl.sum(tl.sum(Kh, axis=1), axis=0)), 1.0)

    it = tl.program_id(0) * 0
    go = it < max_iter
    while go:
        Kx = tl.sum(Kh * x[None, :], axis=1)
        F = tl.where(mask, Kx - 1.0 / x, 0.0)
        H = Kh + tl.where(on_diag, 1.0 / (x * x)[:, None], 0.0)
        r = -F
        for k in range(0, T):  # Gauss–Jordan: H ← I, r ← H⁻¹ r
            col = tl.sum(tl.where(cols == k, H, 0.0), axis=1)
            row = tl.sum(tl.where(rows == k, H, 0.0), axis=0)
            p = tl.sum(tl.where(offs == k, col, 0.0), axis=0)
            rk = tl.sum(tl.where(offs == k, r, 0.0), axis=0)
            colp = tl.where(offs == k, 0.0, col / p)
            H = tl.where(rows == k, row[None, :] / p, H - colp[:, None] * row[None, :])
            r = tl.where(offs == k, rk / p, r - colp * rk)
        lam = tl.sqrt(tl.maximum(-tl.sum(F * r, axis=0), 0.0))
        full = x + r
        damped = tl.maximum(x + r / (1.0 + lam), 0.5 * x / (1.0 + lam))
        ok = tl.min(tl.where(mask, full, 1.0), axis=0) > 0
        quad = 0.5 * tl.sum(full * tl.sum(Kh * full[None, :], axis=1)
                            - damped * tl.sum(Kh * damped[None, :], axis=1), axis=0)
        ratio = tl.where(mask & (full > 0), full / damped, 1.0).to(tl.float32)
        logs = tl.sum(tl.log(ratio), axis=0).to(tl.float64)
        x = tl.where(ok & (quad - logs < 0), full, damped)
        it += 1
        go = (it < max_iter) & (lam > stop)

    alpha = x / D + 0.0 * finite
    tl.store(a_ptr + offs, alpha, mask=mask)


def launch(K: torch.Tensor, reg: float, max_iter: int, eps: float, stop: float) -> torch.Tensor:
    """α (T,) float64 for a validated (T, T) K, 1 <= T <= MAX_T."""
    T = K.shape[0]
    if T > MAX_T:
        raise ValueError(f"the Nash kernel handles T <= {MAX_T}, got T = {T}")
    K, ld = pad_rows(K, K.dtype)
    alpha = torch.empty(T, dtype=torch.float64, device=K.device)
    block = max(16, next_power_of_2(T))
    num_warps = _WARPS[block]
    with device_guard(K):
        _nash_kernel[(1,)](K, alpha, T, ld, float(reg), float(eps), max_iter, float(stop),
                           BLOCK=block, num_warps=num_warps)
    return alpha
