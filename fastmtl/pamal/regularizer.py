r"""The multi-forward ordering regulariser of PaMaL.

Dimitriadis, Frossard & Fleuret (ICML 2023), multi-forward training (official code
``nik-dim/pamal``, ``src/trainer/multi_forward_ensemble_trainer.py``): a step runs W forwards
on the same batch at α^(1..W) ~ Dir(p·1) with task losses ℓ_t^(w). For each task t, sort the W
samples by α_t in descending order (losses ℓ_t^(1..W) in that order) and take

.. math::

    R_t = \log\Big(\frac{1}{W-1}\sum_{k=1}^{W-1}
          \exp\big(\tau\,[\,s\,(\ell_t^{(k+1)} - \ell_t^{(k)})\,]_+\big)\Big),
    \qquad R = \sum_t R_t ,

a log-mean-exp (soft maximum) over the consecutive pairs' violations, τ the ``temperature``
(multiplying, as in the code; τ = 1 in all the paper's experiments).

**Sign** (see METHODS.md §4.3). The expected ordering is: a larger α_t (more weight on task t)
gives a smaller ℓ_t. ``direction="intuitive"`` (default, s = −1) penalises a pair in which the
sample with the larger α_t has the *larger* loss. ``direction="code"`` (s = +1) reproduces the
official code as written, which penalises the sample with the larger α_t having the *smaller*
loss, i.e. the expected ordering (a sign bug, or a convention the paper text would settle; the
PaLoRA refactor keeps it, divides by T − 1 instead of W − 1, and leaves the call commented out).

R = 0 exactly when every consecutive pair is ordered as the direction asks, and R > 0
otherwise. Ties in α_t keep the samples' order (stable sort). W = 1 gives R = 0. Gradients
flow through the losses only (the sort is a selection).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmtl._checks import check_choice, check_number

__all__ = ["DIRECTIONS", "ordering_regularizer"]

#: "intuitive": penalise larger α_t with larger ℓ_t; "code": the official code's sign.
DIRECTIONS = ("intuitive", "code")


def ordering_regularizer(alphas: Tensor, losses: Tensor, *, temperature: float = 1.0,
                         direction: str = "intuitive") -> Tensor:
    """R (a scalar, differentiable in ``losses``) for α samples (W, T) and losses (W, T)."""
    tau = check_number("temperature", temperature, low=0, low_open=True,
                       who="ordering_regularizer")
    check_choice("direction", direction, DIRECTIONS, who="ordering_regularizer")
    if alphas.dim() != 2 or losses.shape != alphas.shape:
        raise ValueError(f"ordering_regularizer: alphas and losses must both have shape (W, T), "
                         f"got {tuple(alphas.shape)} and {tuple(losses.shape)}")
    W = losses.shape[0]
    if W < 2:
        return losses.sum() * 0.0
    order = torch.argsort(alphas.detach().to(losses.device), dim=0, descending=True,
                          stable=True)
    ranked = losses.gather(0, order)  # column t: the losses by decreasing α_t
    step = ranked[1:] - ranked[:-1]  # ℓ^(k+1) − ℓ^(k)
    violation = torch.relu(-step if direction == "intuitive" else step) * tau
    top = violation.detach().amax(dim=0)  # ≥ 0; log-mean-exp stays exactly 0 when all are 0
    per_task = top + torch.log(torch.exp(violation - top).mean(dim=0))
    return per_task.sum()
