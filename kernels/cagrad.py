r"""Triton kernel of ``fm.solvers.cagrad_simplex``: CAGrad's inner problem in ONE program.

The same root search as ``fastmtl.solvers.cagrad.cagrad_simplex_reference`` (its spec): for the
shifted Gram K_s = K + s(b1ᵀ + 1bᵀ) + s²‖g0‖² 11ᵀ (b = K1/T), w(s) = argmin_{w∈Δ} wᵀK_s w and
ψ(s) = ‖g_{w(s)}‖ − s√φ; ``steps`` steps alternating Illinois and bisection on [0, s_hi]. Each
w(s) is the pairwise Frank–Wolfe solve of ``fastmtl.kernels.simplex`` on K_s, whose rows are
formed on the fly from K's rows and b (K_s is never materialised). The whole search, the
final choice and the degenerate vertex case run on the device in one launch, in float64: no
host synchronisation and no launch per step (the torch reference takes ~20 ops a step).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from fastmtl.kernels._limits import MAX_T as _LIMITS
from fastmtl.kernels._utils import pad_rows
from fastmtl.kernels.simplex import _config, _matvec, _solve_shifted

__all__ = ["MAX_T", "launch"]

MAX_T = _LIMITS["cagrad"]  # larger T runs the torch path (``_limits``)
# Spill budget (``kernels.aot``): spill bytes per thread for each BLOCK, the worst of
# sm_80/sm_90 over every T with triton 3.7.1 and 3.6.0, rounded up to 64 B. None to T = 128:
# the search inlines ONE simplex solve (three call sites spilled 0.2 KB) and reads K through
# rows padded to 16 doubles (aligned loads; unpadded odd T spilled up to 0.2 KB).
SPILL_BUDGET = {
    "_cagrad_kernel": (
        "BLOCK", {16: 0, 32: 0, 64: 0, 128: 0, 256: 64, 512: 512, 1024: 512}),
}
_REFRESH = 32
_GUARD = 1e-3  # = fastmtl.solvers.cagrad._GUARD


@triton.jit
def _psi(k_ptr, w_ptr, T, ld, offs, mask, b, s, g0sq, sqrt_phi, max_iter, tol, eps,
         BLOCK: tl.constexpr, BC: tl.constexpr, REFRESH: tl.constexpr):
    """w(s), ψ(s) = ‖g_w‖ − s√φ and the relative residual |ψ| / (‖g_w‖ + s√φ) (1 at 0/0)."""
    w = _solve_shifted(k_ptr, w_ptr, T, ld, offs, mask, b, s, s * s * g0sq, max_iter, tol, eps,
                       BLOCK, BC, REFRESH)
    kw = _matvec(k_ptr, w_ptr, T, ld, offs, mask, False, BLOCK, BC)
    norm = tl.sqrt(tl.maximum(tl.sum(w * kw, axis=0), 0.0))
    radius = s * sqrt_phi
    total = norm + radius
    rel = tl.where(total > 0, tl.abs(norm - radius) / tl.where(total > 0, total, 1.0), 1.0)
    return w, norm - radius, rel


@triton.jit(do_not_specialize=["T"])  # one binary per BLOCK: ld carries the alignment
def _cagrad_kernel(k_ptr, w_ptr, out_ptr, T, ld, c_hi, c_lo, steps, max_iter, tol, eps, guard_hi,
                   guard_lo, BLOCK: tl.constexpr, BC: tl.constexpr, REFRESH: tl.constexpr):
    dt = w_ptr.dtype.element_ty
    zero = tl.sum(tl.zeros((BLOCK,), dtype=dt), axis=0)
    c = (zero + c_hi) + c_lo  # Python floats arrive as float32: c = c_hi + c_lo in float64
    guard = (zero + guard_hi) + guard_lo
    offs = tl.arange(0, BLOCK)
    mask = offs < T
    tn = tl.sum(mask.to(dt), axis=0)
    # K's row sums are used ONCE, here: a second use of a loop's reduction result crashes
    # Triton's TritonGPUOptimizeThreadLocality pass for T a multiple of 16 (16..256)
    b = tl.where(mask, _matvec(k_ptr, w_ptr, T, ld, offs, mask, True, BLOCK, BC) / tn, 0.0)
    g0sq = tl.maximum(tl.sum(b, axis=0) / tn, 0.0)
    sqrt_phi = c * tl.sqrt(g0sq)
    positive = sqrt_phi > 0
    diag = tl.load(k_ptr + offs * (ld + 1), mask=mask, other=0.0).to(dt)
    top = tl.max(tl.where(mask, tl.sqrt(tl.maximum(diag, 0.0)), 0.0), axis=0)

    lo = zero
    hi = tl.where(positive, top / tl.where(positive, sqrt_phi, 1.0), 1.0)
    # ONE inlined ψ solve (each call site inlines a whole simplex solver): pass 0 evaluates
    # ψ(lo), pass 1 ψ(hi), pass k + 2 is the search's step k.
    w_lo = tl.zeros((BLOCK,), dtype=dt)
    w_hi = w_lo
    r_lo = zero
    r_hi = zero
    fa = zero  # Illinois values (halved when the same end is kept twice)
    fb = zero
    side = zero  # which end the last Illinois step moved (+1: lo, -1: hi, 0 after a bisection)
    for j in range(steps + 2):
        illinois = (j % 2) == 0  # step k = j - 2: Illinois on even k, bisection on odd
        den = fa - fb
        s_if = tl.where(den > 0, lo + (hi - lo) * (fa / tl.where(den > 0, den, 1.0)),
                        0.5 * (lo + hi))
        gap = guard * (hi - lo)  # never within a 1e-3 fraction of an end
        s_if = tl.minimum(tl.maximum(s_if, lo + gap), hi - gap)
        s = tl.where(illinois, s_if, 0.5 * (lo + hi))
        s = tl.where(j == 0, lo, tl.where(j == 1, hi, s))
        w, f, r = _psi(k_ptr, w_ptr, T, ld, offs, mask, b, s, g0sq, sqrt_phi, max_iter, tol, eps,
                       BLOCK, BC, REFRESH)
        up = tl.where(j < 2, j == 0, f > 0)  # the root lies above s (pass 0 sets lo's values)
        lo = tl.where(up, s, lo)
        hi = tl.where(up, hi, s)
        w_lo = tl.where(up, w, w_lo)
        w_hi = tl.where(up, w_hi, w)
        r_lo = tl.where(up, r, r_lo)
        r_hi = tl.where(up, r_hi, r)
        fa_if = tl.where(up, f, tl.where(side < 0, 0.5 * fa, fa))
        fb_if = tl.where(up, tl.where(side > 0, 0.5 * fb, fb), f)
        fa = tl.where(illinois, fa_if, tl.where(up, f, fa))
        fb = tl.where(illinois, fb_if, tl.where(up, fb, f))
        side = tl.where(illinois & (j >= 2), tl.where(up, 1.0, -1.0), 0.0).to(dt)
    w_best = tl.where(r_hi <= r_lo, w_hi, w_lo)
    bmin = tl.argmin(tl.where(mask, b, float("inf")), axis=0)
    vertex = tl.where(offs == bmin, 1.0, 0.0).to(dt)
    w = tl.where(positive, w_best, vertex)
    w = w + 0.0 * tl.sum(b, axis=0)  # non-finite K gives NaN (through its row sums)
    tl.store(out_ptr + offs, w, mask=mask)


def _split(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo float32 values (x to ~2⁻⁴⁸ relative): a float64 scalar
    argument without a host-to-device copy."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def launch(K: torch.Tensor, c: float, steps: int, max_iter: int, tol: float) -> torch.Tensor:
    """w⋆ (T,) in float64 for a validated symmetric (T, T) K (cast to float64), T <= MAX_T."""
    T = K.shape[0]
    if T > MAX_T:
        raise ValueError(f"the CAGrad kernel handles T <= {MAX_T}, got T = {T}")
    K, ld = pad_rows(K, torch.float64)
    scratch = torch.empty(T, dtype=torch.float64, device=K.device)
    w = torch.empty(T, dtype=torch.float64, device=K.device)
    block, bc, num_warps = _config(T)
    eps = 4.0 * torch.finfo(torch.float64).eps  # rounding allowance, as in the simplex solver
    _cagrad_kernel[(1,)](K, scratch, w, T, ld, *_split(c), steps, max_iter, float(tol), eps,
                         *_split(_GUARD), BLOCK=block, BC=bc, REFRESH=_REFRESH,
                         num_warps=num_warps)
    return w
