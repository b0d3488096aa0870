r"""Nash-MTL: the Nash bargaining solution of the tasks, with the official code's norm clip.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as a
Bargaining Game", ICML 2022 (Algorithm 1): find α > 0 with

.. math::

    (K\alpha)_i = 1/\alpha_i \quad \forall i, \qquad d = \sum_i \alpha_i g_i = G^\top \alpha,

then, as the official code does with ``clip_grad_norm_(shared_parameters, max_norm)``, scale d
to norm at most ``max_norm``; the scaling is folded into the weights:

.. math::

    w = \alpha \cdot \min\!\Big(1, \frac{\text{max\_norm}}{\|d\|}\Big),\qquad
    \|d\| = \sqrt{\alpha^\top K \alpha} = \sqrt T \ \text{(at the solution)} .

α is recomputed every ``update_weights_every`` calls (the official default 1) and reused in
between (state: the last α; the clip is recomputed from the current K each call). α solves the
Nash equations regularised as (K + reg·diag K) α = 1/α (``fastmtl.solvers.nash_bargaining``:
damped Newton, ``max_iter`` = 25 steps by default, on device with no host sync), so that a
Pareto-stationary K (0 in the convex hull of the gradients: no solution exists) still gives
finite weights, and a zero gradient gets a large finite α_i (its row adds nothing to d).
T = 1: α = 1/‖g‖, so d = g/‖g‖ (unit norm, unchanged by max_norm >= 1): a positive multiple.
α is scale-equivariant per task (g_i → c g_i gives α_i → α_i/c), so d does not depend on the
gradient scales. d is a common descent direction: ⟨g_i, Gᵀα⟩ = (Kα)_i = 1/α_i − reg‖g_i‖²α_i > 0
(α̂_i = ‖g_i‖α_i < 1/√reg, which fails only when 0 is in the hull, up to reg).

Departures from the official code and torchjd's ``NashMTL(n_tasks, max_norm=1.0,
update_weights_every=1, optim_niter=20)``:

- They solve a sequence of ``optim_niter`` convex CCP problems with cvxpy/ECOS on the host,
  warm-started from the previous α, stopping when ‖Kα − 1/α‖ < 1e-3 (on K/‖K‖_F); here a
  damped Newton solve of the same equations to ~1e-10 in float64, cold-started each update (the
  weights depend on K only). Where the CCP solves the equations they agree to its tolerance
  (measured <= 3e-5 relative, torchjd 0.18). It often does not when the gradient norms span
  two decades: its linearised objective can leave a constraint α_i(Kα)_i >= 1 inactive, and it
  returns α with some α_i(Kα)_i of 4 to 600 (measured on about half of such random T = 5, 10
  problems); here the equations always hold (up to ``reg``).
- The clip: ``clip_grad_norm_`` divides by ‖d‖ + 1e-6, torchjd by ‖d‖; here by ‖d‖ (w = α
  when ‖d‖ = 0). ``max_norm <= 0`` (or inf) disables it, as in both.
- The regulariser (default 1e-6 relative to each gradient's squared norm) is new: the official
  code returns the previous α when the solver fails.
- Heads: the official code back-propagates Σ α_i L_i; ``fm.mtl_backward`` gives the heads
  their plain gradients. The weights here are what reaches the shared parameters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastmtl._checks import check_int, check_number
from fastmtl.aggregators.base import StatefulAggregator
from fastmtl.solvers.nash import nash_bargaining

__all__ = ["NashMTL"]


class NashMTL(StatefulAggregator):
    """Nash-MTL weights (Navon et al. 2022): α with (Kα)_i = 1/α_i, clipped so ‖Gᵀw‖ <= max_norm.

    Args:
        max_norm: largest norm of d = Gᵀw (official default 1.0); <= 0 or inf disables it.
        update_weights_every: recompute α every this many calls, reuse it in between.
        max_iter: Newton budget of the solver (25; the CPU solver stops once converged).
        reg: relative regulariser of the Nash equations (see the module docstring).
        check: value checks of the inputs (see ``Aggregator``).
    """

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1,
                 max_iter: int = 25, reg: float = 1e-6, *, check: bool | None = None) -> None:
        super().__init__(check=check)
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) \
                or math.isnan(max_norm):
            raise ValueError(f"max_norm must be a number (<= 0 disables the clip), "
                             f"got {max_norm!r}")
        check_int("update_weights_every", update_weights_every)
        check_int("max_iter", max_iter)
        check_number("reg", reg, low=0, high=1, low_open=True, high_open=True)
        self.max_norm = float(max_norm)
        self.update_weights_every = update_weights_every
        self.max_iter = max_iter
        self.reg = float(reg)

    def _init_state(self, K: Tensor) -> dict[str, Tensor]:
        return {"alpha": torch.ones(K.shape[0], dtype=K.dtype, device=K.device)}

    def _stateful_weights(self, K: Tensor, losses: Tensor | None,
                          state: dict[str, Tensor]) -> Tensor:
        if self.step % self.update_weights_every == 0:
            state["alpha"] = nash_bargaining(K, self.reg, self.max_iter).to(K.dtype)
        alpha = state["alpha"]
        if not 0 < self.max_norm < math.inf:
            return alpha.clone()
        a = alpha.double()
        norm = (a @ (K.double() @ a)).clamp_min(0.0).sqrt()
        scale = torch.where(norm > self.max_norm, self.max_norm / norm, 1.0)
        return (a * scale).to(K.dtype)

    def __repr__(self) -> str:
        return (f"NashMTL(max_norm={self.max_norm}, update_weights_every="
                f"{self.update_weights_every}, max_iter={self.max_iter}, reg={self.reg})")
