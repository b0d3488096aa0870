"""The one module that imports the compiled extension ``fastmtl._C`` (optional).

``available()`` says whether it loaded; the launchers below take already validated
arguments (see ``fastmtl.ops``) and call the CUDA kernels of ``csrc/``.
"""

from __future__ import annotations

from torch import Tensor

try:
    from fastmtl import _C  # type: ignore[attr-defined]

    _ERROR: str | None = None
except Exception as exc:  # not built (the default) or built for another torch
    _C = None
    _ERROR = f"{exc.__class__.__name__}: {exc}"


def available() -> tuple[bool, str]:
    if _C is None:
        return False, f"fastmtl._C not built (FASTMTL_BUILD_CUDA=1 at install builds it): {_ERROR}"
    return True, "fastmtl._C loaded"


def gram(G: Tensor) -> Tensor:
    return _C.gram(G)


def combine(w: Tensor, G: Tensor, out: Tensor, accumulate: bool) -> None:
    _C.combine(w, G, out, accumulate)


def project(C: Tensor, G: Tensor, out: Tensor) -> None:
    _C.project(C, G, out)


def trial_points(z: Tensor, d: Tensor, steps: Tensor, out: Tensor) -> None:
    _C.trial_points(z, d, steps, out)


ADATASK_BLOCK = 1024  # elements per CUDA block of the AdaTask kernel (kAdataskBlock in csrc/)


def adatask(algo: int, params, grads, exp_avgs, exp_avg_sqs, maxes, steps, active, *,
            lr: float, weight_decay: float, eps: float, a: float, b: float, lr_decay: float,
            amsgrad: bool, maximize: bool, decoupled: bool) -> None:
    # Same arguments as fastmtl.kernels.adatask.launch, the same tables (built by
    # fastmtl.kernels._tables, which imports torch only).
    from fastmtl.kernels._tables import launch_tables

    ptrs, sizes, blocks = launch_tables(params, grads, exp_avgs, exp_avg_sqs, maxes, steps,
                                        ADATASK_BLOCK)
    if blocks.shape[0] == 0:
        return
    _C.adatask(ptrs, sizes, blocks, active, params[0], grads[0], exp_avg_sqs[0], ADATASK_BLOCK,
               algo, lr, weight_decay, eps, a, b, lr_decay, amsgrad, maximize, decoupled)
