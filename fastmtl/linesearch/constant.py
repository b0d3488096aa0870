"""Constant step size: the baseline of Filatov & Merkulov (arXiv:2110.00874; BETA = 0 in
their code), with the interface of the line searches.

One step: the gradient pass of ``LatentBacktracking`` (``space="latent"``: direction in z,
pulled back with one backward) or of ``ParamBacktracking`` (``space="param"``: per-task
gradients of the encoder's parameters), then θ ← θ − lr·θ.grad for the encoder and the heads
(or ``optimizer.step()`` on the unscaled gradients). No trial, no extra forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fastmtl._checks import check_choice
from fastmtl.linesearch.armijo import StepInfo
from fastmtl.linesearch.base import LineSearchBase

__all__ = ["ConstantStep"]


class ConstantStep(LineSearchBase):
    """θ ← θ − lr·θ.grad after the latent (default) or parameter-space gradient pass.

    ``StepInfo``: ``losses_after``, ``slopes`` and ``steps`` are None, ``trials`` 0,
    ``accepted`` True, ``step_size`` lr.
    """

    def __init__(self, encoder: nn.Module, heads: Sequence[nn.Module],
                 loss_fns: Sequence[Callable], direction: object = None, lr: float = 0.1,
                 space: str = "latent", *, optimizer: torch.optim.Optimizer | None = None,
                 engine: str = "auto", check: bool | None = None) -> None:
        super().__init__(encoder, heads, loss_fns, direction, lr, optimizer=optimizer,
                         engine=engine, check=check)
        self.space = check_choice("space", space, ("latent", "param"))

    def step(self, x: object, targets: Sequence) -> StepInfo:
        """One training step on the batch (x, targets); returns a ``StepInfo``."""
        targets = self._check_targets(targets)
        if self.space == "latent":
            _, L, _, w, _ = self._latent_pass(x, targets)
        else:
            L, _, w = self._param_pass(x, targets)
        t = torch.full((), self.lr, dtype=torch.float64, device=L.device)
        self._apply(t)
        return StepInfo(L, None, t, torch.zeros((), dtype=torch.int64, device=L.device),
                        torch.ones((), dtype=torch.bool, device=L.device), w)
