"""Validation and dispatch helpers shared by the ops (not public)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from fastmtl import backend


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_matrix(G: object, op: str, name: str = "G") -> Tensor:
    """Validate a (T, N) floating matrix with T, N >= 1; return it with unit stride along N."""
    if not isinstance(G, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D of shape (T, N), got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {G.dtype}")
    if G.shape[0] < 1 or G.shape[1] < 1:
        raise ValueError(f"{op}: {name} must have T >= 1 rows and N >= 1 columns, "
                         f"got shape {tuple(G.shape)}")
    if G.stride(1) != 1 and G.shape[1] > 1:
        G = G.contiguous()
    return G


def check_same_device(op: str, ref: Tensor, ref_name: str, t: Tensor, name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_coefficients(op: str, w: object, G: Tensor, name: str = "w") -> Tensor:
    """Validate a (T,) coefficient vector for G (T, N): same device, dtype G's or fp32/fp64 acc."""
    if not isinstance(w, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 1 or w.shape[0] != G.shape[0]:
        raise ValueError(f"{op}: {name} must have shape ({G.shape[0]},) to match G of shape "
                         f"{tuple(G.shape)}, got {tuple(w.shape)}")
    _check_coefficient_device_dtype(op, w, G, name)
    return w


def check_coefficient_matrix(op: str, C: object, G: Tensor, name: str = "C") -> Tensor:
    """Validate a (T', T) coefficient matrix for G (T, N), T' >= 1: same device, dtype G's or
    the accumulation dtype (any strides)."""
    if not isinstance(C, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(C).__name__}")
    if C.dim() != 2 or C.shape[1] != G.shape[0] or C.shape[0] < 1:
        raise ValueError(f"{op}: {name} must be 2-D of shape (T', {G.shape[0]}) with T' >= 1 "
                         f"to match G of shape {tuple(G.shape)}, got {tuple(C.shape)}")
    _check_coefficient_device_dtype(op, C, G, name)
    return C


def _check_coefficient_device_dtype(op: str, c: Tensor, G: Tensor, name: str) -> None:
    check_same_device(op, G, "G", c, name)
    allowed = {G.dtype, acc_dtype(G.dtype)}
    if c.dtype not in allowed:
        raise TypeError(f"{op}: {name} has dtype {c.dtype} but G has dtype {G.dtype}; "
                        f"expected one of {sorted(str(d) for d in allowed)}")


def check_out(op: str, out: object, G: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Validate an ``out=`` tensor: given shape, contiguous, G's device, G's or the acc dtype."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{op}: out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise ValueError(f"{op}: out must have shape {shape}, got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous")
    check_same_device(op, G, "G", out, "out")
    allowed = {G.dtype, acc_dtype(G.dtype)}
    if out.dtype not in allowed:
        raise TypeError(f"{op}: out has dtype {out.dtype}; expected one of "
                        f"{sorted(str(d) for d in allowed)} for G of dtype {G.dtype}")
    return out


def kernel(op: str, name: str) -> Callable[..., object]:
    """The launcher ``name`` of op ``op`` for backend "triton" or "cuda" (imported lazily)."""
    if name == "triton":
        module = importlib.import_module(f"fastmtl.kernels.{op}")
        return module.launch
    if name == "cuda":
        from fastmtl import _ext

        return getattr(_ext, op)
    raise ValueError(f"no compiled kernel for backend {name!r}")


def select(t: Tensor) -> str:
    return backend.select(t)
