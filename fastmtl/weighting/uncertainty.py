r"""Uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to
Weigh Losses for Scene Geometry and Semantics", CVPR 2018, Eqs. 7 and 10).

With learnable s_i = log σ_i² (initialised to 0, i.e. σ_i = 1):

.. math::

    \mathcal L = \sum_i c_i\, e^{-s_i} L_i + \tfrac12 s_i, \qquad
    c_i = \tfrac12 \text{ (regression, Eq. 7: } \tfrac{1}{2\sigma^2} L + \log\sigma),\quad
    c_i = 1 \text{ (classification, Eq. 10: } \tfrac{1}{\sigma^2} L + \log\sigma).

Regression is the default for every task (``classification=None``); pass a list of T booleans
to mark the classification tasks, whose term drops the ½ on L_i. The s_i are trained jointly
with the model by the same optimizer: the learned weights are c_i e^{−s_i} (``weights``).

Conventions elsewhere:

- LibMTL's ``UW``: the regression form for every task, Σ_i L_i/(2 e^{s_i}) + s_i/2, with s
  initialised to −0.5 (``init=-0.5`` here reproduces it).
- Many re-implementations (and IMTL-L) use Σ_i e^{−s_i} L_i + s_i, which is twice the
  regression form: the same minimiser in s, the model's gradient scaled by 2.

When to call what::

    uw = fm.weighting.UncertaintyWeighting(num_tasks=T)       # an nn.Module
    opt = torch.optim.Adam([*model.parameters(), *uw.parameters()], lr=1e-3)
    for x, y in loader:
        losses = compute_losses(model(x), y)                  # T scalars
        opt.zero_grad()
        uw(losses).backward()                                 # model and s_i both get grads
        opt.step()

Move it with the model (``uw.to(device)``); no host synchronisation in ``forward``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastmtl.weighting.base import check_num_tasks, stack_losses

__all__ = ["UW", "UncertaintyWeighting"]


class UncertaintyWeighting(nn.Module):
    """Σ_i c_i e^{−s_i} L_i + ½ s_i with learnable log-variances s (see the module docstring).

    Args:
        num_tasks: T.
        classification: None (every task uses the regression form, c_i = ½) or T booleans,
            True where the task is a classification (c_i = 1).
        init: initial value of every s_i (0 in the paper, −0.5 in LibMTL).
        check: value checks of the losses (see ``fastmtl.weighting.base``).
    """

    def __init__(self, num_tasks: int, classification: Sequence[bool] | None = None,
                 init: float = 0.0, *, check: bool | None = None) -> None:
        super().__init__()
        self.num_tasks = check_num_tasks(num_tasks)
        if classification is None:
            flags = [False] * self.num_tasks
        else:
            flags = list(classification)
            if len(flags) != self.num_tasks or not all(isinstance(f, bool) for f in flags):
                raise ValueError(f"classification must be None or {self.num_tasks} booleans, "
                                 f"got {classification!r}")
        if isinstance(init, bool) or not isinstance(init, int | float):
            raise ValueError(f"init must be a number, got {init!r}")
        self.check = check
        self.classification = tuple(flags)
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(init)))
        self.register_buffer("scale", torch.tensor([1.0 if f else 0.5 for f in flags]),
                             persistent=False)

    @property
    def weights(self) -> Tensor:
        """The current loss weights c_i e^{−s_i} (T,), detached."""
        return (self.scale * torch.exp(-self.log_vars)).detach()

    def forward(self, losses: Any) -> Tensor:
        stacked = stack_losses(losses, self.num_tasks, "UncertaintyWeighting", self.check)
        s = self.log_vars.to(stacked.dtype) if stacked.dtype == torch.float64 else self.log_vars
        scale = self.scale.to(s.dtype)
        return (scale * torch.exp(-s) * stacked + 0.5 * s).sum()

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, classification={list(self.classification)}"


UW = UncertaintyWeighting
