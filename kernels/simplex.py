r"""Triton kernel of ``fm.solvers.min_norm_simplex``: w = argmin_{w ∈ Δ} wᵀ K w, one program.

The whole solve is ONE program (one launch, no host synchronisation): pairwise Frank–Wolfe
with exact line search and second-order pair selection (the SMO step of SVM solvers), the same
algorithm as ``fastmtl.solvers.simplex.min_norm_simplex_reference``, which is its spec:

.. math::

    g = K w,\qquad v = \arg\max_{i:\,w_i>0} g_i,\qquad
    s = \arg\max_{i:\,g_v-g_i>\tau} \frac{(g_v-g_i)^2}{K_{ii}+K_{vv}-2K_{iv}},

    \gamma = \min\Big(\frac{g_v-g_s}{K_{ss}+K_{vv}-2K_{sv}},\; w_v\Big),\qquad
    w \leftarrow w + \gamma (e_s - e_v),\qquad g \leftarrow g + \gamma (K_{:s} - K_{:v}),

with τ_i = tol · wᵀKw + eps · m (n_v + n_i), n_i = √K_ii, m = Σ_j w_j n_j (eps: 4 × machine
epsilon, the rounding allowance); it stops (on device, a ``while`` loop) when no g_v − g_i
exceeds τ_i (the KKT conditions up to τ), or after ``max_iter`` steps. Only vectors of length
T live in registers (a padded block of BLOCK >= T lanes); each step reads the two rows K_v, K_s
(K is symmetric) from global memory, which stay in L1/L2: O(T) work a step, not O(T²).
g is kept incrementally and recomputed exactly (g = K w, tiled over columns, w re-read from the
output buffer used as scratch) every ``REFRESH`` steps and before the stop test is trusted.
Non-finite entries of K give NaN weights (never a finite answer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastmtl.kernels._limits import MAX_T as _LIMITS
from fastmtl.kernels._utils import next_power_of_2

__all__ = ["MAX_T", "launch"]

MAX_T = _LIMITS["simplex"]  # larger T runs the torch path (``_limits``)
# Spill budget (``kernels.aot``): spill bytes per thread for each BLOCK, the worst of
# sm_80/sm_90 over every T with triton 3.7.1 and 3.6.0, rounded up to 64 B.
# None up to T = 64, a value or two above.
SPILL_BUDGET = {
    "_min_norm_simplex_kernel": (
        "BLOCK", {16: 0, 32: 0, 64: 0, 128: 64, 256: 64, 512: 64, 1024: 64}),
}
_REFRESH = 32


@triton.jit
def _matvec(k_ptr, w_ptr, T, ld, offs, mask, ONES: tl.constexpr, BLOCK: tl.constexpr,
            BC: tl.constexpr):
    """K @ w for K (T, T) with row stride ``ld``, w read from ``w_ptr`` (or w = 1 when ONES),
    in w's dtype."""
    acc = tl.zeros((BLOCK,), dtype=w_ptr.dtype.element_ty)
    cols = tl.arange(0, BC)
    for c0 in range(0, T, BC):
        c = c0 + cols
        cmask = c < T
        tile = tl.load(k_ptr + offs[:, None] * ld + c[None, :],
                       mask=mask[:, None] & cmask[None, :], other=0.0)
        tile = tile.to(w_ptr.dtype.element_ty)
        if ONES:
            acc += tl.sum(tile, axis=1)
        else:
            wc = tl.load(w_ptr + c, mask=cmask, other=0.0)
            acc += tl.sum(tile * wc[None, :], axis=1)
    return acc


@triton.jit
def _shift(kx, x, mask, b, s, s2g):
    """K_s x from K x for K_s = K + s(b1ᵀ + 1bᵀ) + s²‖g0‖² 11ᵀ (``s2g`` = s²‖g0‖²)."""
    sx = tl.sum(x, axis=0)
    return tl.where(mask, kx + s * (b * sx + tl.sum(b * x, axis=0)) + s2g * sx, 0.0)


@triton.jit
def _row(k_ptr, i, T, ld, offs, mask, b, s, s2g, dt):
    """Row i of K_s (K symmetric, read from global memory)."""
    ki = tl.load(k_ptr + i * ld + offs, mask=mask, other=0.0).to(dt)
    bi = tl.sum(tl.where(offs == i, b, 0.0), axis=0)
    return tl.where(mask, ki + s * (bi + b) + s2g, 0.0)


@triton.jit
def _solve_shifted(k_ptr, w_ptr, T, ld, offs, mask, b, s, s2g, max_iter, tol, eps,
                   BLOCK: tl.constexpr, BC: tl.constexpr, REFRESH: tl.constexpr):
    """argmin_{w ∈ Δ} wᵀ K_s w (K_s as in ``_shift``; s = 0 is the plain problem) in registers;
    ``w_ptr`` (T,) is scratch and holds w on return."""
    dt = w_ptr.dtype.element_ty
    diag = tl.load(k_ptr + offs * (ld + 1), mask=mask, other=0.0).to(dt)
    diag = tl.where(mask, diag + 2.0 * s * b + s2g, 0.0)
    norms = tl.sqrt(tl.maximum(diag, 0.0))
    ones = mask.to(dt)
    tn = tl.sum(ones, axis=0)  # T as a float (T itself may be a constexpr 1)

    # Start at the uniform point if its objective sum(K)/T² is at most min_i K_ii, else at
    # the vertex of the shortest gradient.
    ksum = tl.sum(_shift(_matvec(k_ptr, w_ptr, T, ld, offs, mask, True, BLOCK, BC), ones, mask,
                         b, s, s2g), axis=0)
    dmasked = tl.where(mask, diag, float("inf"))
    vmin = tl.argmin(dmasked, axis=0)
    uniform = ksum / (tn * tn) <= tl.min(dmasked, axis=0)
    w = tl.where(mask, tl.where(uniform, 1.0 / tn, tl.where(offs == vmin, 1.0, 0.0)), 0.0)
    w = w.to(dt)
    tl.debug_barrier()
    tl.store(w_ptr + offs, w, mask=mask)
    tl.debug_barrier()
    g = _shift(_matvec(k_ptr, w_ptr, T, ld, offs, mask, False, BLOCK, BC), w, mask, b, s, s2g)

    it = tl.program_id(0) * 0
    fresh = it + 1  # g was computed exactly, not updated incrementally, since the last refresh
    go = it < max_iter
    while go:
        gw = tl.where(mask & (w > 0), g, float("-inf"))
        v = tl.argmax(gw, axis=0)
        diff = tl.where(mask, tl.max(gw, axis=0) - g, float("-inf"))
        kv = _row(k_ptr, v, T, ld, offs, mask, b, s, s2g, dt)
        kvv = tl.sum(tl.where(offs == v, diag, 0.0), axis=0)
        nv = tl.sum(tl.where(offs == v, norms, 0.0), axis=0)
        thr = (tol * tl.maximum(tl.sum(w * g, axis=0), 0.0)
               + eps * tl.sum(w * norms, axis=0) * (nv + norms))
        viol = diff > thr
        den = tl.where(viol, tl.maximum(diag + kvv - 2.0 * kv, 0.0), 1.0)
        gain = tl.where(viol, diff * diff / den, -1.0)
        s_new = tl.argmax(gain, axis=0)
        ds = tl.sum(tl.where(offs == s_new, diff, 0.0), axis=0)
        dens = tl.sum(tl.where(offs == s_new, den, 0.0), axis=0)
        wv = tl.sum(tl.where(offs == v, w, 0.0), axis=0)
        active = tl.max(gain, axis=0) >= 0.0
        gam = tl.where(active, tl.minimum(ds / dens, wv), 0.0)
        ks = _row(k_ptr, s_new, T, ld, offs, mask, b, s, s2g, dt)
        w = tl.where(offs == s_new, w + gam, tl.where(offs == v, w - gam, w))
        g = g + gam * (ks - kv)
        it += 1
        stop = (active == 0) & (fresh != 0)
        refresh = ((it % REFRESH) == 0) | (active == 0)
        if refresh:
            tl.debug_barrier()
            tl.store(w_ptr + offs, w, mask=mask)
            tl.debug_barrier()
            g = _shift(_matvec(k_ptr, w_ptr, T, ld, offs, mask, False, BLOCK, BC), w, mask, b, s,
                       s2g)
        fresh = refresh.to(tl.int32)
        go = (it < max_iter) & (stop == 0)

    # NaN/inf anywhere in K reached g through the exact products: propagate it to w.
    w = w + 0.0 * tl.sum(g, axis=0)
    tl.debug_barrier()
    tl.store(w_ptr + offs, w, mask=mask)
    tl.debug_barrier()
    return w


@triton.jit
def _min_norm_simplex_kernel(k_ptr, w_ptr, T, max_iter, tol, eps, BLOCK: tl.constexpr,
                             BC: tl.constexpr, REFRESH: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < T
    zero = tl.zeros((BLOCK,), dtype=w_ptr.dtype.element_ty)
    _solve_shifted(k_ptr, w_ptr, T, T, offs, mask, zero, 0.0, 0.0, max_iter, tol, eps, BLOCK, BC,
                   REFRESH)


# (BC, num_warps) per BLOCK: column tiles of BC columns for the exact products K @ w; chosen
# with ``aot`` so that neither this kernel nor CAGrad's (the same solver inside a root search)
# spills up to BLOCK = 64.
_CONFIG = {16: (16, 1), 32: (16, 1), 64: (4, 1), 128: (2, 1), 256: (2, 2), 512: (1, 2),
           1024: (1, 4)}


def _config(T: int) -> tuple[int, int, int]:
    """(BLOCK, BC, num_warps) for T: a padded block of T lanes and ``_CONFIG``'s tiles."""
    block = max(16, next_power_of_2(T))
    return (block, *_CONFIG[block])


def launch(K: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """w (T,) in float32 (float64 for float64 K) for a validated (T, T) K, 1 <= T <= MAX_T."""
    T = K.shape[0]
    if T > MAX_T:
        raise ValueError(f"the simplex kernel handles T <= {MAX_T}, got T = {T}")
    K = K.contiguous()
    w = torch.empty(T, dtype=torch.float64 if K.dtype == torch.float64 else torch.float32,
                    device=K.device)
    block, bc, num_warps = _config(T)
    eps = 4.0 * torch.finfo(w.dtype).eps  # rounding allowance, as in the torch reference
    _min_norm_simplex_kernel[(1,)](K, w, T, max_iter, float(tol), eps, BLOCK=block, BC=bc,
                                   REFRESH=_REFRESH, num_warps=num_warps)
    return w
