"""Small T×T problems on device (they see Gram matrices only, never the model).

- ``min_norm_simplex(K)``: argmin_{w ∈ Δ} wᵀ K w, the MGDA quadratic program.
"""

from fastmtl.solvers.simplex import (
    min_norm_simplex,
    min_norm_simplex_exact,
    min_norm_simplex_reference,
)

__all__ = ["min_norm_simplex", "min_norm_simplex_exact", "min_norm_simplex_reference"]
