"""Projection of per-task gradients: P = C G, P_kn = Σ_i C_ki G_in.

``project(C, G, out=None)`` for G (T, N) and a coefficient matrix C (T', T) returns P (T', N) in
G's dtype, accumulated in float32 (float64 for float64 G), in one pass over G: each column block
of G is read once and all T' output rows are produced from it (T' = 1 is ``combine``; PCGrad and
GradVac hand back their projected per-task gradients with T' = T; gram's backward has this
shape). With ``out=`` (shape (T', N), contiguous, G's dtype or the accumulation dtype; it must
not overlap G or C) the result is written there instead; that form is not differentiable, like
torch's ``out=``.

Gradient (functional form): dC = dP Gᵀ (a Gram-shaped reduction over N, in the accumulation
dtype), dG = Cᵀ dP (itself a ``project``, so the result is differentiable twice).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmtl.ops._common import (
    acc_dtype,
    check_coefficient_matrix,
    check_matrix,
    check_out,
    kernel,
    select,
)

__all__ = ["project", "project_reference"]


def project_reference(C: Tensor, G: Tensor, out: Tensor | None = None) -> Tensor:
    """P = C G in the accumulation dtype, cast to G's dtype (or written into ``out``)."""
    acc = acc_dtype(G.dtype)
    Ca, Ga = C.to(acc), G.to(acc)
    if out is None:
        return (Ca @ Ga).to(G.dtype)
    if out.dtype == acc:
        return torch.mm(Ca, Ga, out=out)
    return out.copy_(Ca @ Ga)


@torch.library.custom_op("fastmtl::project", mutates_args=())
def _project_kernel(C: Tensor, G: Tensor, backend: str) -> Tensor:
    out = torch.empty((C.shape[0], G.shape[1]), dtype=G.dtype, device=G.device)
    kernel("project", backend)(C.to(acc_dtype(G.dtype)), G, out)
    return out


@_project_kernel.register_fake
def _(C: Tensor, G: Tensor, backend: str) -> Tensor:
    return G.new_empty((C.shape[0], G.shape[1]))


@torch.library.custom_op("fastmtl::project_out", mutates_args=("out",))
def _project_out_kernel(C: Tensor, G: Tensor, out: Tensor, backend: str) -> None:
    kernel("project", backend)(C.to(acc_dtype(G.dtype)), G, out)


@_project_out_kernel.register_fake
def _(C: Tensor, G: Tensor, out: Tensor, backend: str) -> None:
    return None


def _setup_context(ctx, inputs, output) -> None:
    C, G, backend = inputs
    ctx.save_for_backward(C, G)
    ctx.backend = backend


def _backward(ctx, dP: Tensor):
    C, G = ctx.saved_tensors
    dC = dG = None
    if ctx.needs_input_grad[0]:
        acc = acc_dtype(G.dtype)
        dC = (dP.to(acc) @ G.to(acc).mT).to(C.dtype)
    if ctx.needs_input_grad[1]:  # dG = Cᵀ dP: one more pass of the kernel, dP in G's dtype
        dG = _project_kernel(C.mT, check_matrix(dP.to(G.dtype), "project"), ctx.backend)
    return dC, dG, None


_project_kernel.register_autograd(_backward, setup_context=_setup_context)


def project(C: Tensor, G: Tensor, out: Tensor | None = None) -> Tensor:
    """P = C G for G (T, N) and C (T', T): T' combinations of the rows of G, shape (T', N).

    ``C`` must be on G's device with G's dtype or the accumulation dtype (float32, or float64
    for float64 G); anything else is a ``TypeError``/``ValueError`` naming the problem.
    ``out``: write the result there and return it (not differentiable; must not overlap G).
    """
    G = check_matrix(G, "project")
    C = check_coefficient_matrix("project", C, G)
    backend = select(G)
    shape = (C.shape[0], G.shape[1])
    if out is not None:
        out = check_out("project", out, G, shape)
        if torch.is_grad_enabled() and (C.requires_grad or G.requires_grad):
            raise RuntimeError("project: out= does not support autograd; call it without out= "
                               "or under torch.no_grad()")
        if backend == "torch":
            return project_reference(C, G, out)
        _project_out_kernel(C, G, out, backend)
        return out
    if backend == "torch":
        return project_reference(C, G)
    return _project_kernel(C, G, backend)
