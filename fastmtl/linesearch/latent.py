r"""Backtracking line search in latent space (Filatov & Merkulov, "Fast Line Search for
Multi-Task Learning", arXiv:2110.00874), with all trial steps evaluated at once.

One step, for an encoder z = f(x; θ_sh), heads h_i(z; θ_i) and losses L_i:

1. Forward z and the T losses; per-task latent gradients g_i = ∇_z L_i and the Gram
   K_z = G_z G_zᵀ (``fastmtl.engine.LatentGradients``, the MGDA-UB trick).
2. Direction in z: w = ``direction.weights(K_z, L)`` and d = Σ_i w_i g_i; then one backward
   pass pulls it back: θ_sh.grad = J_zᵀ d, θ_i.grad = ∇_{θ_i} L_i.
3. Trial steps t_k = t0 ρ^k, k < K (t0 = ``lr``, ρ = ``shrink``, K = ``max_trials``). Trial k
   moves z and the heads (as in the authors' code):

   .. math::

       z_k = z - t_k d, \qquad \theta_{i,k} = \theta_i - t_k \nabla_{\theta_i} L_i ,

   and re-runs only the heads, never the encoder. Armijo test, for every task
   (``condition="all_tasks"``; see ``armijo``):

   .. math::

       L_i(z_k; \theta_{i,k}) \le L_i(z; \theta_i) - c\, t_k\, \langle \nabla_z L_i, d\rangle
       \quad \forall i \qquad (\texttt{armijo="latent"}, \text{Fliege–Svaiter}),

   or with ‖∇_{θ_i} L_i‖² in place of ⟨∇_z L_i, d⟩ (``armijo="head_grad_norm"``, the code's
   rule). The accepted t is the largest passing t_k.
4. Step-size transfer (identity, as in the paper's code): θ_sh ← θ_sh − t J_zᵀ d and
   θ_i ← θ_i − t ∇_{θ_i} L_i (see ``LineSearchBase`` for ``optimizer=``).

``batched=True``: the K latent points are built by one ``fm.ops.trial_points`` call, the heads
run once on all of them (MLP heads as batched matmuls, any other head under one ``torch.vmap``
over their K stacked parameter sets, also built by ``trial_points``), and the K×T table and the
choice of t stay on device: no host sync unless ``on_failure="raise"`` or a value check needs
one. That costs K head forwards (all evaluated, even when the first passes) and memory for K
copies of z and of the heads' parameters. ``trials_per_call=m`` evaluates m trials per call and
stops after the first call holding a passing trial (one host sync per call after the first):
the default is all K on a GPU, where a sync costs more than K small head forwards, and
``CPU_TRIALS_PER_CALL`` on a CPU, where a sync is free and unneeded trials are not. The
sequential search (``batched=False``) is m = 1 through the plain modules: one head forward per
trial it needs plus a host sync per trial. A head that cannot be vmapped (an op without
a batching rule, data-dependent control flow) makes this object warn once and use the
sequential search for good. Every m evaluates the same trial points with the same arithmetic
and stops at the first pass, so it picks the same t (up to the rounding difference between a
batched and a plain forward of the heads).

Not in the paper (whose body was not available; see METHODS.md §1): the batched evaluation,
the "mean" condition, ``warm_start`` (first trial min(lr, t_prev/ρ), lr after a failure; the
code restarts at lr every step) and ``on_failure`` (the code stops at t <= 1e-10 and moves
anyway).

Choosing lr: the Armijo test guards the heads and the latent point, not the encoder, whose
step moves z by t J_z J_zᵀ d, which can be much more than t d. A t0 far above what the encoder
tolerates is then accepted anyway. On the LeNet benchmark (``fastmtl.bench.linesearch``,
batch 64) t0 = 2 blew the encoder up: every loss went back to ln 10 after about 150 steps and
stayed there. Parameter backtracking from the same t0 kept training (4–9 trials per step).
With t0 = 0.5 the latent search trained fastest of all the methods. Pick t0 like a constant
SGD learning rate at the upper end of the stable range: the search then cuts the steps that
would hurt the heads.

``losses_after`` is the loss at the accepted trial point (z − t d, θ_i − t∇θ_i): the
model the search used, not a re-run of the encoder after its step (θ_sh − t J_zᵀ d moves z to
z − t J_z J_zᵀ d, not to z − t d). Heads with dropout or batch norm in training mode are run
in eval mode for the trials, and then L_i(z) on the right-hand side is re-evaluated in eval
mode too (``losses_before`` stays the training-mode forward).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fastmtl._checks import check_bool, check_int
from fastmtl.linesearch.armijo import StepInfo
from fastmtl.linesearch.backtracking import Backtracking
from fastmtl.linesearch.heads import (
    ModuleState,
    batched_head_losses,
    head_losses,
    mode_sensitive,
    trial_mode,
)
from fastmtl.ops._common import acc_dtype
from fastmtl.ops.trial_points import trial_points

__all__ = ["CPU_TRIALS_PER_CALL", "LatentBacktracking"]

CPU_TRIALS_PER_CALL = 2


class LatentBacktracking(Backtracking):
    """Armijo backtracking along the latent representation z (see the module docstring).

    Args:
        encoder: the shared module, z = encoder(x) (one tensor).
        heads: T modules, head i maps z to task i's output.
        loss_fns: T callables, loss_fns[i](heads[i](z), targets[i]) -> scalar tensor.
        direction: an aggregator for the direction in z (default ``MGDA()``).
        lr: the first trial step t0 (and the update's scale, see ``optimizer``). Keep it
            a step the encoder tolerates: the test sees the heads along z − t d, not the
            encoder's own move (see "Choosing lr" above).
        c: Armijo constant in [0, 1) (1e-4, the textbook value; the paper's is unknown).
        shrink: ρ in (0, 1), t_{k+1} = ρ t_k (0.5 in the code).
        max_trials: K >= 1 trial steps.
        min_step: trial steps below it are not tried (1e-10 in the code).
        condition: "all_tasks" (every task's Armijo test) or "mean" (the mean loss's).
        armijo: "latent" (⟨∇_z L_i, d⟩) or "head_grad_norm" (‖∇_{θ_i} L_i‖², the code's).
        batched: evaluate the trials in batched calls (all heads, several trials per call).
        trials_per_call: trials per batched call; the search stops after the first call
            with a passing trial (a host sync per extra call). Default: all K in one call
            (no sync) on a GPU, ``CPU_TRIALS_PER_CALL`` on a CPU.
        warm_start: start at min(lr, t_prev / shrink) instead of lr.
        on_failure: no trial passed: "zero" (no update, default), "smallest" (take the
            smallest trial step) or "raise" (``RuntimeError``, after a host sync).
        optimizer: apply the step through this optimizer (see ``LineSearchBase``).
        engine: the latent engine's mode ("auto", "loop", "vmap").
        check: read values back for checks (finite losses, descent direction): default on
            CPU only. A non-finite loss is a ``ValueError`` when checked; unchecked, its
            margins are NaN, no trial passes and ``on_failure`` decides.
    """

    def __init__(self, encoder: nn.Module, heads: Sequence[nn.Module],
                 loss_fns: Sequence[Callable], direction: object = None, lr: float = 0.1,
                 c: float = 1e-4, shrink: float = 0.5, max_trials: int = 10,
                 min_step: float = 1e-10, condition: str = "all_tasks", armijo: str = "latent",
                 batched: bool = True, warm_start: bool = False, on_failure: str = "zero", *,
                 trials_per_call: int | None = None,
                 optimizer: torch.optim.Optimizer | None = None, engine: str = "auto",
                 check: bool | None = None) -> None:
        super().__init__(encoder, heads, loss_fns, direction, lr, c, shrink, max_trials,
                         min_step, condition, armijo, warm_start, on_failure,
                         optimizer=optimizer, engine=engine, check=check)
        self.batched = check_bool("batched", batched)
        self.trials_per_call = check_int("trials_per_call", trials_per_call, none_ok=True)
        self._vmap_ok: bool | None = None  # None: untried; False: fell back for good

    def step(self, x: object, targets: Sequence) -> StepInfo:
        """One training step on the batch (x, targets); returns a ``StepInfo``."""
        targets = self._check_targets(targets)
        z, L, K, w, d = self._latent_pass(x, targets)
        slopes_z = K @ w
        self._check_descent(K, w, slopes_z, self.condition)
        heads = [ModuleState(h) for h in self.heads]
        slopes = slopes_z if self.armijo == "latent" else torch.stack(
            [h.sq_norm(z.device) for h in heads]).to(slopes_z.device)
        steps = self._steps(z.device, acc_dtype(z.dtype))
        sensitive = mode_sensitive(self.heads)
        with trial_mode(self.heads, sensitive):
            ref = L
            if sensitive:  # both sides of the test in eval mode
                ref = head_losses(heads, self.loss_fns, targets, z,
                                  [dict(zip(h.names, h.params)) for h in heads]).to(L.dtype)
            table = None
            if self.batched and self._vmap_ok is not False:
                table = self._batched(heads, targets, z, d, ref, slopes, steps)
            if table is None:
                table = self._search(
                    lambda step: head_losses(heads, self.loss_fns, targets,
                                             trial_points(z, d, step)[0],
                                             [h.at(step) for h in heads]).unsqueeze(0),
                    ref, slopes, steps, per_call=1)
        t, after, trials, accepted = self._decide(table, ref, slopes, steps)
        self._apply(t)
        return StepInfo(L, after, t, trials, accepted, w, slopes, steps)

    def _per_call(self, device: torch.device) -> int:
        """Trials per batched call: ``trials_per_call``, or all K off the CPU (no host sync)
        and ``CPU_TRIALS_PER_CALL`` on it (a sync is free there, evaluating unneeded trials
        is not)."""
        if self.trials_per_call is not None:
            return self.trials_per_call
        return CPU_TRIALS_PER_CALL if device.type == "cpu" else self.max_trials

    def _batched(self, heads: list[ModuleState], targets: Sequence, z: Tensor, d: Tensor,
                 ref: Tensor, slopes: Tensor, steps: Tensor) -> Tensor | None:
        """(K, T) trial losses from batched calls over the trials (all heads inside each),
        or None after falling back to the sequential search."""

        def evaluate(rows: Tensor) -> Tensor:
            return batched_head_losses(heads, self.loss_fns, targets,
                                       trial_points(z, d, rows), rows)

        try:
            table = self._search(evaluate, ref, slopes, steps, self._per_call(z.device))
        except Exception as exc:  # torch raises various types for unsupported vmap
            if self._vmap_ok:
                raise
            warnings.warn(f"fastmtl: LatentBacktracking(batched=True) falls back to sequential "
                          f"trials for good: the heads cannot be vmapped ({exc})",
                          RuntimeWarning, stacklevel=3)
            self._vmap_ok = False
            return None
        self._vmap_ok = True
        return table
