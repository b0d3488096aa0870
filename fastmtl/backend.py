"""Which implementation of an op runs: "cuda" (compiled extension), "triton" or "torch".

Selection for a tensor ``t`` (``select(t)``):

================  ==========================================================
CUDA tensor       "cuda" if ``fastmtl._C`` was built, else "triton" if triton
                  imports, else "torch" (the reference)
CPU tensor        "torch"
================  ==========================================================

Auto-selection never picks Triton's CPU interpreter. ``FASTMTL_BACKEND=torch|triton|cuda``
forces one backend for every op (read at import; ``set_backend`` / ``use_backend`` change it
at run time) and raises a clear ``RuntimeError`` when it cannot run on the tensor at hand.
Forcing "triton" runs the kernels on CPU tensors only when ``TRITON_INTERPRET=1`` was set
before the kernels were imported (the interpreter is process-wide): that is how the test-suite
checks the kernels without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("cuda", "triton", "torch")

__all__ = ["BACKENDS", "info", "select", "set_backend", "use_backend", "forced", "interpreting"]


def _parse(name: str | None) -> str | None:
    if name is None or name.strip() in ("", "auto"):
        return None
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown fastmtl backend {name!r}; expected one of {BACKENDS} or 'auto'")
    return name


_forced: str | None = _parse(os.environ.get("FASTMTL_BACKEND"))


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_STATUS: dict[str, tuple[bool, str]] = {}  # availability, probed once per process


def _triton_status() -> tuple[bool, str]:
    if "triton" not in _STATUS:
        _STATUS["triton"] = _probe_triton()
    return _STATUS["triton"]


def _cuda_ext_status() -> tuple[bool, str]:
    if "cuda" not in _STATUS:
        _STATUS["cuda"] = _probe_cuda_ext()
    return _STATUS["cuda"]


def _probe_triton() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton does not import ({exc.__class__.__name__}: {exc})"
    return True, f"triton {triton.__version__}" + (" (CPU interpreter)" if interpreting() else "")


def _probe_cuda_ext() -> tuple[bool, str]:
    try:
        importlib.import_module("fastmtl._ext")
        from fastmtl import _ext

        return _ext.available()
    except Exception as exc:
        return False, f"fastmtl._C not loadable ({exc.__class__.__name__}: {exc})"


def forced() -> str | None:
    """The forced backend name, or None for automatic selection."""
    return _forced


def set_backend(name: str | None) -> None:
    """Force ``name`` ("torch", "triton", "cuda") for every op; None or "auto" restores auto."""
    global _forced
    _forced = _parse(name)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _check_forced(name: str, t: torch.Tensor) -> str:
    if name == "torch":
        return name
    if name == "triton":
        ok, why = _triton_status()
        if not ok:
            raise RuntimeError(f"FASTMTL_BACKEND=triton but {why}")
        if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
            return name
        raise RuntimeError(
            f"FASTMTL_BACKEND=triton cannot run on a {t.device.type} tensor: Triton kernels need "
            "CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU tensors"
        )
    ok, why = _cuda_ext_status()
    if not ok:
        raise RuntimeError(f"FASTMTL_BACKEND=cuda but the compiled extension is unavailable: {why}")
    if t.device.type != "cuda":
        raise RuntimeError(f"FASTMTL_BACKEND=cuda cannot run on a {t.device.type} tensor")
    return name


def select(t: torch.Tensor) -> str:
    """The backend that runs an op whose main input is ``t``."""
    if _forced is not None:
        return _check_forced(_forced, t)
    if t.device.type == "cuda":
        if _cuda_ext_status()[0]:
            return "cuda"
        if _triton_status()[0]:
            return "triton"
    return "torch"


def info() -> dict[str, dict[str, object]]:
    """What is available and why not: ``{name: {"available": bool, "detail": str}}``."""
    triton_ok, triton_why = _triton_status()
    cuda_ok, cuda_why = _cuda_ext_status()
    gpu = torch.cuda.is_available()
    return {
        "torch": {"available": True, "detail": f"torch {torch.__version__} (reference)"},
        "triton": {
            "available": triton_ok and (gpu or interpreting()),
            "detail": triton_why if not triton_ok or gpu or interpreting()
            else f"{triton_why}, but no CUDA device (set TRITON_INTERPRET=1 for CPU tensors)",
        },
        "cuda": {
            "available": cuda_ok and gpu,
            "detail": cuda_why if not cuda_ok or gpu else f"{cuda_why}, but no CUDA device",
        },
        "forced": {"available": _forced is not None, "detail": str(_forced or "auto")},
    }
