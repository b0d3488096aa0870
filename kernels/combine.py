r"""Triton kernel of ``fm.ops.combine``: d = Gᵀ w for G of shape (T, N) and w of shape (T,).

.. math::

    d_j = \sum_{i < T} w_i G_{ij}, \qquad
    \mathrm{out}_j \leftarrow d_j \ \text{ or } \ \mathrm{out}_j + d_j \ (\text{accumulate})

One program per block of BLOCK_N columns loops over the rows of G in tiles of BLOCK_T rows,
summing ``w[:, None] * G_tile`` over the rows in the accumulation dtype (fp32, fp64 for fp64
G): one pass over G, one read (accumulate) and one write of ``out``, cast to ``out``'s dtype.
The summation order is fixed by (T, BLOCK_T) and the config: results are bit-identical from call
to call (and across processes with FASTMTL_AUTOTUNE=0, see ``_utils``). No atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastmtl.kernels._utils import (
    PTXAS_SPILL_SLACK,
    autotune,
    cdiv,
    check_columns,
    device_guard,
    next_power_of_2,
)

__all__ = ["launch"]

_MAX_BLOCK_T = 8  # rows per tile; the T loop does the rest
# Tile elements a thread may hold: 8 x 1024 tiles on 4 warps (64) spilled 8-48 B (``aot``).
_PER_THREAD = 32
SPILL_BUDGET = {"_combine": PTXAS_SPILL_SLACK}  # tiles that do not fit are pruned


def _prune(configs, named_args, **kwargs):
    """Keep configs whose BLOCK_T x BLOCK_N tile fits in registers."""
    kept = [c for c in configs
            if kwargs["BLOCK_T"] * c.kwargs["BLOCK_N"] <= _PER_THREAD * 32 * c.num_warps]
    return kept or configs[:1]


@autotune(
    gpu=[({"BLOCK_N": bn}, w, 3) for bn, w in ((256, 4), (512, 4), (1024, 4), (1024, 8),
                                                (2048, 8))],
    default=({"BLOCK_N": 512}, 4, 3),  # fits every BLOCK_T
    interpret={"BLOCK_N": 64},
    key=["T", "N"],
    prune=_prune,
    restore_value=["out_ptr"],  # benchmarking runs it repeatedly; accumulate reads out
)
@triton.jit
def _combine(
    w_ptr, g_ptr, out_ptr, T, N, stride_w, stride_t,
    ACCUMULATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    acc_ty = w_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=acc_ty)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < T
        w = tl.load(w_ptr + rows * stride_w, mask=rmask, other=0.0)
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(w[:, None] * g.to(acc_ty), axis=0)
    if ACCUMULATE:
        acc += tl.load(out_ptr + cols, mask=cmask, other=0.0).to(acc_ty)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def launch(w: torch.Tensor, G: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """out = Gᵀ w (or out += Gᵀ w) for w (T,) in the accumulation dtype, G (T, N) with unit
    stride along N, out (N,) contiguous in G's or the accumulation dtype."""
    T, N = G.shape
    check_columns("combine", N)
    acc = torch.float64 if G.dtype == torch.float64 else torch.float32
    if w.dtype != acc:
        raise TypeError(f"combine kernel: w must be {acc}, got {w.dtype}")
    block_t = min(next_power_of_2(T), _MAX_BLOCK_T)
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]),)
    with device_guard(G):
        _combine[grid](
            w, G, out, T, N, w.stride(0), G.stride(0),
            ACCUMULATE=bool(accumulate), BLOCK_T=block_t,
        )

