r"""Triton kernel of ``fm.ops.project``: P = C G for G of shape (T, N) and C of shape (T', T).

.. math::

    P_{kn} = \sum_{i < T} C_{ki} G_{in}

One program per (block of BLOCK_N columns) × (tile of BLOCK_TP output rows); the tile index
varies fastest, so the programs of one column block run side by side and, when T' fits one
tile (on a GPU up to 64 rows; 32 for fp64, bf16 or fp16 G, or T < 16), each column block of G
is read exactly once for all T' rows (beyond, the other tiles' re-reads of a column block hit
L2). The program loops over the rows of G in chunks of BLOCK_T and accumulates its
BLOCK_TP × BLOCK_N tile of P in fp32 (fp64 for fp64 G): with ``tl.dot``
(``input_precision="ieee"``, never TF32) when T' and T are both >= 16 and G is not fp64, else
with elementwise products summed over the chunk (for chunks of one row, the outer product
itself: Triton would turn its sum over an axis of 1 into a TF32 dot). Each output element is
written once, cast to ``out``'s dtype. The summation order is fixed by (T, T', BLOCK_T) and the
config: results are bit-identical from call to call (and across processes with
FASTMTL_AUTOTUNE=0, see ``_utils``). No atomics. ``python -m fastmtl.kernels.aot`` checks
every config compiles without TF32 and without spills for sm_80 and sm_90.
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
)

__all__ = ["launch"]

# Widest tile of output rows (tl.dot / elementwise path); under the interpreter smaller ones
# exercise tiling of T' at the test sizes.
_MAX_DOT_TP = 16 if INTERPRET else 64
# bf16/fp16 G converted to fp32 for the IEEE dot: 64 x 32 and 32 x 32 (BLOCK_TP x BLOCK_T)
# tiles spill 0.5-10 KB per thread (``python -m fastmtl.kernels.aot``), 32 x 16 ones none
_MAX_DOT_CONVERTED = 16 if INTERPRET else 32
_MAX_TP = 16 if INTERPRET else 32
_MAX_BLOCK_T = 16 if INTERPRET else 32
_DOT_MIN = 16  # tl.dot needs every dimension >= 16 on older Triton/GPUs
# Elementwise path: at most this many BLOCK_TP x BLOCK_T products per column (or BLOCK_TP) -
# registers on a GPU; under the interpreter every loop iteration costs milliseconds of Python,
# so it takes bigger chunks of T (the same code with other block sizes).
_PRODUCTS = 128 if INTERPRET else 8
_MAX_PROGRAMS = 2**31 - 1  # one grid axis; column blocks of >= 64 (the smallest BLOCK_N)
_GPU_CONFIGS = ((64, 4), (64, 8), (128, 4), (128, 8), (256, 4), (256, 8), (512, 8), (1024, 8),
                (2048, 8))
# Elements a thread may hold without spilling, measured with ``kernels.aot`` (sm_80/sm_90):
# tl.dot path, the BLOCK_TP x BLOCK_N accumulator and the BLOCK_T x BLOCK_N tile of G together
# at most 32 (64 x 128 accumulators on 4 warps spilled 80 B; 32 x 256 with converted bf16 tiles
# 3.5 KB); elementwise path, the tile of G at most 16 (fp16 4 x 2048 on 8 warps spilled 24 B).
_DOT_PER_THREAD = 32
_TILE_PER_THREAD = 16
SPILL_BUDGET = {"_project": PTXAS_SPILL_SLACK}  # tiles that do not fit are pruned


def _fits(btp: int, bt: int, use_dot: bool, size: int, bn: int, num_warps: int) -> bool:
    """Whether (BLOCK_TP, BLOCK_T, BLOCK_N) = (btp, bt, bn) on ``num_warps`` warps stays in
    registers (``size``: bytes of an accumulation element)."""
    threads = 32 * num_warps
    if use_dot:
        return (btp + bt) * bn <= _DOT_PER_THREAD * threads
    return (bt * bn <= _TILE_PER_THREAD * threads and btp * bn * size <= 32768
            and btp * bt * bn * size <= 65536)


def _prune(configs, named_args, **kwargs):
    """Keep the configs whose tiles fit in registers (``_fits``)."""
    size = 8 if named_args["g_ptr"].dtype == torch.float64 else 4
    kept = [c for c in configs if _fits(kwargs["BLOCK_TP"], kwargs["BLOCK_T"], kwargs["USE_DOT"],
                                        size, c.kwargs["BLOCK_N"], c.num_warps)]
    return kept or configs[:1]


@autotune(
    gpu=[({"BLOCK_N": bn}, w, 3 if bn <= 256 else 2) for bn, w in _GPU_CONFIGS],
    default=({"BLOCK_N": 64}, 8, 3),  # fits every (BLOCK_TP, BLOCK_T)
    interpret={"BLOCK_N": 256},  # few programs: each costs ~10 ms of Python
    key=["TP", "T", "N"],
    prune=_prune,
)
@triton.jit
def _project(
    c_ptr, g_ptr, p_ptr, TP, T, N, stride_ck, stride_ci, stride_g, stride_p, NUM_TP,
    STEP_C, STEP_G,
    BLOCK_TP: tl.constexpr, BLOCK_T: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    acc_ty = c_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = (pid % NUM_TP) * BLOCK_TP + tl.arange(0, BLOCK_TP)
    cols = (pid // NUM_TP) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_T)
    rmask = rows < TP
    cmask = cols < N
    # Pointers to the first chunk of rows of G (columns of C), moved on by STEP_G / STEP_C =
    # BLOCK_T rows (computed by the launcher: no int32 overflow for long rows).
    c_ptrs = c_ptr + rows[:, None] * stride_ck + ks[None, :] * stride_ci
    g_ptrs = g_ptr + ks.to(tl.int64)[:, None] * stride_g + cols[None, :]
    acc = tl.zeros((BLOCK_TP, BLOCK_N), dtype=acc_ty)
    for i0 in range(0, T, BLOCK_T):
        kmask = ks < T - i0
        c = tl.load(c_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0).to(acc_ty)
        if USE_DOT:
            acc = tl.dot(c, g, acc, input_precision="ieee", out_dtype=acc_ty)
        elif BLOCK_T == 1:
            # an outer product: summed over its axis of 1, Triton rewrites the broadcast
            # product into a tt.dot with TF32 inputs (caught by ``aot``, not the interpreter)
            acc += c * g
        else:
            acc += tl.sum(c[:, :, None] * g[None, :, :], axis=1)
        c_ptrs += STEP_C
        g_ptrs += STEP_G
    out = p_ptr + rows.to(tl.int64)[:, None] * stride_p + cols[None, :]
    tl.store(out, acc.to(p_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _blocks(TP: int, T: int, dtype: torch.dtype) -> tuple[int, int, bool]:
    """(BLOCK_TP, BLOCK_T, USE_DOT): tl.dot when T' and T are >= 16 (not fp64), else
    elementwise products over chunks of BLOCK_T rows with BLOCK_TP x BLOCK_T <= _PRODUCTS."""
    btp, bt = next_power_of_2(TP), next_power_of_2(T)
    if dtype != torch.float64 and btp >= _DOT_MIN and bt >= _DOT_MIN:
        if dtype == torch.float32:
            return min(btp, _MAX_DOT_TP), min(bt, _MAX_BLOCK_T), True
        return min(btp, _MAX_DOT_CONVERTED), min(bt, max(_DOT_MIN, _MAX_DOT_CONVERTED // 2)), True
    btp = min(btp, _MAX_TP)
    return btp, max(1, min(bt, _MAX_BLOCK_T, _PRODUCTS // btp)), False


def launch(C: torch.Tensor, G: torch.Tensor, out: torch.Tensor) -> None:
    """out = C G for C (T', T) in the accumulation dtype (any strides), G (T, N) with unit
    stride along N, out (T', N) with unit stride along N in G's or the accumulation dtype
    (not overlapping G or C)."""
    T, N = G.shape
    TP = C.shape[0]
    check_columns("project", N)
    acc = torch.float64 if G.dtype == torch.float64 else torch.float32
    if C.dtype != acc:
        raise TypeError(f"project kernel: C must be {acc}, got {C.dtype}")
    block_tp, block_t, use_dot = _blocks(TP, T, G.dtype)
    num_tp = cdiv(TP, block_tp)
    if cdiv(N, 64) * num_tp > _MAX_PROGRAMS:
        raise ValueError(f"project: T' = {TP} rows x N = {N} columns is too many programs for "
                         "the Triton kernel's grid")
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]) * num_tp,)
    with device_guard(G):
        _project[grid](
            C, G, out, TP, T, N, C.stride(0), C.stride(1), G.stride(0), out.stride(0), num_tp,
            block_t * C.stride(1), block_t * G.stride(0),
            BLOCK_TP=block_tp, BLOCK_T=block_t, USE_DOT=use_dot,
        )
