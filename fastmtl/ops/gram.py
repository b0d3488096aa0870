"""Gram matrix of per-task gradients: K = G Gᵀ, K_ij = <g_i, g_j>.

``gram(G)`` for G of shape (T, N) returns K of shape (T, T) in float32 (float64 when G is
float64); bf16/fp16 inputs are accumulated in float32. The torch reference below is the spec;
the Triton kernel (``kernels/gram.py``) and the CUDA kernel (``csrc/gram.cu``) compute the same
sum over N in split-N partial Grams reduced in a fixed order (deterministic, no atomics).

Gradient: dG = (dK + dKᵀ) G, a ``project``-shaped op; registered for every backend, so the
result is differentiable (also twice, since the backward is built from torch ops).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmtl.ops._common import acc_dtype, check_matrix, kernel, select

__all__ = ["gram", "gram_reference"]


# Columns per partial Gram of the reference: K = Σ_c G_c G_cᵀ over chunks of N, one batched
# matmul. BLAS on the whole (T, N) product streams N through a T-wide panel: at T = 10,
# N = 0.8M it took 9.7 ms on 2 CPU cores against 3.0 ms chunked (and its error grows with N).
_CHUNK = 16384


def gram_reference(G: Tensor) -> Tensor:
    """K = G Gᵀ in the accumulation dtype (the spec and the CPU path), exactly symmetric:
    partial Grams of ``_CHUNK``-column chunks of N (one batched matmul), summed in order,
    then the remaining columns."""
    A = G.to(acc_dtype(G.dtype))
    T, N = A.shape
    C = N // _CHUNK
    K = A.new_zeros(T, T)
    if C > 1:
        X = A[:, :C * _CHUNK].unflatten(1, (C, _CHUNK)).transpose(0, 1)  # (C, T, chunk)
        K = torch.bmm(X, X.mT).sum(0)
        A = A[:, C * _CHUNK:]
    if A.shape[1] > 0:
        K = K + A @ A.mT
    # BLAS need not give K_ij and K_ji bit for bit: mirror the upper triangle
    return K.triu() + K.triu(1).mT


@torch.library.custom_op("fastmtl::gram", mutates_args=())
def _gram_kernel(G: Tensor, backend: str) -> Tensor:
    return kernel("gram", backend)(G)


@_gram_kernel.register_fake
def _(G: Tensor, backend: str) -> Tensor:
    return G.new_empty((G.shape[0], G.shape[0]), dtype=acc_dtype(G.dtype))


def _setup_context(ctx, inputs, output) -> None:
    G, _ = inputs
    ctx.save_for_backward(G)


def _backward(ctx, dK: Tensor):
    (G,) = ctx.saved_tensors
    S = dK + dK.mT
    dG = S @ G.to(S.dtype)
    return dG.to(G.dtype), None


_gram_kernel.register_autograd(_backward, setup_context=_setup_context)


def gram(G: Tensor) -> Tensor:
    """Gram matrix K = G Gᵀ of the rows of G (T, N): (T, T), float32 (float64 for float64 G).

    Raises ``TypeError``/``ValueError`` for a non-tensor, a non-floating tensor, or a tensor that
    is not 2-D with T, N >= 1. Rows must be unit-stride along N (else one copy is made).
    """
    G = check_matrix(G, "gram")
    backend = select(G)
    if backend == "torch":
        return gram_reference(G)
    return _gram_kernel(G, backend)
