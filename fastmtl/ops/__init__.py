"""Fused primitives. Each op is one public function whose torch reference is the spec;
the Triton and CUDA implementations take the same arguments and ``fastmtl.backend`` decides.
"""

from fastmtl.ops.adatask import (
    adatask_adagrad_,
    adatask_adam_,
    adatask_reference,
    adatask_rmsprop_,
)
from fastmtl.ops.combine import combine, combine_reference
from fastmtl.ops.gram import gram, gram_reference
from fastmtl.ops.project import project, project_reference
from fastmtl.ops.trial_points import trial_points, trial_points_reference

__all__ = [
    "adatask_adagrad_",
    "adatask_adam_",
    "adatask_reference",
    "adatask_rmsprop_",
    "combine",
    "combine_reference",
    "gram",
    "gram_reference",
    "project",
    "project_reference",
    "trial_points",
    "trial_points_reference",
]
