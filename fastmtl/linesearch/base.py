"""Shared plumbing of the line searches: argument checks, the gradient pass, the update.

A line search owns one encoder (shared), T heads and T loss functions; ``step(x, targets)``
computes L_i = loss_fns[i](heads[i](encoder(x)), targets[i]). It owns the ``.grad`` of the
encoder's and the heads' parameters: ``step`` sets them to None first, fills them (the encoder
with the aggregated direction, each head with its own task's gradient) and leaves them there.

The update with the chosen step t (``_apply``): plain SGD, θ ← θ − t·θ.grad for the encoder
and every head (the paper's code), or, with ``optimizer=``, every ``.grad`` is scaled by t/lr
and ``optimizer.step()`` is called. That is the same update for ``torch.optim.SGD(lr=lr)``
without momentum; with momentum the buffer accumulates the t/lr-scaled gradients (the line
search then scales each step's contribution, not the step taken); with Adam-like optimizers the
scaling is mostly normalised away, so the search has little effect there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fastmtl._checks import (
    check_aggregator,
    check_finite_losses,
    check_losses_list,
    check_number,
    checking_values,
)
from fastmtl.aggregators import MGDA
from fastmtl.engine import LatentGradients, TaskGradients, pipeline

__all__ = ["LineSearchBase"]


def _check_modules(encoder: object, heads: object, loss_fns: object) -> tuple[list, list]:
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
    if isinstance(heads, nn.Module) and not isinstance(heads, nn.ModuleList):
        raise TypeError("heads must be a sequence of modules (one per task), got a single "
                        f"{type(heads).__name__}")
    heads, loss_fns = list(heads), list(loss_fns)  # type: ignore[call-overload]
    if not heads:
        raise ValueError("heads is empty: need one head per task")
    for i, h in enumerate(heads):
        if not isinstance(h, nn.Module):
            raise TypeError(f"heads[{i}] must be a torch.nn.Module, got {type(h).__name__}")
    if len(loss_fns) != len(heads):
        raise ValueError(f"heads and loss_fns must have the same length (one per task), got "
                         f"{len(heads)} heads and {len(loss_fns)} loss functions")
    for i, f in enumerate(loss_fns):
        if not callable(f):
            raise TypeError(f"loss_fns[{i}] must be callable, got {type(f).__name__}")
    owner: dict[int, str] = {}
    for name, module in [("encoder", encoder)] + [(f"heads[{i}]", h) for i, h in enumerate(heads)]:
        for p in module.parameters():
            if id(p) in owner and owner[id(p)] != name:
                raise ValueError(f"{name} shares a parameter with {owner[id(p)]}: the encoder "
                                 "and the heads must have disjoint parameters")
            owner[id(p)] = name
    return heads, loss_fns


class LineSearchBase:
    """Checks and the passes every line search shares (not public)."""

    def __init__(self, encoder: nn.Module, heads: Sequence[nn.Module],
                 loss_fns: Sequence[Callable], direction: object = None, lr: float = 0.1, *,
                 optimizer: torch.optim.Optimizer | None = None, engine: str = "auto",
                 check: bool | None = None) -> None:
        self.heads, self.loss_fns = _check_modules(encoder, heads, loss_fns)
        self.encoder = encoder
        self.direction = check_aggregator(MGDA() if direction is None else direction,
                                          "direction")
        self.lr = check_number("lr", lr, low=0, low_open=True)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, "
                            f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.engine = engine
        self.check = check
        self.num_tasks = len(self.heads)
        self._latent = LatentGradients(engine)
        self._param_engine: TaskGradients | None = None

    # -- parameters ----------------------------------------------------------------------
    def parameters(self) -> list[Tensor]:
        """The encoder's then the heads' parameters (those the step updates)."""
        out = list(self.encoder.parameters())
        for h in self.heads:
            out += list(h.parameters())
        return out

    def _zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # -- passes ---------------------------------------------------------------------------
    def _check_targets(self, targets: object) -> Sequence:
        try:
            n = len(targets)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError("targets must be a sequence with one target per task, got "
                            f"{type(targets).__name__}") from None
        if n != self.num_tasks:
            raise ValueError(f"targets must hold one target per task ({self.num_tasks}), "
                             f"got {n}")
        return targets  # type: ignore[return-value]

    def _forward(self, x: object, targets: Sequence) -> tuple[Tensor, list[Tensor]]:
        z = self.encoder(x)
        if not isinstance(z, Tensor):
            raise TypeError(f"the encoder must return one tensor z, got {type(z).__name__}")
        losses = [f(h(z), y) for h, f, y in zip(self.heads, self.loss_fns, targets)]
        for i, loss in enumerate(losses):
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fns[{i}] must return a scalar tensor, got "
                                 f"{getattr(loss, 'shape', type(loss).__name__)}")
        return z, check_losses_list(losses)

    def _check_finite(self, L: Tensor) -> None:
        if checking_values(self.check, L):
            check_finite_losses(L)

    def _check_descent(self, K: Tensor, w: Tensor, slopes: Tensor, condition: str) -> None:
        """Raise if d is an ascent direction (⟨g_i, d⟩ < 0 beyond rounding) for some task
        ("all_tasks") or for the mean loss ("mean"); values checked per ``check``."""
        if not checking_values(self.check, slopes):
            return
        norm_d = (w @ K @ w).clamp_min(0).sqrt()
        tol = 1e-6 * K.diagonal().clamp_min(0).sqrt() * norm_d
        if condition == "mean":
            bad = [] if bool(slopes.mean() >= -tol.mean()) else list(range(len(slopes)))
        else:
            bad = [i for i, ok in enumerate((slopes >= -tol).tolist()) if not ok]
        if bad:
            raise ValueError(f"the direction is not a descent direction for tasks {bad} "
                             f"(condition={condition!r}): <grad L_i, d> = {slopes.tolist()}; "
                             "use a direction with non-negative slopes (MGDA, UPGrad, ...)")

    def _latent_pass(self, x: object, targets: Sequence
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Forward, ∇_z L_i (engine latent mode), w, d = G_zᵀ w and the pull-back
        (encoder .grad = J_zᵀ d, head i .grad = ∇θ_i L_i). Returns (z, L, K, w, d), detached."""
        self._zero_grad()
        z, losses = self._forward(x, targets)
        L = torch.stack([loss.detach() for loss in losses])
        self._check_finite(L)
        out = pipeline.run(self._latent.bind(z), losses, self.direction.weights,
                           return_direction=True)
        return z.detach(), L, out.K, out.w.to(out.K.dtype), out.direction

    def _param_pass(self, x: object, targets: Sequence) -> tuple[Tensor, Tensor, Tensor]:
        """Forward, per-task gradients of the encoder's parameters, w, and .grad filled
        (encoder: d_θ = Gᵀ w, head i: ∇θ_i L_i). Returns (L, K, w), detached."""
        self._zero_grad()
        _, losses = self._forward(x, targets)
        L = torch.stack([loss.detach() for loss in losses])
        self._check_finite(L)
        if self._param_engine is None:
            shared = [p for p in self.encoder.parameters() if p.requires_grad]
            self._param_engine = TaskGradients(shared, self.engine)
        out = pipeline.run(self._param_engine, losses, self.direction.weights)
        return L, out.K, out.w.to(out.K.dtype)

    # -- update ---------------------------------------------------------------------------
    def _apply(self, t: Tensor) -> None:
        """θ ← θ − t·θ.grad (or the optimizer's step on t/lr-scaled gradients)."""
        params = [p for p in self.parameters() if p.grad is not None]
        with torch.no_grad():
            if self.optimizer is not None:
                scale = t / self.lr
                for p in params:
                    p.grad.mul_(scale.to(p.grad.dtype))
                self.optimizer.step()
                return
            for p in params:
                p.sub_(p.grad * t.to(p.dtype))
