"""The "vmap" engine: one batched backward pass for all T tasks.

With L = (L_1, ..., L_T) stacked and the identity I_T as T batched output gradients,

    torch.autograd.grad(L, θ_sh + θ_other, grad_outputs=I_T, is_grads_batched=True)

returns, for every input x, the (T, *x.shape) tensor whose row i is ∇_x L_i (one backward pass
vectorised over the rows of I_T with ``torch.vmap``). The shared rows are copied into the buffer
(one copy per parameter); every other leaf of the losses' graph (found by ``graph.task_masks``,
which also gives the per-task ``reached`` mask) gets ``x.grad += Σ_i ∇_x L_i``, as
``sum(losses).backward()`` would.

Differences from a real backward pass: autograd.grad fills no ``.grad`` by itself, so
``retain_grad()`` tensors and post-accumulate-grad hooks of non-shared leaves see nothing,
and tensor hooks run on batched gradients. An op without a batching rule that torch cannot
fall back on raises ``VmapUnsupportedError``: use ``engine="loop"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastmtl.engine.buffer import ParamGroup
from fastmtl.engine.graph import task_masks

__all__ = ["VmapUnsupportedError", "vmap_compute"]


class VmapUnsupportedError(RuntimeError):
    """The batched backward pass failed (an op in the graph cannot be vmapped)."""


def vmap_compute(params: Sequence[Tensor], groups: Sequence[ParamGroup],
                 losses: Sequence[Tensor], retain_graph: bool = False) -> list[list[bool]]:
    """Fill the groups' buffers with one batched backward pass; returns reached[i][k]."""
    T, P = len(losses), len(params)
    leaves, _ = task_masks(losses)
    index = {id(p): k for k, p in enumerate(params)}
    masks = [0] * P
    others: list[Tensor] = []
    for leaf, mask in leaves:
        k = index.get(id(leaf))
        if k is None:
            others.append(leaf)
        else:
            masks[k] = mask
    stacked = torch.stack(list(losses))
    eye = torch.eye(T, dtype=stacked.dtype, device=stacked.device)
    try:
        grads = torch.autograd.grad(stacked, list(params) + others, grad_outputs=eye,
                                    is_grads_batched=True, allow_unused=True,
                                    retain_graph=retain_graph)
    except RuntimeError as exc:
        raise VmapUnsupportedError(
            f"engine='vmap': the batched backward pass over the {T} tasks failed ({exc}). "
            "Some operation in the graph has no vmap batching rule (or its backward reads "
            "values, e.g. .item()); use engine='loop' instead.") from exc
    with torch.no_grad():
        for g in groups:
            for j, k in enumerate(g.indices):
                grad = grads[k]
                if grad is None:
                    g.views[j].zero_()
                    masks[k] = 0
                else:
                    g.views[j].copy_(grad)
        for leaf, grad in zip(others, grads[P:]):
            if grad is None:
                continue
            total = grad.sum(0)
            if leaf.grad is None:
                leaf.grad = total
            else:
                leaf.grad.add_(total)
    return [[bool(masks[k] >> i & 1) for k in range(P)] for i in range(T)]
