r"""Triton kernels of ``fm.ops.gram``: K = G Gᵀ for G of shape (T, N).

.. math::

    K_{ij} = \sum_{n < N} G_{in} G_{jn}
           = \sum_{s < S} \underbrace{\sum_{n \in \mathrm{chunk}_s} G_{in} G_{jn}}_{P^{(s)}_{ij}}

Pass 1 (``_gram_partial``): the grid is (upper-triangle pairs of T-tiles) × (S chunks of N);
each program accumulates the BLOCK_T × BLOCK_T partial Gram P⁽ˢ⁾ of its tile pair over its
chunk, in fp32 (fp64 for fp64 input), and stores it in a (S, T, T) workspace. Only pairs
ti <= tj are computed. Pass 2 (``_gram_reduce``): K_ij = Σ_s P⁽ˢ⁾_{min(i,j), max(i,j)} summed
for s = 0, 1, ... in that order, so K is deterministic (no atomics) and exactly symmetric:
bit-identical from call to call (and across processes with FASTMTL_AUTOTUNE=0, see ``_utils``).

Products are exact in fp32 for bf16/fp16 inputs; fp32 inputs use ``tl.dot`` with
``input_precision="ieee"`` (never TF32) or an elementwise multiply-and-sum for small T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastmtl.kernels._utils import (
    INTERPRET,
    PTXAS_SPILL_SLACK,
    autotune,
    cdiv,
    check_columns,
    device_guard,
    next_power_of_2,
    num_programs_target,
    round_up,
)

__all__ = ["launch"]

# Widest tile of T rows; with tl.dot under the interpreter a smaller one exercises tiling at T=64.
_MAX_BLOCK_T = 16 if INTERPRET else 64
_DOT_MIN = 16  # tl.dot needs every dimension >= 16 on older Triton/GPUs
_GPU_CONFIGS = ((32, 8), (64, 4), (64, 8), (128, 4), (128, 8), (256, 4), (256, 8), (512, 8),
                (1024, 8), (2048, 8))
# Register words (4 bytes) a thread may hold without spilling, measured with ``kernels.aot``
# (sm_80/sm_90): tl.dot path, the BLOCK_T x BLOCK_N tiles of G and the BLOCK_T² accumulator at
# most 16 words each (64 x 64 tiles on 4 warps spilled 40 B, 64 x 128 ones 1.4 KB, two fp32
# 64 x 64 tiles on 8 warps 40 B); elementwise path, the products and tiles at most 144 words
# (fp64 two-tile 8 x 8 x 128 on 4 warps spilled).
_DOT_PER_THREAD = 16
_PRODUCT_WORDS = 144
SPILL_BUDGET = {"_gram_partial": PTXAS_SPILL_SLACK}  # tiles that do not fit are pruned
_CHUNK_ALIGN = 64 if INTERPRET else 2048  # chunks of N start on a multiple of every BLOCK_N
_REDUCE_BLOCK = 1024


def _fits(bt: int, one_tile: bool, use_dot: bool, g_size: int, bn: int, num_warps: int) -> bool:
    """Whether BLOCK_T = bt, BLOCK_N = bn on ``num_warps`` warps stays in registers (``g_size``:
    bytes of an element of G; the elementwise path multiplies in the accumulation dtype)."""
    threads = 32 * num_warps
    tiles = 1 if one_tile else 2
    if use_dot:
        return (tiles * bt * bn * g_size <= 4 * _DOT_PER_THREAD * threads
                and bt * bt <= _DOT_PER_THREAD * threads)
    words = 2 if g_size == 8 else 1
    return (bt * bt + tiles * bt) * bn * words <= _PRODUCT_WORDS * threads


def _prune(configs, named_args, **kwargs):
    """Keep the configs whose tiles fit in registers (``_fits``)."""
    g_size = named_args["g_ptr"].element_size()
    kept = [c for c in configs if _fits(kwargs["BLOCK_T"], kwargs["ONE_TILE"], kwargs["USE_DOT"],
                                        g_size, c.kwargs["BLOCK_N"], c.num_warps)]
    return kept or configs[:1]


@autotune(
    gpu=[({"BLOCK_N": bn}, w, 3 if bn <= 256 else 2) for bn, w in _GPU_CONFIGS],
    default=({"BLOCK_N": 32}, 8, 3),  # fits every BLOCK_T (two fp32 64-row tiles: ``_fits``)
    interpret={"BLOCK_N": 64},
    key=["T", "N"],
    prune=_prune,
)
@triton.jit
def _gram_partial(
    g_ptr, ws_ptr, T, N, stride_t, CHUNK, NUM_TILES,
    BLOCK_T: tl.constexpr, ONE_TILE: tl.constexpr, USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pair = tl.program_id(0)
    split = tl.program_id(1)
    if ONE_TILE:
        ti = 0
        tj = 0
    else:
        # pair -> (ti, tj), ti <= tj, row-major over the upper triangle of tiles:
        # row r starts at r * NUM_TILES - r * (r - 1) / 2.
        ti = pair * 0
        for r in range(1, NUM_TILES):
            ti = tl.where(pair >= r * NUM_TILES - (r * (r - 1)) // 2, r, ti)
        tj = ti + pair - (ti * NUM_TILES - (ti * (ti - 1)) // 2)
    rows_i = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    rows_j = tj * BLOCK_T + tl.arange(0, BLOCK_T)
    ptr_i = g_ptr + rows_i.to(tl.int64)[:, None] * stride_t
    ptr_j = g_ptr + rows_j.to(tl.int64)[:, None] * stride_t
    start = split * CHUNK
    end = start + tl.minimum(N - start, CHUNK)  # no int32 overflow for N near MAX_N
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=ACC)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < end
        a = tl.load(ptr_i + cols[None, :], mask=(rows_i < T)[:, None] & cmask[None, :], other=0.0)
        if ONE_TILE:
            b = a
        else:
            b = tl.load(ptr_j + cols[None, :], mask=(rows_j < T)[:, None] & cmask[None, :],
                        other=0.0)
        if UPCAST:  # interpreter only: its tl.dot multiplies bf16 bit patterns (exact either way)
            a = a.to(ACC)
            b = b.to(ACC)
        if USE_DOT:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee", out_dtype=ACC)
        else:
            a = a.to(ACC)
            b = b.to(ACC)
            acc += tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    ws = ws_ptr + split.to(tl.int64) * T * T
    out_mask = (rows_i < T)[:, None] & (rows_j < T)[None, :]
    tl.store(ws + rows_i[:, None] * T + rows_j[None, :], acc, mask=out_mask)


@triton.jit
def _gram_reduce(ws_ptr, k_ptr, T, SPLIT, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < T * T
    i = offs // T
    j = offs % T
    upper = tl.minimum(i, j) * T + tl.maximum(i, j)  # read (i, j) and (j, i) from one place
    acc = tl.load(ws_ptr + upper, mask=mask, other=0.0)
    for s in range(1, SPLIT):
        acc += tl.load(ws_ptr + s * T * T + upper, mask=mask, other=0.0)
    tl.store(k_ptr + offs, acc, mask=mask)


def _block_t(T: int, dtype: torch.dtype) -> tuple[int, bool]:
    """(BLOCK_T, USE_DOT): elementwise products for small T and fp64, tl.dot otherwise."""
    bt = next_power_of_2(T)
    if dtype == torch.float64 or bt < _DOT_MIN:
        return min(bt, 8), False
    return min(bt, _MAX_BLOCK_T), True


def launch(G: torch.Tensor) -> torch.Tensor:
    """K = G Gᵀ for G (T, N) with unit stride along N: (T, T) fp32 (fp64 for fp64 G)."""
    T, N = G.shape
    check_columns("gram", N)
    acc = torch.float64 if G.dtype == torch.float64 else torch.float32
    block_t, use_dot = _block_t(T, G.dtype)
    tiles = cdiv(T, block_t)
    pairs = tiles * (tiles + 1) // 2
    split = max(1, min(cdiv(N, _CHUNK_ALIGN), cdiv(num_programs_target(G.device), pairs)))
    chunk = round_up(cdiv(N, split), _CHUNK_ALIGN)
    split = cdiv(N, chunk)
    ws = torch.empty((split, T, T), dtype=acc, device=G.device)
    K = torch.empty((T, T), dtype=acc, device=G.device)
    with device_guard(G):
        _gram_partial[(pairs, split)](
            G, ws, T, N, G.stride(0), chunk, tiles,
            BLOCK_T=block_t, ONE_TILE=tiles == 1, USE_DOT=use_dot,
            UPCAST=INTERPRET and G.dtype == torch.bfloat16,
            ACC=tl.float64 if acc == torch.float64 else tl.float32,
        )
        _gram_reduce[(cdiv(T * T, _REDUCE_BLOCK),)](ws, K, T, split, BLOCK=_REDUCE_BLOCK)
    return K
