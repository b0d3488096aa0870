"""The backtracking loop shared by the latent and the parameter-space searches (not public).

Trial steps t_k = t0 · shrink^k, k < max_trials, with t0 = lr (or the warm start); each trial
k gives T losses; ``armijo`` decides. ``_search`` evaluates the trials in calls of ``m`` rows
(m = 1: the classical sequential search; m = K: all at once) and stops after the first call
with a passing row; every call after the first costs one host synchronisation (Python must
know whether to go on), and m >= K needs none (the decision stays on device). Every m fills
the same (K, T) table on the rows it evaluates (rows never evaluated are NaN and never pass),
so the decision is the same function of the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fastmtl._checks import check_bool, check_choice, check_int, check_number
from fastmtl.linesearch.armijo import (
    ARMIJO,
    CONDITIONS,
    ON_FAILURE,
    armijo_margins,
    passing,
    select_step,
    trial_steps,
)
from fastmtl.linesearch.base import LineSearchBase

__all__ = ["Backtracking"]


class Backtracking(LineSearchBase):
    """Constructor checks, trial steps, the sequential loop and the final decision."""

    def __init__(self, encoder: nn.Module, heads: Sequence[nn.Module],
                 loss_fns: Sequence[Callable], direction: object = None, lr: float = 0.1,
                 c: float = 1e-4, shrink: float = 0.5, max_trials: int = 10,
                 min_step: float = 1e-10, condition: str = "all_tasks", armijo: str = "latent",
                 warm_start: bool = False, on_failure: str = "zero", *,
                 optimizer: torch.optim.Optimizer | None = None, engine: str = "auto",
                 check: bool | None = None) -> None:
        super().__init__(encoder, heads, loss_fns, direction, lr, optimizer=optimizer,
                         engine=engine, check=check)
        self.c = check_number("c", c, low=0, high=1, high_open=True)
        self.shrink = check_number("shrink", shrink, low=0, high=1, low_open=True,
                                   high_open=True)
        self.max_trials = check_int("max_trials", max_trials)
        self.min_step = check_number("min_step", min_step, low=0)
        self.condition = check_choice("condition", condition, CONDITIONS)
        self.armijo = check_choice("armijo", armijo, ARMIJO)
        self.warm_start = check_bool("warm_start", warm_start)
        self.on_failure = check_choice("on_failure", on_failure, ON_FAILURE)
        self._t0: Tensor | None = None  # warm start: the next first trial step

    def reset(self) -> None:
        """Forget the warm start (the next step starts at lr again)."""
        self._t0 = None

    def _steps(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        t0 = self._t0 if (self.warm_start and self._t0 is not None) else self.lr
        return trial_steps(t0, self.shrink, self.max_trials, device, dtype)

    def _search(self, evaluate: Callable[[Tensor], Tensor], ref: Tensor, slopes: Tensor,
                steps: Tensor, per_call: int) -> Tensor:
        """(K, T) trial losses: ``evaluate(rows)`` -> (m, T) losses at the m steps ``rows``,
        called on steps[0:m], steps[m:2m], ... until a call holds a passing row (NaN after)."""
        K, T = steps.shape[0], ref.shape[0]
        if per_call >= K:  # one call, no host synchronisation
            return evaluate(steps).to(ref.dtype)
        table = torch.full((K, T), float("nan"), dtype=ref.dtype, device=ref.device)
        for start in range(0, K, per_call):
            rows = steps[start : start + per_call]
            if not bool(rows[0] >= self.min_step):  # host sync: the loop must know
                break
            block = table[start : start + per_call]
            block.copy_(evaluate(rows))
            crit = armijo_margins(block, ref, slopes, rows, self.c)
            if bool(passing(crit, rows, self.condition, self.min_step).any()):
                break
        return table

    def _decide(self, table: Tensor, ref: Tensor, slopes: Tensor, steps: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(t, losses_after, trials, accepted) on device; updates the warm start; raises for
        ``on_failure="raise"`` (a host sync, only then)."""
        crit = armijo_margins(table, ref, slopes, steps, self.c)
        ok = passing(crit, steps, self.condition, self.min_step)
        t, after, trials, accepted = select_step(ok, steps, table, ref, self.min_step,
                                                 self.on_failure)
        if self.on_failure == "raise" and not bool(accepted):
            raise RuntimeError(
                f"{type(self).__name__}: no trial step passed the Armijo test (steps "
                f"{steps.tolist()}, margins {crit.tolist()}); nothing was updated")
        if self.warm_start:
            lr = torch.full_like(t, self.lr)
            self._t0 = torch.where(accepted, torch.minimum(t / self.shrink, lr), lr)
        return t, after, trials, accepted
