r"""Rescaled Gram matrices: the Gram of the scaled gradients ĝ_i = g_i / D_ii.

Methods that work on normalised gradients (MGDA's "l2"/"loss"/"loss+", EDM, IMTL-G, CDTT)
need K̃ = D⁻¹ K D⁻¹ for a positive diagonal D (gradient norms ‖g_i‖ = √K_ii, losses, ...),
and must not produce NaN for a zero gradient or a zero loss. These helpers keep that in one
place, with no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["floor_scales", "gradient_norms", "scaled_gram"]


def gradient_norms(K: Tensor) -> Tensor:
    """‖g_i‖ = √K_ii (negative rounding noise on the diagonal clamped to 0)."""
    return K.diagonal().clamp_min(0.0).sqrt()


def floor_scales(D: Tensor, eps: float) -> Tensor:
    """D with every entry floored at ``eps`` · max_j D_j (all ones when D is all zero), so
    1/D is finite: a zero gradient (or loss) gets a large but finite scale."""
    top = D.max()
    return torch.where(top > 0, torch.maximum(D, eps * top), torch.ones_like(D))


def scaled_gram(K: Tensor, D: Tensor) -> Tensor:
    """(min D)² · D⁻¹ K D⁻¹: the Gram of the scaled gradients up to a positive factor chosen so
    that no entry can overflow (the factor cancels in scale-free problems such as the simplex
    min-norm point). D must be positive (see ``floor_scales``)."""
    r = D.min() / D
    return K * r[:, None] * r[None, :]
