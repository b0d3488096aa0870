"""What the T×T solvers share: the input check of K and the choice of implementation (not
public). The work dtype is ``fastmtl.ops._common.acc_dtype`` (float64 for float64, else
float32)."""

from __future__ import annotations

from torch import Tensor

from fastmtl import backend

__all__ = ["check_square", "solver_path"]


def check_square(K: object, who: str | None = None, name: str = "K") -> Tensor:
    """Validate a square (T, T) floating tensor, T >= 1, and return it (messages prefixed
    "{who}: " when ``who`` is given)."""
    prefix = "" if who is None else f"{who}: "
    if not isinstance(K, Tensor):
        raise TypeError(f"{prefix}{name} must be a torch.Tensor, got {type(K).__name__}")
    if K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape[0] < 1:
        raise ValueError(f"{prefix}{name} must be a square (T, T) matrix with T >= 1, "
                         f"got shape {tuple(K.shape)}")
    if not K.is_floating_point():
        raise TypeError(f"{prefix}{name} must be a floating tensor, got {K.dtype}")
    return K


def solver_path(K: Tensor, max_t: int, cpu_name: str) -> str:
    """Which implementation of a solver runs on K (T, T): "triton" when the selected backend
    is "triton", or "cuda" with Triton available (the compiled extension has no solvers), and
    T <= ``max_t``; else ``cpu_name`` (the host solver) for CPU tensors, "torch" otherwise."""
    name = backend.select(K)
    small = K.shape[0] <= max_t
    if name == "triton" and small:
        return "triton"
    if name == "cuda" and small and backend.info()["triton"]["available"]:
        return "triton"
    return cpu_name if K.device.type == "cpu" else "torch"
