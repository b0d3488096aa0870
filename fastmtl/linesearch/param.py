r"""Classical backtracking in parameter space: the baseline of Filatov & Merkulov
(arXiv:2110.00874; the "dp" mode of their code), with the interface of ``LatentBacktracking``.

One step: forward, per-task gradients of the encoder's parameters g_i = ∇_{θ_sh} L_i
(``fastmtl.engine.TaskGradients``), Gram K = G Gᵀ, w = ``direction.weights(K, L)``,
d_θ = Gᵀ w in the encoder's ``.grad`` and ∇_{θ_i} L_i in head i's. Trial k moves every
parameter, θ_sh − t_k d_θ and θ_i − t_k ∇_{θ_i} L_i, and **re-runs the encoder** and the heads
(one trial at a time: ``torch.func.functional_call`` at the trial parameters, under
``torch.no_grad``). Armijo test for every task:

.. math::

    L_i(\theta_{sh} - t_k d_\theta, \theta_i - t_k \nabla_{\theta_i} L_i)
    \le L_i - c\, t_k \langle \nabla_{\theta_{sh}} L_i, d_\theta \rangle \quad \forall i

(``armijo="latent"`` here means this parameter-space slope (K w)_i; "head_grad_norm" uses
‖∇_{θ_i} L_i‖² as in ``LatentBacktracking``). The largest passing t_k is applied to all
parameters. ``losses_after`` is the loss of the batch after the step (the accepted trial).
Modules with dropout or batch norm in training mode (encoder or heads) are run in eval mode for
the trials and for the reference losses of the test.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastmtl.linesearch.armijo import StepInfo
from fastmtl.linesearch.backtracking import Backtracking
from fastmtl.linesearch.heads import ModuleState, head_losses, mode_sensitive, trial_mode

__all__ = ["ParamBacktracking"]


class ParamBacktracking(Backtracking):
    """Armijo backtracking along the parameters (every trial re-runs the encoder).

    Same arguments as ``LatentBacktracking`` except ``batched`` (trials are sequential: each
    needs its own encoder forward). The trial steps are the same t_k = lr · shrink^k.
    """

    def step(self, x: object, targets: Sequence) -> StepInfo:
        """One training step on the batch (x, targets); returns a ``StepInfo``."""
        targets = self._check_targets(targets)
        L, K, w = self._param_pass(x, targets)
        slopes_p = K @ w
        self._check_descent(K, w, slopes_p, self.condition)
        enc = ModuleState(self.encoder)
        heads = [ModuleState(h) for h in self.heads]
        device = L.device
        slopes = slopes_p if self.armijo == "latent" else torch.stack(
            [h.sq_norm(device) for h in heads]).to(slopes_p.device)
        dtype = enc.params[0].dtype if enc.params else torch.float32
        steps = self._steps(device, torch.float64 if dtype == torch.float64 else torch.float32)
        modules = [self.encoder, *self.heads]
        sensitive = mode_sensitive(modules)

        def evaluate(step: Tensor) -> Tensor:  # (1, T) at one step (1,)
            z = enc.call(enc.at(step), x)
            return head_losses(heads, self.loss_fns, targets, z,
                               [h.at(step) for h in heads]).unsqueeze(0)

        with trial_mode(modules, sensitive):
            ref = evaluate(steps.new_zeros(1))[0].to(L.dtype) if sensitive else L
            table = self._search(evaluate, ref, slopes, steps, per_call=1)
        t, after, trials, accepted = self._decide(table, ref, slopes, steps)
        self._apply(t)
        return StepInfo(L, after, t, trials, accepted, w, slopes, steps)
