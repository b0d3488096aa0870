r"""The Armijo table of a backtracking line search and the choice of the step, on device.

Trial step sizes t_k = t_0 ρ^k (k < K, ρ = ``shrink``) are tested at once. For T tasks with
losses L_i at the current point, trial losses L_i(k) at step t_k and slopes s_i, the
sufficient-decrease margin is

.. math::

    \mathrm{crit}_{ki} = L_i(k) - L_i + c\, t_k\, s_i ,

where s_i = ⟨∇_z L_i, d⟩ (``armijo="latent"``, the multi-objective Armijo rule of Fliege &
Svaiter 2000 used by Filatov & Merkulov, arXiv:2110.00874, in latent space) or
s_i = ‖∇_{θ_i} L_i‖² (``armijo="head_grad_norm"``, the authors' code). Trial k passes when
crit_ki <= 0 for every task (``condition="all_tasks"``) or when the mean over tasks is <= 0
(``condition="mean"``: Armijo for the mean loss), and t_k >= ``min_step``. The accepted step
is the largest passing t_k, i.e. the first passing row (the t_k decrease): found with an
``argmax`` on device, without a host synchronisation. A NaN margin (a non-finite trial loss)
never passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ARMIJO", "CONDITIONS", "ON_FAILURE", "StepInfo", "armijo_margins", "passing",
           "select_step", "trial_steps"]

ARMIJO = ("latent", "head_grad_norm")
CONDITIONS = ("all_tasks", "mean")
ON_FAILURE = ("zero", "smallest", "raise")


@dataclass
class StepInfo:
    """What one ``step()`` did. Tensors stay on the device (reading one is a host sync).

    Attributes:
        losses_before: (T,) the task losses at the current point (before the step).
        losses_after: (T,) the losses at the accepted trial point (see each class for what
            that point is); ``losses_before`` when no step was taken; None for ``ConstantStep``.
        step_size: 0-d, the step t applied to the encoder and the heads (0 when none).
        trials: 0-d int64, the trials a sequential search evaluates to reach the decision
            (index of the accepted step + 1, or the number of valid trials on failure).
        accepted: 0-d bool, whether a trial passed the Armijo test.
        weights: (T,) the direction's weights w (d = Σ_i w_i g_i).
        slopes: (T,) the slopes s_i of the Armijo test (None for ``ConstantStep``).
        steps: (K,) the trial step sizes (None for ``ConstantStep``).
    """

    losses_before: Tensor
    losses_after: Tensor | None
    step_size: Tensor
    trials: Tensor
    accepted: Tensor
    weights: Tensor
    slopes: Tensor | None = None
    steps: Tensor | None = None


def trial_steps(t0: float | Tensor, shrink: float, K: int, device: torch.device,
                dtype: torch.dtype) -> Tensor:
    """t_k = t0 · shrink^k for k < K, in ``dtype`` on ``device`` (the powers computed there in
    float64: no host-to-device copy)."""
    powers = torch.pow(shrink, torch.arange(K, dtype=torch.float64, device=device))
    if isinstance(t0, Tensor):
        return (t0.to(torch.float64) * powers).to(dtype)
    return (t0 * powers).to(dtype)


def armijo_margins(trial: Tensor, ref: Tensor, slopes: Tensor, steps: Tensor,
                   c: float) -> Tensor:
    """crit (K, T) = trial − ref + c · t_k · s_i, in float64."""
    f64 = torch.float64
    return (trial.to(f64) - ref.to(f64) + c * steps.to(f64)[:, None] * slopes.to(f64)[None, :])


def passing(crit: Tensor, steps: Tensor, condition: str, min_step: float) -> Tensor:
    """(K,) bool: row k passes the test and t_k >= min_step (NaN never passes)."""
    ok = (crit <= 0).all(1) if condition == "all_tasks" else crit.mean(1) <= 0
    return ok & (steps >= min_step)


def select_step(ok: Tensor, steps: Tensor, trial: Tensor, ref: Tensor, min_step: float,
                on_failure: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(t, losses_after, trials, accepted) for the first passing row, all on device.

    No passing row: ``on_failure="zero"`` gives t = 0 and the reference losses, "smallest"
    the smallest valid step (t_k >= min_step) and its trial losses (t = 0 if none is valid);
    "raise" is handled by the caller (it needs the host to know).
    """
    accepted = ok.any()
    first = ok.to(torch.uint8).argmax()
    n_valid = (steps >= min_step).sum()
    zero = steps.new_zeros(())
    if on_failure == "smallest":
        last = (n_valid - 1).clamp_min(0)
        fail_t = torch.where(n_valid > 0, steps[last], zero)
        fail_losses = torch.where(n_valid > 0, trial[last].to(ref.dtype), ref)
    else:
        fail_t, fail_losses = zero, ref
    t = torch.where(accepted, steps[first], fail_t)
    after = torch.where(accepted, trial[first].to(ref.dtype), fail_losses)
    trials = torch.where(accepted, first + 1, n_valid).to(torch.int64)
    return t, after, trials, accepted
