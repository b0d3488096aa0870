r"""Triton kernel of ``fm.ops.trial_points``: Z_k = z − t_k d for k < K.

.. math::

    Z_{kn} = z_n - t_k d_n

One program per block of BLOCK_N elements loads its block of z and d once (converted to the
accumulation dtype: fp32, fp64 for fp64 inputs) and writes the K output rows from registers,
so z and d are read once and Z written once: (2 + K)·N elements moved instead of 3·K·N for K
separate ``z - t * d``. Every output element depends on its own inputs only (no reduction):
results are deterministic and independent of the block size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastmtl.kernels._utils import autotune, cdiv, check_columns, device_guard

__all__ = ["launch"]


@autotune(
    gpu=[({"BLOCK_N": bn}, w, 2) for bn, w in ((512, 4), (1024, 4), (2048, 8), (4096, 8))],
    default=({"BLOCK_N": 1024}, 4, 2),
    interpret={"BLOCK_N": 64},
    key=["K", "N"],
)
@triton.jit
def _trial_points(z_ptr, d_ptr, t_ptr, out_ptr, K, N, BLOCK_N: tl.constexpr):
    acc_ty = t_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    z = tl.load(z_ptr + cols, mask=mask, other=0.0).to(acc_ty)
    d = tl.load(d_ptr + cols, mask=mask, other=0.0).to(acc_ty)
    out_row = out_ptr + cols  # pointers are 64-bit: row k starts at out_ptr + k·N, no overflow
    for k in range(0, K):
        t = tl.load(t_ptr + k)
        tl.store(out_row, (z - t * d).to(out_ptr.dtype.element_ty), mask=mask)
        out_row += N


def launch(z: torch.Tensor, d: torch.Tensor, steps: torch.Tensor, out: torch.Tensor) -> None:
    """out[k] = z − steps[k]·d for contiguous 1-D z, d (N,) of one dtype, steps (K,) in the
    accumulation dtype, out (K, N) contiguous in z's dtype."""
    N = z.numel()
    K = steps.shape[0]
    check_columns("trial_points", N)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    if steps.dtype != acc:
        raise TypeError(f"trial_points kernel: steps must be {acc}, got {steps.dtype}")
    steps = steps.contiguous()
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]),)
    with device_guard(z):
        _trial_points[grid](z, d, steps, out, K, N)
