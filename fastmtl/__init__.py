"""fastmtl: fused GPU kernels for multi-task-learning optimizers in PyTorch.

The pipeline: per-task gradients (``engine``) -> Gram matrix (``ops.gram``) -> weights
(``aggregators``) -> direction written into ``.grad`` (``ops.combine``).
"""

__version__ = "0.1.0"

from fastmtl import (  # noqa: E402
    aggregators,
    backend,
    diagnostics,
    engine,
    linesearch,
    ops,
    optim,
    pamal,
    solvers,
    weighting,
)
from fastmtl.backward import mtl_backward  # noqa: E402

__all__ = ["__version__", "aggregators", "backend", "diagnostics", "engine", "linesearch",
           "mtl_backward", "ops", "optim", "pamal", "solvers", "weighting"]
