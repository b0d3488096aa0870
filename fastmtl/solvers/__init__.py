"""Small T×T problems on device (they see Gram matrices only, never the model).

- ``min_norm_simplex(K)``: argmin_{w ∈ Δ} wᵀ K w, the MGDA quadratic program.
- ``gradient_norms``, ``floor_scales``, ``scaled_gram``: the Gram of normalised gradients.
"""

from fastmtl.solvers.scaling import floor_scales, gradient_norms, scaled_gram
from fastmtl.solvers.simplex import (
    min_norm_simplex,
    min_norm_simplex_exact,
    min_norm_simplex_reference,
)

__all__ = [
    "floor_scales",
    "gradient_norms",
    "min_norm_simplex",
    "min_norm_simplex_exact",
    "min_norm_simplex_reference",
    "scaled_gram",
]
