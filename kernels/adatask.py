r"""Triton kernel of ``fm.ops.adatask_{adam,rmsprop,adagrad}_``: one multi-tensor launch.

One launch updates every tensor of a list (one device, one parameter dtype, one state dtype).
Program j owns BLOCK elements of one parameter p (a host-built table maps j to (tensor,
offset)); the tensors are reached through a table of raw addresses, so no per-tensor launch
and no copy into a flat buffer. For its block the program reads θ once, then for each task k
the task gradient g_k and the task's moments, updates the moments in place and accumulates
the task's preconditioned step, and writes θ once:

.. math::

    \theta \leftarrow \theta\,(1 - \eta\lambda)_{\text{decoupled}}
        - \sum_{k\ \text{active}} u_k(g_k + \tfrac{\lambda}{T}\theta_{\text{coupled}}),

with u_k Adam's m̂_k/(√v̂_k + ε)·η (ALGO 0), RMSprop's η g_k/(√v_k + ε) (ALGO 1) or Adagrad's
η_t g_k/(√s_k + ε) (ALGO 2); the spec is ``fastmtl.ops.adatask.adatask_reference``. Task k's
step counter (float32, on the device, already incremented by the launcher for active tasks)
gives its bias corrections, computed in float64 (1 − β^t cancels in float32). Every scalar
hyperparameter arrives as a float32 pair (hi + lo, Triton passes Python floats as float32) and
is rebuilt in float64, so float64 parameters get float64 hyperparameters. Arithmetic on the
elements is float32 (float64 for float64 parameters), whatever the storage dtype of the
moments (e.g. bfloat16).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from fastmtl.kernels._tables import launch_tables
from fastmtl.kernels._utils import INTERPRET, device_guard

__all__ = ["launch"]

_BLOCK = 64 if INTERPRET else 1024
_NUM_WARPS = 4
# Register spills per thread accepted (spill bytes, ``kernels.aot``):
# 8-12 B (a value or two of the fp64 bias corrections) in some amsgrad/maximize/fp64 variants.
SPILL_BUDGET = {"_adatask_kernel": 32}


@triton.jit
def _f64(hi, lo):
    """hi + lo in float64 (a float64 scalar passed as two float32 values)."""
    return tl.sum(tl.zeros((1,), dtype=tl.float64) + hi, axis=0) + lo


@triton.jit
def _adatask_kernel(ptrs, sizes, blocks, active_ptr, p_like, g_like, s_like, T, P,
                    lr_hi, lr_lo, wd_hi, wd_lo, eps_hi, eps_lo, a_hi, a_lo, b_hi, b_lo,
                    dec_hi, dec_lo,
                    ALGO: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                    COUPLED: tl.constexpr, DECOUPLED: tl.constexpr, HAS_ACTIVE: tl.constexpr,
                    CDT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.load(blocks + 2 * pid).to(tl.int64)
    start = tl.load(blocks + 2 * pid + 1).to(tl.int64)
    n = tl.load(sizes + i)
    g_stride = tl.load(sizes + P + i)
    p_ptr = tl.load(ptrs + i).to(tl.pointer_type(p_like.dtype.element_ty))
    g_ptr = tl.load(ptrs + P + i).to(tl.pointer_type(g_like.dtype.element_ty))
    m_ptr = tl.load(ptrs + 2 * P + i).to(tl.pointer_type(s_like.dtype.element_ty))
    v_ptr = tl.load(ptrs + 3 * P + i).to(tl.pointer_type(s_like.dtype.element_ty))
    x_ptr = tl.load(ptrs + 4 * P + i).to(tl.pointer_type(s_like.dtype.element_ty))
    t_ptr = tl.load(ptrs + 5 * P + i).to(tl.pointer_type(tl.float32))
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n

    lr = _f64(lr_hi, lr_lo)
    wd = _f64(wd_hi, wd_lo)
    eps = _f64(eps_hi, eps_lo).to(CDT)
    a = _f64(a_hi, a_lo)  # β1 (Adam) or α (RMSprop)
    b = _f64(b_hi, b_lo)  # β2 (Adam)
    lr_decay = _f64(dec_hi, dec_lo)
    theta = tl.load(p_ptr + offs, mask=mask, other=0.0).to(CDT)
    new = theta
    if DECOUPLED:
        new = theta * (1.0 - lr * wd).to(CDT)
    for k in range(T):
        act = 1
        if HAS_ACTIVE:
            act = tl.load(active_ptr + i * T + k)
        if act != 0:
            g = tl.load(g_ptr + k * g_stride + offs, mask=mask, other=0.0).to(CDT)
            if MAXIMIZE:
                g = -g
            if COUPLED:
                g = g + (wd / T).to(CDT) * theta
            step = tl.load(t_ptr + k).to(tl.float64)
            mv = k * n + offs
            if ALGO == 0:  # Adam
                m = tl.load(m_ptr + mv, mask=mask, other=0.0).to(CDT)
                v = tl.load(v_ptr + mv, mask=mask, other=0.0).to(CDT)
                w1 = 1.0 - a
                if w1 < 0.5:  # torch.lerp's two formulas
                    m = m + w1.to(CDT) * (g - m)
                else:
                    m = g - (g - m) * a.to(CDT)
                v = v * b.to(CDT) + (1.0 - b).to(CDT) * (g * g)
                tl.store(m_ptr + mv, m.to(s_like.dtype.element_ty), mask=mask)
                tl.store(v_ptr + mv, v.to(s_like.dtype.element_ty), mask=mask)
                bc1 = 1.0 - tl.exp(step * tl.log(a))
                bc2 = 1.0 - tl.exp(step * tl.log(b))
                if AMSGRAD:
                    vmax = tl.maximum(tl.load(x_ptr + mv, mask=mask, other=0.0).to(CDT), v)
                    tl.store(x_ptr + mv, vmax.to(s_like.dtype.element_ty), mask=mask)
                    v = vmax
                denom = tl.sqrt(v) / tl.sqrt(bc2).to(CDT) + eps
                new = new - (lr / bc1).to(CDT) * (m / denom)
            elif ALGO == 1:  # RMSprop
                v = tl.load(v_ptr + mv, mask=mask, other=0.0).to(CDT)
                v = v * a.to(CDT) + (1.0 - a).to(CDT) * (g * g)
                tl.store(v_ptr + mv, v.to(s_like.dtype.element_ty), mask=mask)
                new = new - lr.to(CDT) * (g / (tl.sqrt(v) + eps))
            else:  # Adagrad
                v = tl.load(v_ptr + mv, mask=mask, other=0.0).to(CDT)
                v = v + g * g
                tl.store(v_ptr + mv, v.to(s_like.dtype.element_ty), mask=mask)
                clr = lr / (1.0 + (step - 1.0) * lr_decay)
                new = new - clr.to(CDT) * (g / (tl.sqrt(v) + eps))
    tl.store(p_ptr + offs, new.to(p_like.dtype.element_ty), mask=mask)


def _split(x: float) -> tuple[float, float]:
    """x = hi + lo, both float32 values (Triton passes Python floats as float32)."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def launch(algo: int, params, grads, exp_avgs, exp_avg_sqs, maxes, steps, active, *, lr: float,
           weight_decay: float, eps: float, a: float, b: float, lr_decay: float,
           amsgrad: bool, maximize: bool, decoupled: bool) -> None:
    """One launch over validated lists (see ``fastmtl.ops.adatask``): params (P tensors),
    grads (T, n) with unit column stride, moments (T, n) contiguous, steps (T,) float32
    (already incremented), ``active`` None or a (P, T) int8 device tensor; ``maxes`` the
    amsgrad buffers or the second moments again."""
    T = grads[0].shape[0]
    ptrs, sizes, blocks = launch_tables(params, grads, exp_avgs, exp_avg_sqs, maxes, steps,
                                         _BLOCK)
    if blocks.shape[0] == 0:
        return
    cdt = tl.float64 if params[0].dtype == torch.float64 else tl.float32
    coupled = weight_decay != 0 and not decoupled
    grid = (blocks.shape[0],)
    with device_guard(params[0]):
        _adatask_kernel[grid](
            ptrs, sizes, blocks, active if active is not None else sizes, params[0], grads[0],
            exp_avg_sqs[0], T, len(params), *_split(lr), *_split(weight_decay), *_split(eps),
            *_split(a), *_split(b), *_split(lr_decay), ALGO=algo, AMSGRAD=amsgrad,
            MAXIMIZE=maximize, COUPLED=coupled, DECOUPLED=decoupled and weight_decay != 0,
            HAS_ACTIVE=active is not None, CDT=cdt, BLOCK=_BLOCK, num_warps=_NUM_WARPS)

