"""What the loss weightings share: argument checks and the input policy for the losses.

A loss weighting sees only the T task losses (and, for GradNorm, per-task gradient norms of the
last shared layer); it never reaches into the model. Every method takes the losses as a
sequence of T scalar tensors or a (T,) tensor, all on one device.

Input policy (as for the aggregators): the number of losses, their shapes and their device are
always checked (metadata, no host synchronisation). Values (finite losses; for FAMO, losses
above their lower bound) are checked when ``check=True``, or by default (``check=None``) when
the losses are on the CPU and not being traced by ``torch.compile``; on CUDA the default skips
them, since reading a value back is a host sync, and a NaN or inf then propagates into the
result (it is never replaced by a finite value).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fastmtl._checks import check_int, check_number, checking_values

__all__ = ["check_num_tasks", "check_positive", "checking_values", "stack_losses"]


def check_num_tasks(num_tasks: object) -> int:
    return check_int("num_tasks", num_tasks)


def check_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    return check_number(name, value, low=0, low_open=not allow_zero)


def stack_losses(losses: Any, num_tasks: int, owner: str, check: bool | None = None, *,
                 detach: bool = False) -> Tensor:
    """The T losses as a (T,) tensor (graph kept unless ``detach``), with the checks above.

    Raises ``ValueError`` naming the counts when there are not ``num_tasks`` losses, and naming
    the tasks when a value is non-finite (when values are checked).
    """
    if isinstance(losses, Tensor):
        if losses.dim() > 1 or (losses.dim() == 0 and num_tasks != 1):
            raise ValueError(f"{owner}: losses given as one tensor must have shape "
                             f"({num_tasks},), got {tuple(losses.shape)}")
        stacked = losses.reshape(-1)
    elif isinstance(losses, Iterable) and not isinstance(losses, str | bytes):
        items = list(losses)
        for i, loss in enumerate(items):
            if not isinstance(loss, Tensor):
                raise TypeError(f"{owner}: losses[{i}] must be a torch.Tensor, "
                                f"got {type(loss).__name__}")
            if loss.numel() != 1:
                raise ValueError(f"{owner}: losses[{i}] must be a scalar (one element), "
                                 f"got shape {tuple(loss.shape)}")
        devices = {loss.device for loss in items}
        if len(devices) > 1:
            raise ValueError(f"{owner}: losses are on different devices: "
                             f"{sorted(map(str, devices))}")
        if len(items) != num_tasks:
            raise ValueError(f"{owner} was built for num_tasks={num_tasks} but got "
                             f"{len(items)} losses")
        stacked = torch.stack([loss.reshape(()) for loss in items])
    else:
        raise TypeError(f"{owner}: losses must be a sequence of scalar tensors or a (T,) "
                        f"tensor, got {type(losses).__name__}")
    if stacked.shape[0] != num_tasks:
        raise ValueError(f"{owner} was built for num_tasks={num_tasks} but got "
                         f"{stacked.shape[0]} losses")
    if not stacked.is_floating_point():
        raise TypeError(f"{owner}: losses must be floating point, got {stacked.dtype}")
    if detach:
        stacked = stacked.detach()
    if checking_values(check, stacked):
        finite = torch.isfinite(stacked.detach())
        if not bool(finite.all()):
            bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
            raise ValueError(f"{owner}: non-finite losses at task indices {bad}")
    return stacked
