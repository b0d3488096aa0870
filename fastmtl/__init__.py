"""fastmtl: fused GPU kernels for multi-task-learning optimizers in PyTorch.

The pipeline: per-task gradients (``engine``) -> Gram matrix (``ops.gram``) -> weights
(``aggregators``) -> direction written into ``.grad`` (``ops.combine``).
"""

__version__ = "0.1.0"

from fastmtl import aggregators, backend, ops  # noqa: E402

__all__ = ["__version__", "aggregators", "backend", "ops"]
