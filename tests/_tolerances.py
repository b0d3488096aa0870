"""Error measures used by the op tests, all against a float64 reference.

Elementwise relative error is meaningless where a value is a cancellation of large terms
(an off-diagonal Gram entry, a combination of opposing gradients), so each entry's error is
scaled by the magnitude of the terms that were summed (Cauchy–Schwarz / triangle bounds).
"""

from __future__ import annotations

import torch

# fp32 < 1e-5 (1e-3 where TF32 or tl.dot is used); fp64 tight; half inputs are rounded once
# on input and accumulate in fp32, outputs rounded to their dtype.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def gram_error(K: torch.Tensor, G: torch.Tensor) -> float:
    """max_ij |K_ij - <g_i, g_j>| / (||g_i|| ||g_j||), reference in float64 on G as given."""
    G64 = G.double()
    ref = G64 @ G64.T
    n = G64.norm(dim=1)
    scale = torch.outer(n, n).clamp_min(torch.finfo(torch.float64).tiny)
    return ((K.double() - ref).abs() / scale).max().item()


def combine_error(d: torch.Tensor, w: torch.Tensor, G: torch.Tensor) -> float:
    """max_j |d_j - Σ_i w_i G_ij| / Σ_i |w_i G_ij| (with a floor for all-zero columns)."""
    G64, w64 = G.double(), w.double()
    ref = w64 @ G64
    scale = (w64.abs() @ G64.abs()).clamp_min(torch.finfo(torch.float64).tiny)
    return ((d.double() - ref).abs() / scale).max().item()


def project_error(P: torch.Tensor, C: torch.Tensor, G: torch.Tensor) -> float:
    """max_kn |P_kn - Σ_i C_ki G_in| / Σ_i |C_ki G_in| (with a floor for all-zero sums)."""
    G64, C64 = G.double(), C.double()
    ref = C64 @ G64
    scale = (C64.abs() @ G64.abs()).clamp_min(torch.finfo(torch.float64).tiny)
    return ((P.double() - ref).abs() / scale).max().item()
