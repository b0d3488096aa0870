"""Combination of per-task gradients: d = Gᵀ w, d_j = Σ_i w_i G_ij.

``combine(w, G, out=None, accumulate=False)`` for G (T, N) and w (T,) returns d (N,) in G's
dtype, accumulated in float32 (float64 for float64 G). With ``out=`` (shape (N,), G's dtype or
the accumulation dtype) the result is written there instead, e.g. into a flat buffer whose
slices are the shared parameters' ``.grad``; ``accumulate=True`` adds to ``out`` instead
(``out += Gᵀ w``). The ``out=`` form is not differentiable, like torch's ``out=``.

Gradient (functional form): dw = G dd (a Gram-shaped reduction over N), dG = w ⊗ dd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmtl.ops._common import (
    acc_dtype,
    check_coefficients,
    check_matrix,
    check_out,
    kernel,
    select,
)

__all__ = ["combine", "combine_reference"]


def combine_reference(
    w: Tensor, G: Tensor, out: Tensor | None = None, accumulate: bool = False
) -> Tensor:
    """d = Gᵀ w in the accumulation dtype, cast to G's dtype (or written into ``out``)."""
    acc = acc_dtype(G.dtype)
    Gt, wa = G.to(acc).mT, w.to(acc)  # torch.mv: a (1, T) @ (T, N) matmul is ~30x slower on CPU
    if out is None:
        return torch.mv(Gt, wa).to(G.dtype)
    if out.dtype == acc:
        return out.addmv_(Gt, wa) if accumulate else torch.mv(Gt, wa, out=out)
    d = torch.mv(Gt, wa)
    if accumulate:
        d += out.to(acc)
    return out.copy_(d)


@torch.library.custom_op("fastmtl::combine", mutates_args=())
def _combine_kernel(w: Tensor, G: Tensor, backend: str) -> Tensor:
    out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
    kernel("combine", backend)(w.to(acc_dtype(G.dtype)), G, out, False)
    return out


@_combine_kernel.register_fake
def _(w: Tensor, G: Tensor, backend: str) -> Tensor:
    return G.new_empty((G.shape[1],))


@torch.library.custom_op("fastmtl::combine_out", mutates_args=("out",))
def _combine_out_kernel(w: Tensor, G: Tensor, out: Tensor, accumulate: bool, backend: str) -> None:
    kernel("combine", backend)(w.to(acc_dtype(G.dtype)), G, out, accumulate)


@_combine_out_kernel.register_fake
def _(w: Tensor, G: Tensor, out: Tensor, accumulate: bool, backend: str) -> None:
    return None


def _setup_context(ctx, inputs, output) -> None:
    w, G, _ = inputs
    ctx.save_for_backward(w, G)


def _backward(ctx, dd: Tensor):
    w, G = ctx.saved_tensors
    acc = acc_dtype(G.dtype)
    dw = dG = None
    if ctx.needs_input_grad[0]:
        dw = (G.to(acc) @ dd.to(acc)).to(w.dtype)
    if ctx.needs_input_grad[1]:
        dG = torch.outer(w.to(acc), dd.to(acc)).to(G.dtype)
    return dw, dG, None


_combine_kernel.register_autograd(_backward, setup_context=_setup_context)


class _CombineReference(torch.autograd.Function):
    """The torch path with the same backward as the kernels: dG = w ⊗ dd laid out like G
    (autograd of ``torch.mv(G.mT, w)`` would hand back a transposed dG, copied into ``.grad``)."""

    @staticmethod
    def forward(ctx, w: Tensor, G: Tensor) -> Tensor:
        ctx.save_for_backward(w, G)
        return combine_reference(w, G)

    @staticmethod
    def backward(ctx, dd: Tensor):
        return _backward(ctx, dd)[:2]


def combine(
    w: Tensor, G: Tensor, out: Tensor | None = None, *, accumulate: bool = False
) -> Tensor:
    """d = Gᵀ w for G (T, N) and w (T,): the weighted sum of the rows of G, shape (N,).

    ``w`` must be on G's device with G's dtype or the accumulation dtype (float32, or float64
    for float64 G); anything else is a ``TypeError``/``ValueError`` naming the problem.
    ``out``: write the result there (``accumulate=True``: add to it) and return it.
    """
    G = check_matrix(G, "combine")
    w = check_coefficients("combine", w, G)
    backend = select(G)
    if out is not None:
        out = check_out("combine", out, G, (G.shape[1],))
        if torch.is_grad_enabled() and (w.requires_grad or G.requires_grad):
            raise RuntimeError("combine: out= does not support autograd; call it without out= "
                               "or under torch.no_grad()")
        if backend == "torch":
            return combine_reference(w, G, out, accumulate)
        _combine_out_kernel(w, G, out, accumulate, backend)
        return out
    if accumulate:
        raise ValueError("combine: accumulate=True needs out=")
    if backend == "torch":
        if torch.is_grad_enabled() and (w.requires_grad or G.requires_grad):
            return _CombineReference.apply(w, G)
        return combine_reference(w, G)
    return _combine_kernel(w, G, backend)
