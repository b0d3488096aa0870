"""The "loop" engine: T backward passes that accumulate in place into the rows of the buffer.

Before the backward pass of task i, every shared parameter p_k gets ``p_k.grad = rows[i][k]``
(a view of the zeroed row i of its group's buffer). Without ``create_graph`` autograd's
AccumulateGrad adds into an existing ``.grad`` in place, so

    G[i, o_k : o_k + n_k] += vec(∇_{p_k} L_i)            (into zeros: no copy, no allocation)

while every other leaf (the heads) accumulates Σ_i ∇ L_i into its own ``.grad``, exactly as
``sum(losses).backward()`` would. The shared parameters' own ``.grad`` is saved first and put
back afterwards. A post-accumulate-grad hook, registered for the duration of the call, marks
the (task, parameter) pairs that received a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastmtl.engine.buffer import ParamGroup

__all__ = ["loop_compute"]


def loop_compute(params: Sequence[Tensor], groups: Sequence[ParamGroup],
                 losses: Sequence[Tensor]) -> list[list[bool]]:
    """Fill the groups' buffers with ∇_{θ_sh} L_i row by row; returns reached[i][k]."""
    T, P = len(losses), len(params)
    rows: list[list[Tensor | None]] = [[None] * P for _ in range(T)]
    for g in groups:
        g.buffer.zero_()
        for i in range(T):
            for j, k in enumerate(g.indices):
                rows[i][k] = g.rows[i][j]
    reached = [[False] * P for _ in range(T)]
    task = [0]

    def marker(k: int):
        def hook(_: Tensor) -> None:
            reached[task[0]][k] = True
        return hook

    saved = [p.grad for p in params]
    handles = [p.register_post_accumulate_grad_hook(marker(k)) for k, p in enumerate(params)]
    try:
        for i, loss in enumerate(losses):
            task[0] = i
            for k, p in enumerate(params):
                p.grad = rows[i][k]
            torch.autograd.backward(loss, retain_graph=i < T - 1)
            for k, p in enumerate(params):
                row = rows[i][k]
                if p.grad is not None and p.grad is not row:  # .grad replaced: copy it
                    with torch.no_grad():
                        row.copy_(p.grad)
    finally:
        for h in handles:
            h.remove()
        for p, grad in zip(params, saved):
            p.grad = grad
    return reached
