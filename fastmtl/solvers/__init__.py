"""Small T×T problems on device (they see Gram matrices only, never the model).

- ``min_norm_simplex(K)``: argmin_{w ∈ Δ} wᵀ K w, the MGDA quadratic program.
- ``central_coefficients``: EDM's equiangular (central) direction.
- ``surgery_coefficients``: PCGrad/GradVac sequential projections in coefficient space.
- ``symmetric_eigh``: sync-free eigendecomposition (Aligned-MTL, IMTL-G).
- ``cagrad_simplex``: CAGrad's inner problem on the simplex.
- ``dual_cone_projection``/``upgrad_weights``: UPGrad's T non-negative QPs in one batch.
- ``nash_bargaining``: Nash-MTL's Kα = 1/α.
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
from fastmtl.solvers.nash import nash_bargaining, nash_bargaining_exact, nash_bargaining_reference
from fastmtl.solvers.nnqp import (
    dual_cone_projection,
    dual_cone_projection_exact,
    dual_cone_projection_reference,
    upgrad_weights,
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
    "dual_cone_projection",
    "dual_cone_projection_exact",
    "dual_cone_projection_reference",
    "nash_bargaining",
    "nash_bargaining_exact",
    "nash_bargaining_reference",
    "upgrad_weights",
    "floor_scales",
    "gradient_norms",
    "min_norm_simplex",
    "min_norm_simplex_exact",
    "min_norm_simplex_reference",
    "scaled_gram",
    "surgery_coefficients",
    "task_orders",
]
