"""Address tables of the multi-tensor launches (``adatask``), shared by the Triton launcher
and the compiled extension's (``fastmtl._ext``). Imports torch only, never triton.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["launch_tables"]


@functools.lru_cache(maxsize=64)
def _cached_tables(key: tuple, device: torch.device,
                   block: int) -> tuple[Tensor, Tensor, Tensor]:
    cols = list(zip(*key))
    ptrs = torch.tensor([cols[0], cols[1], cols[3], cols[4], cols[5], cols[6]], dtype=torch.int64)
    sizes = torch.tensor([cols[7], cols[2]], dtype=torch.int64)
    blocks = torch.tensor([(i, s) for i, n in enumerate(cols[7]) for s in range(0, n, block)],
                          dtype=torch.int32).reshape(-1, 2)
    return ptrs.to(device), sizes.to(device), blocks.to(device)


def launch_tables(params, grads, exp_avgs, exp_avg_sqs, maxes, steps,
                   block: int) -> tuple[Tensor, Tensor, Tensor]:
    """The tables of the multi-tensor launchers ("triton" and "cuda"), on the params' device:
    addresses (6, P) int64 (rows: param, grad, exp_avg, exp_avg_sq, max / second moment, step),
    sizes (2, P) int64 (rows: numel, gradient row stride) and blocks (programs, 2) int32
    ((tensor, first element) of each program of ``block`` elements). Cached on every address
    and size, so a hit is always valid (rebuilt, with a host-to-device copy, only when an
    address or size changes)."""
    key = tuple((p.data_ptr(), g.data_ptr(), g.stride(0), m.data_ptr(), v.data_ptr(),
                 x.data_ptr(), s.data_ptr(), p.numel())
                for p, g, m, v, x, s in zip(params, grads, exp_avgs, exp_avg_sqs, maxes, steps))
    return _cached_tables(key, params[0].device, block)
