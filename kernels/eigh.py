r"""Triton kernel of ``fm.solvers.symmetric_eigh`` on CUDA: K = V diag(λ) Vᵀ, one program.

The whole decomposition is ONE program (one launch, no host synchronisation): the parallel
cyclic Jacobi method of ``fastmtl.solvers.eigh.symmetric_eigh_reference``, which is its spec
(rotation formulas, pair order, rotation threshold). A and V are BLOCK × BLOCK tiles
(BLOCK = next power of two >= T, at least 16) in a global scratch buffer that stays in L1/L2.
In a round every index j
meets its partner p(j) (the circle method over M = T rounded up to even; lanes j >= M pair with
themselves and never rotate) and all M/2 rotations apply at once:

.. math::

    A'_{ij} = (c_i c_j A_{ij} + s_i s_j A_{p(i)p(j)}) + (c_i s_j A_{i\,p(j)} + s_i c_j A_{p(i)\,j}),
    \qquad V'_{ij} = c_j V_{ij} + s_j V_{i\,p(j)},

with c_j = cos θ and s_j = J_{p(j), j} of the pair's rotation. Round n reads (A, V) from one
half of the buffer and writes (A', V') to the other, one barrier a round, a band of ROWS rows
at a time: registers hold a ROWS × BLOCK band and a few vectors, never a whole tile, so no
T up to the limit spills (a register-tile version spilled 0.9 KB a thread at T = 64). The
row and column copies of c, s come from the same loads and arithmetic, and the grouping of
the four terms keeps A exactly symmetric. The
sweep loop is a ``while`` on device: it ends after ``max_sweeps`` sweeps or after a sweep that
rotated no pair (such a sweep is an exact no-op, so the result equals the reference's).
Finally λ is sorted ascending by counting ranks (ties by index) and V's columns are scattered
to match. Non-finite entries of K give NaN λ and V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastmtl.kernels._limits import MAX_T as _LIMITS
from fastmtl.kernels._utils import device_guard, next_power_of_2

__all__ = ["MAX_T", "launch"]

MAX_T = _LIMITS["eigh"]  # larger T runs the torch path (``_limits``)
# Spill budget (``kernels.aot``): bytes of spill stores per thread, sm_80/sm_90, every T,
# triton 3.7.1 and 3.6.0.
SPILL_BUDGET = {"_eigh_kernel": 0}
_FLOOR = 1e-2  # = fastmtl.solvers.eigh._FLOOR: absolute rotation floor in ε · max_i |K_ii|


@triton.jit
def _rotation(src, j, rnd, M, eps, floor, BLOCK: tl.constexpr):
    """For the indices j: partner p(j) in round ``rnd``, the pair's rotation (c_j, s_j =
    J[p(j), j]), whether it rotates, and the new diagonal A'_jj; read from the A tile ``src``.
    Row and column copies of these vectors come from the same loads, so they agree exactly."""
    p = (2 * rnd - j + 2 * (M - 1)) % (M - 1)
    p = tl.where(j == M - 1, rnd, p)
    p = tl.where(j == rnd, M - 1, p)
    p = tl.where(j >= M, j, p)
    d = tl.load(src + j * (BLOCK + 1))
    dp = tl.load(src + p * (BLOCK + 1))
    apq = tl.load(src + tl.minimum(j, p) * BLOCK + tl.maximum(j, p))
    first = j < p
    app = tl.where(first, d, dp)
    aqq = tl.where(first, dp, d)
    rot = (tl.abs(apq) > eps * tl.sqrt(tl.abs(app * aqq)) + floor) & (p != j)
    tau = (aqq - app) / (2.0 * tl.where(rot, apq, 1.0))
    t = tl.where(tau >= 0, 1.0, -1.0) / (tl.abs(tau) + tl.sqrt(1.0 + tau * tau))
    t = tl.where(rot, t, 0.0).to(d.dtype)
    c = 1.0 / tl.sqrt(1.0 + t * t)
    s = tl.where(first, -t * c, t * c)
    return p, c, s, rot, d + tl.where(first, -t, t) * apq


@triton.jit
def _eigh_kernel(k_ptr, lam_ptr, v_ptr, scr, T, max_sweeps, eps, floor_rel,
                 BLOCK: tl.constexpr, ROWS: tl.constexpr):
    dt = lam_ptr.dtype.element_ty
    SIZE: tl.constexpr = BLOCK * BLOCK
    r = tl.arange(0, BLOCK)
    cols = r[None, :]
    band = tl.arange(0, ROWS)
    zero = tl.sum(tl.zeros((ROWS,), dtype=dt), axis=0)
    probe = zero
    top = zero
    for i0 in range(0, BLOCK, ROWS):  # buffer 0 := ((K + Kᵀ)/2, I), a band of rows at a time
        i = (i0 + band)[:, None]
        inside = (i < T) & (cols < T)
        a = tl.load(k_ptr + i * T + cols, mask=inside, other=0.0).to(dt)
        a = 0.5 * (a + tl.load(k_ptr + cols * T + i, mask=inside, other=0.0).to(dt))
        tl.store(scr + i * BLOCK + cols, a)
        tl.store(scr + SIZE + i * BLOCK + cols, tl.where(i == cols, 1.0, 0.0).to(dt))
        probe += tl.sum(tl.sum(a, axis=1), axis=0)
        top = tl.maximum(top, tl.max(tl.max(tl.where(i == cols, tl.abs(a), 0.0), axis=1), axis=0))
    probe = 0.0 * probe  # NaN/inf anywhere in K: NaN outputs
    floor = floor_rel * eps * top
    M = T + T % 2

    n = tl.program_id(0) * 0  # rounds done: round n reads buffer n % 2 and writes the other
    sweep = n
    go = sweep < max_sweeps
    while go:
        changed = sweep * 0
        for rnd in range(0, M - 1):
            src = scr + (n % 2) * (2 * SIZE)
            dst = scr + ((n + 1) % 2) * (2 * SIZE)
            tl.debug_barrier()  # the last round's stores are visible and its loads done
            pc, cc, sc, rotc, _ = _rotation(src, r, rnd, M, eps, floor, BLOCK)
            changed = changed | tl.max(rotc.to(tl.int32), axis=0)
            for i0 in range(0, BLOCK, ROWS):  # a band of ROWS rows at a time
                i = i0 + band
                pr, cr, sr, rotr, newd = _rotation(src, i, rnd, M, eps, floor, BLOCK)
                band_a = ((cr[:, None] * cc[None, :]) * tl.load(src + i[:, None] * BLOCK + cols)
                     + (sr[:, None] * sc[None, :]) * tl.load(
                         src + pr[:, None] * BLOCK + pc[None, :])) + (
                    (cr[:, None] * sc[None, :]) * tl.load(src + i[:, None] * BLOCK + pc[None, :])
                    + (sr[:, None] * cc[None, :]) * tl.load(src + pr[:, None] * BLOCK + cols))
                band_a = tl.where(i[:, None] == cols, newd[:, None], band_a)
                band_a = tl.where((cols == pr[:, None]) & rotr[:, None], 0.0, band_a)
                tl.store(dst + i[:, None] * BLOCK + cols, band_a)
                band_v = (tl.load(src + SIZE + i[:, None] * BLOCK + cols) * cc[None, :]
                     + tl.load(src + SIZE + i[:, None] * BLOCK + pc[None, :]) * sc[None, :])
                tl.store(dst + SIZE + i[:, None] * BLOCK + cols, band_v)
            n += 1
        sweep += 1
        go = (sweep < max_sweeps) & (changed != 0)

    tl.debug_barrier()
    src = scr + (n % 2) * (2 * SIZE)
    lam = tl.load(src + r * (BLOCK + 1)) + probe
    # ascending order: rank_j = #{i < T: λ_i < λ_j, or λ_i = λ_j and i < j}
    rank = tl.zeros((BLOCK,), dtype=tl.int32)
    for i0 in range(0, BLOCK, ROWS):
        i = i0 + band
        lam_i = (tl.load(src + i * (BLOCK + 1)) + probe)[:, None]
        before = (lam_i < lam[None, :]) | ((lam_i == lam[None, :]) & (i[:, None] < cols))
        rank += tl.sum(tl.where(before & (i[:, None] < T), 1, 0), axis=0)
    rank = tl.where(lam != lam, r, rank)  # NaN: identity order, every slot written once
    tl.store(lam_ptr + rank, lam, mask=r < T)
    for i0 in range(0, BLOCK, ROWS):
        i = (i0 + band)[:, None]
        V = tl.load(src + SIZE + i * BLOCK + cols) + probe
        tl.store(v_ptr + i * T + rank[None, :], V, mask=(i < T) & (cols < T))


# Warps and rows per band for each BLOCK: no register spills on sm_80/sm_90 with triton 3.6
# and 3.7 (``aot``; A and V as register tiles spilled up to 0.9 KB at BLOCK 64, 24 KB at 128).
_WARPS = 8
_ROWS = {16: 8, 32: 8, 64: 8, 128: 4}


def launch(K: torch.Tensor, max_sweeps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ ascending (T,), V (T, T)) in float32 (float64 for float64 K) for a (T, T) K,
    1 <= T <= MAX_T; the symmetric part (K + Kᵀ)/2 is decomposed."""
    T = K.shape[0]
    if T > MAX_T:
        raise ValueError(f"the eigh kernel handles T <= {MAX_T}, got T = {T}")
    K = K.contiguous()
    dt = torch.float64 if K.dtype == torch.float64 else torch.float32
    block = max(16, next_power_of_2(T))
    lam = torch.empty(T, dtype=dt, device=K.device)
    V = torch.empty((T, T), dtype=dt, device=K.device)
    scratch = torch.empty((2, 2, block, block), dtype=dt, device=K.device)  # 2 × (A, V)
    with device_guard(K):
        _eigh_kernel[(1,)](K, lam, V, scratch, T, max_sweeps,
                           torch.finfo(dt).eps, _FLOOR, BLOCK=block,
                           ROWS=_ROWS[block], num_warps=_WARPS)
    return lam, V
