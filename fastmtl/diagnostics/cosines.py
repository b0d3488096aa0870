r"""Pairwise task cosines from a Gram matrix K = G Gᵀ (T, T) of per-task gradients.

.. math::

    C_{ij} = \frac{K_{ij}}{\sqrt{K_{ii}}\sqrt{K_{jj}}} = \cos(g_i, g_j)

K comes from ``fm.ops.gram(G)`` or ``TaskGradients(...).compute(losses).gram()``; no (T, N)
matrix is needed. Conventions:

- A zero row (K_ii <= 0: a task with a zero gradient, or a negative diagonal from rounding) has
  cosine 0 with every other task and 1 with itself: C is never NaN for a finite K.
- C_ii = 1 exactly, and off-diagonal values are clamped to [−1, 1] (rounding can leave
  |K_ij| slightly above √(K_ii K_jj)). Non-finite entries of K stay non-finite off the diagonal.
- Computed in float32 (float64 for a float64 K), on K's device, without host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmtl.ops._common import acc_dtype
from fastmtl.solvers._common import check_square

__all__ = ["conflict_fraction", "pairwise_cosines"]


def pairwise_cosines(K: Tensor) -> Tensor:
    """(T, T) cosines between the tasks' gradients from their Gram matrix K (module docstring)."""
    K = check_square(K, who="pairwise_cosines")
    K = K.to(acc_dtype(K.dtype))
    norms = K.diagonal().clamp_min(0).sqrt()
    ok = (norms > 0).unsqueeze(1) & (norms > 0).unsqueeze(0)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    C = (K / safe.unsqueeze(1) / safe.unsqueeze(0)).clamp(-1, 1)
    C = torch.where(ok, C, torch.zeros_like(C))
    eye = torch.eye(K.shape[0], dtype=torch.bool, device=K.device)
    return torch.where(eye, torch.ones_like(C), C)


def conflict_fraction(K: Tensor) -> Tensor:
    """The share of the T(T−1)/2 task pairs whose gradients conflict (cosine < 0), a 0-dim
    tensor in ``pairwise_cosines``' dtype; 0 for T = 1 (no pairs). Zero rows conflict with
    nothing."""
    C = pairwise_cosines(K)
    T = C.shape[0]
    if T == 1:
        return torch.zeros((), dtype=C.dtype, device=C.device)
    upper = torch.ones(T, T, dtype=torch.bool, device=C.device).triu(1)
    return ((C < 0) & upper).sum().to(C.dtype) / (T * (T - 1) / 2)
