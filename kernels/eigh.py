r"""Triton kernel of ``fm.solvers.symmetric_eigh`` on CUDA: K = V diag(λ) Vᵀ, one program.

The whole decomposition is ONE program (one launch, no host synchronisation): the parallel
cyclic Jacobi method of ``fastmtl.solvers.eigh.symmetric_eigh_reference``, which is its spec
(rotation formulas, pair order, rotation threshold). A and V live in registers as
BLOCK × BLOCK tiles (BLOCK = next power of two >= T, at least 16). In a round every index j
meets its partner p(j) (the circle method over M = T rounded up to even; lanes j >= M pair with
themselves and never rotate) and all M/2 rotations apply at once:

.. math::

    A'_{ij} = (c_i c_j A_{ij} + s_i s_j A_{p(i)p(j)}) + (c_i s_j A_{i\,p(j)} + s_i c_j A_{p(i)\,j}),
    \qquad V'_{ij} = c_j V_{ij} + s_j V_{i\,p(j)},

with c_j = cos θ and s_j = J_{p(j), j} of the pair's rotation; the permuted tiles are read back
from a global scratch buffer (two BLOCK² tiles, L1/L2-resident) between two barriers, since
registers cannot be gathered. The grouping of the four terms keeps A exactly symmetric. The
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
# Spill budget (``kernels.aot``): bytes of spill stores per thread for each BLOCK, the worst
# of sm_80/sm_90 over every T with triton 3.7.1 and 3.6.0, rounded up to 64 B.
# Spills left at BLOCK 16 (3.6 only) and 64: the goal is none to T = 64.
SPILL_BUDGET = {"_eigh_kernel": ("BLOCK", {16: 64, 32: 0, 64: 960, 128: 24960})}
_FLOOR = 1e-2  # = fastmtl.solvers.eigh._FLOOR: absolute rotation floor in ε · max_i |K_ii|


@triton.jit
def _eigh_kernel(k_ptr, lam_ptr, v_ptr, a_scr, v_scr, T, max_sweeps, eps, floor_rel,
                 BLOCK: tl.constexpr):
    dt = lam_ptr.dtype.element_ty
    r = tl.arange(0, BLOCK)
    rows = r[:, None]
    cols = r[None, :]
    inside = (rows < T) & (cols < T)
    A = tl.load(k_ptr + rows * T + cols, mask=inside, other=0.0).to(dt)
    A = 0.5 * (A + tl.load(k_ptr + cols * T + rows, mask=inside, other=0.0).to(dt))
    eye = rows == cols
    V = tl.where(eye, 1.0, 0.0).to(dt)
    probe = 0.0 * tl.sum(tl.sum(A, axis=1), axis=0)  # NaN/inf anywhere in K: NaN outputs
    floor = floor_rel * eps * tl.max(tl.abs(tl.sum(tl.where(eye, A, 0.0), axis=1)), axis=0)
    tile = rows * BLOCK + cols
    M = T + T % 2

    sweep = tl.program_id(0) * 0
    go = sweep < max_sweeps
    while go:
        changed = sweep * 0
        for rnd in range(0, M - 1):
            p = (2 * rnd - r + 2 * (M - 1)) % (M - 1)
            p = tl.where(r == M - 1, rnd, p)
            p = tl.where(r == rnd, M - 1, p)
            p = tl.where(r >= M, r, p)
            tl.store(a_scr + tile, A)
            tl.store(v_scr + tile, V)
            tl.debug_barrier()
            d = tl.load(a_scr + r * (BLOCK + 1))
            dp = tl.load(a_scr + p * (BLOCK + 1))
            apq = tl.load(a_scr + tl.minimum(r, p) * BLOCK + tl.maximum(r, p))
            first = r < p
            app = tl.where(first, d, dp)
            aqq = tl.where(first, dp, d)
            rot = (tl.abs(apq) > eps * tl.sqrt(tl.abs(app * aqq)) + floor) & (p != r)
            tau = (aqq - app) / (2.0 * tl.where(rot, apq, 1.0))
            t = tl.where(tau >= 0, 1.0, -1.0) / (tl.abs(tau) + tl.sqrt(1.0 + tau * tau))
            t = tl.where(rot, t, 0.0).to(dt)
            c = 1.0 / tl.sqrt(1.0 + t * t)
            s = tl.where(first, -t * c, t * c)  # J[p(j), j]
            a_pp = tl.load(a_scr + p[:, None] * BLOCK + p[None, :])
            a_ip = tl.load(a_scr + rows * BLOCK + p[None, :])
            a_pj = tl.load(a_scr + p[:, None] * BLOCK + cols)
            v_ip = tl.load(v_scr + rows * BLOCK + p[None, :])
            tl.debug_barrier()
            A = ((c[:, None] * c[None, :]) * A + (s[:, None] * s[None, :]) * a_pp) + (
                (c[:, None] * s[None, :]) * a_ip + (s[:, None] * c[None, :]) * a_pj)
            newd = d + tl.where(first, -t, t) * apq
            A = tl.where(eye, newd[:, None], A)
            A = tl.where((cols == p[:, None]) & rot[:, None], 0.0, A)
            V = V * c[None, :] + v_ip * s[None, :]
            changed = changed | tl.max(rot.to(tl.int32), axis=0)
        sweep += 1
        go = (sweep < max_sweeps) & (changed != 0)

    lam = tl.sum(tl.where(eye, A, 0.0), axis=1) + probe
    V = V + probe
    # ascending order: rank_i = #{j < T: λ_j < λ_i, or λ_j = λ_i and j < i}
    lam_i = lam[:, None]
    lam_j = lam[None, :]
    before = (lam_j < lam_i) | ((lam_j == lam_i) & (cols < rows))
    rank = tl.sum(tl.where(before & (cols < T), 1, 0), axis=1)
    rank = tl.where(lam != lam, r, rank)  # NaN: identity order, every slot written once
    tl.store(lam_ptr + rank, lam, mask=r < T)
    tl.store(v_ptr + rows * T + rank[None, :], V, mask=inside)


# Warps per BLOCK: the fewest with no (or the fewest) register spills for sm_80/sm_90 (``aot``;
# 1, 2 and 8 warps spilled 16 B, 160 B and 96 B at BLOCK = 16, 32, 64).
_WARPS = {16: 8, 32: 16, 64: 16, 128: 16}


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
    scratch = torch.empty((2, block, block), dtype=dt, device=K.device)
    with device_guard(K):
        _eigh_kernel[(1,)](K, lam, V, scratch[0], scratch[1], T, max_sweeps,
                           torch.finfo(dt).eps, _FLOOR, BLOCK=block,
                           num_warps=_WARPS[block])
    return lam, V
