"""Kernels with the defects ``fastmtl.kernels.aot`` must catch (for ``test_aot.py``)."""

import torch
import triton
import triton.language as tl

SPILL_BUDGET = {"_huge_tile": 0}


@triton.jit
def _tf32_dot(a_ptr, b_ptr, c_ptr, B: tl.constexpr):
    r = tl.arange(0, B)
    a = tl.load(a_ptr + r[:, None] * B + r[None, :])
    b = tl.load(b_ptr + r[:, None] * B + r[None, :])
    tl.store(c_ptr + r[:, None] * B + r[None, :], tl.dot(a, b))  # TF32 by default


@triton.jit
def _huge_tile(a_ptr, c_ptr, B: tl.constexpr):
    r = tl.arange(0, B)
    a = tl.load(a_ptr + r[:, None] * B + r[None, :])
    b = tl.load(a_ptr + B * B + r[:, None] * B + r[None, :])
    tl.store(c_ptr + r[None, :] * B + r[:, None], a * b + tl.trans(a))  # 3 live B x B tiles


@triton.jit
def _does_not_compile(a_ptr, B: tl.constexpr):
    r = tl.arange(0, B)
    a = tl.load(a_ptr + r[:, None] * B + r[None, :])
    tl.store(a_ptr + r, tl.dot(a, a))  # a (B, B) value stored through (B,) pointers


def launch_tf32():
    a = torch.empty(32, 32)
    _tf32_dot[(1,)](a, a, a, B=32)


def launch_huge_tile():
    a = torch.empty(2, 64, 64)
    _huge_tile[(1,)](a, a, B=64, num_warps=1)


def launch_does_not_compile():
    a = torch.empty(32, 32)
    _does_not_compile[(1,)](a, B=32)
