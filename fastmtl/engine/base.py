"""The engine interface and the checks every engine shares.

An engine turns T scalar losses into per-task gradients G (one row per task) and answers the
three questions of the pipeline (DESIGN.md, "One pipeline"):

    compute(losses) -> self      fill G: row i = ∇ L_i (w.r.t. shared params, or w.r.t. z)
    gram()          -> K         K = G Gᵀ (T, T), float32 (float64 when G is float64)
    direction(w)    -> d         d = Gᵀ w, the aggregated direction

Parameter-space engines (``TaskGradients``: "loop", "vmap") hold G as a (T, N) buffer per
(device, dtype) group; the latent engine (``LatentGradients``) holds ∇_z L_i. A future
streamed engine, which never holds G, implements the same three methods (``gram`` during
``compute``, ``direction`` by a second pass).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["ENGINES", "GradientEngine", "auto_mode", "check_engine_name", "check_losses_list",
           "check_shared_params"]

ENGINES = ("auto", "loop", "vmap")


def auto_mode(device: torch.device, num_tasks: int) -> str:
    """The "auto" rule: "loop" on the CPU or when T <= 2, "vmap" otherwise.

    On the CPU a batched backward has no launch overhead to save; for T <= 2 the T backward
    passes cost about what one batched pass does and need no batching rules. An engine that
    tried "vmap" under "auto" and failed falls back to "loop" for good (see ``TaskGradients``).
    """
    if device.type == "cpu" or num_tasks <= 2:
        return "loop"
    return "vmap"


def check_engine_name(engine: object) -> str:
    if not isinstance(engine, str):
        raise TypeError(f"engine must be one of {ENGINES}, got {type(engine).__name__}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    return engine


def check_losses_list(losses: object) -> list[Tensor]:
    """Validate T >= 1 scalar floating losses that require grad, all on one device.

    ``losses`` is a sequence of one-element tensors or a 1-D tensor (its entries are the
    losses). Returns them as a list of 0-d tensors (``reshape(())`` views).
    """
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError("losses given as one tensor must be 1-D (one entry per task), "
                             f"got shape {tuple(losses.shape)}")
        losses = list(losses.unbind(0))
    elif isinstance(losses, Iterable) and not isinstance(losses, str | bytes):
        losses = list(losses)
    else:
        raise TypeError(f"losses must be a sequence of scalar tensors, got {type(losses).__name__}")
    if not losses:
        raise ValueError("losses is empty: need at least one task loss")
    out = []
    for i, loss in enumerate(losses):
        if not isinstance(loss, Tensor):
            raise TypeError(f"losses[{i}] must be a torch.Tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"losses[{i}] must be a scalar (one element), "
                             f"got shape {tuple(loss.shape)}")
        if not loss.is_floating_point():
            raise TypeError(f"losses[{i}] must be floating point, got {loss.dtype}")
        if not loss.requires_grad:
            raise ValueError(f"losses[{i}] does not require grad: it is not connected to any "
                             "parameter (computed under no_grad, or detached?)")
        out.append(loss.reshape(()))
    devices = {loss.device for loss in out}
    if len(devices) > 1:
        raise ValueError(f"losses are on different devices: {sorted(map(str, devices))}")
    return out


def check_shared_params(params: object) -> list[Tensor]:
    """Validate a non-empty collection of distinct leaf tensors that require grad."""
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, Iterable) and not isinstance(params, str | bytes):
        params = list(params)
    else:
        raise TypeError("shared_params must be an iterable of tensors, "
                        f"got {type(params).__name__}")
    if not params:
        raise ValueError("shared_params is empty: need at least one shared parameter")
    seen: dict[int, int] = {}
    for k, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"shared_params[{k}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"shared_params[{k}] (shape {tuple(p.shape)}) does not require grad")
        if not p.is_leaf:
            raise ValueError(f"shared_params[{k}] (shape {tuple(p.shape)}) is not a leaf tensor: "
                             "pass parameters, not results of operations on them")
        if id(p) in seen:
            raise ValueError(f"shared_params[{k}] is the same tensor as "
                             f"shared_params[{seen[id(p)]}]: duplicates are not allowed")
        seen[id(p)] = k
    return params


class GradientEngine(abc.ABC):
    """Per-task gradients of T losses: ``compute`` fills them, ``gram`` and ``direction`` read."""

    num_tasks: int | None = None

    @abc.abstractmethod
    def compute(self, losses: Sequence[Tensor]) -> GradientEngine:
        """Compute the per-task gradients of ``losses`` (T scalars); returns ``self``."""

    @abc.abstractmethod
    def gram(self) -> Tensor:
        """K = G Gᵀ (T, T) of the last ``compute``."""

    @abc.abstractmethod
    def direction(self, w: Tensor) -> object:
        """d = Gᵀ w for coefficients w (T,)."""

    def _require_computed(self) -> int:
        if self.num_tasks is None:
            raise RuntimeError(f"{type(self).__name__}: call compute(losses) first")
        return self.num_tasks
