"""Small T×T problems on device (they see Gram matrices only, never the model).

- ``min_norm_simplex(K)``: argmin_{w ∈ Δ} wᵀ K w, the MGDA quadratic program.
- ``central_coefficients``: EDM's equiangular (central) direction.
- ``surgery_coefficients``: PCGrad/GradVac sequential projections in coefficient space.
- ``symmetric_eigh``: sync-free eigendecomposition (Aligned-MTL, IMTL-G).
- ``cagrad_simplex``: CAGrad's inner problem on the simplex.
- ``gradient_norms``, ``floor_scales``, ``scaled_gram``: the Gram of normalised gradients.
"""

from fastmtl.solvers.cagrad import cagrad_simplex
from fastmtl.solvers.central import central_coefficients
from fastmtl.solvers.eigh import (
    MAX_SWEEPS,
    kept_eigenvalues,
    symmetric_eigh,
    symmetric_eigh_reference,
)
from fastmtl.solvers.scaling import floor_scales, gradient_norms, scaled_gram
from fastmtl.solvers.simplex import (
    min_norm_simplex,
    min_norm_simplex_exact,
    min_norm_simplex_reference,
)
from fastmtl.solvers.surgery import surgery_coefficients, task_orders

__all__ = [
    "MAX_SWEEPS",
    "cagrad_simplex",
    "kept_eigenvalues",
    "symmetric_eigh",
    "symmetric_eigh_reference",
    "central_coefficients",
    "floor_scales",
    "gradient_norms",
    "min_norm_simplex",
    "min_norm_simplex_exact",
    "min_norm_simplex_reference",
    "scaled_gram",
    "surgery_coefficients",
    "task_orders",
]
