"""Launch helpers shared by the Triton kernels (no kernels here).

Under Triton's CPU interpreter (``TRITON_INTERPRET=1``, read once at import, like Triton does)
every program costs about a millisecond of Python and nothing can be autotuned, so each kernel
gets ONE fixed small configuration there; on a GPU it gets a short ``triton.autotune`` list,
keyed on the problem size. ``FASTMTL_AUTOTUNE=0`` (read at import) replaces the list by each
kernel's fixed default: the block sizes fix the summation order, so with it results are also
bit-identical across processes, not only across calls within one.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable

import torch
import triton

__all__ = [
    "AUTOTUNE",
    "INTERPRET",
    "MAX_N",
    "PTXAS_SPILL_SLACK",
    "autotune",
    "cdiv",
    "check_columns",
    "device_guard",
    "next_power_of_2",
    "num_programs_target",
    "pad_rows",
    "round_up",
]

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
AUTOTUNE: bool = os.environ.get("FASTMTL_AUTOTUNE", "1") not in ("", "0")
# Spill bytes per thread a kernel whose tiles fit its registers may still show (``kernels.aot``):
# ptxas (with triton 3.7's --regAllocOptLevel=2) sometimes caps registers at 56-80 and spills a
# value or two, 8-16 B. The budget of the streaming ops, whose autotune configs are pruned to
# tiles that fit.
PTXAS_SPILL_SLACK = 16
MAX_N = 2**31 - 2**16  # column indices are int32 inside the kernels (row offsets are int64)

cdiv = triton.cdiv
next_power_of_2 = triton.next_power_of_2


def round_up(x: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``x``."""
    return cdiv(x, multiple) * multiple


def pad_rows(K: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """(K as ``dtype`` with its rows zero-padded to a multiple of 16 elements, row stride).
    For the single-program solvers: Triton knows a stride divisible by 16, so row loads are
    aligned and vectorised, which keeps odd T from spilling registers (``kernels.aot``)."""
    ld = round_up(K.shape[1], 16)
    return torch.nn.functional.pad(K.to(dtype), (0, ld - K.shape[1])), ld


def _config(kwargs: dict[str, int], num_warps: int = 4, num_stages: int = 2) -> triton.Config:
    return triton.Config(dict(kwargs), num_warps=num_warps, num_stages=num_stages)


def autotune(
    gpu: Iterable[tuple[dict[str, int], int, int]],
    default: tuple[dict[str, int], int, int],
    interpret: dict[str, int],
    key: list[str],
    prune: Callable[..., list[triton.Config]] | None = None,
    restore_value: list[str] | None = None,
) -> Callable:
    """``triton.autotune`` over ``gpu`` ((meta, num_warps, num_stages) triples) keyed on ``key``;
    ``default`` alone when FASTMTL_AUTOTUNE=0; ``interpret`` alone under the interpreter.

    ``prune(configs, named_args, **kwargs)`` drops configs that cannot fit a given launch;
    ``restore_value`` names in-place outputs that the benchmark runs must leave as they were.
    A single config is never benchmarked (and never pruned: it must fit every launch).
    """
    if INTERPRET:
        tune = triton.autotune(configs=[_config(interpret)], key=key)
    elif not AUTOTUNE:
        tune = triton.autotune(configs=[_config(*default)], key=key)
    else:
        tune = triton.autotune(
            configs=[_config(meta, warps, stages) for meta, warps, stages in gpu],
            key=key,
            prune_configs_by={"early_config_prune": prune} if prune is not None else None,
            restore_value=restore_value,
        )

    def decorate(fn: Callable) -> Callable:
        tuner = tune(fn)
        tuner.fastmtl_default = _config(*default)  # compiled by ``aot`` too
        return tuner

    return decorate


def check_columns(op: str, N: int) -> None:
    if N > MAX_N:
        raise ValueError(f"{op}: N = {N} columns exceeds the Triton kernels' limit {MAX_N}")


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU current while launching (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_target(device: torch.device) -> int:
    """How many programs keep the device busy: a few waves of SMs on a GPU, a handful under
    the interpreter (enough to exercise split paths, few enough to stay fast)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 4 * _sm_count(index)
