r"""CAGrad: the best worst-task improvement in a ball around the average gradient.

Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021 (Algorithm 1): d maximises min_i ⟨g_i, d⟩ subject to ‖d − g0‖ <= √φ, with
g0 = (1/T) Σ g_i and φ = c²‖g0‖². Through its dual,

.. math::

    w^\star = \arg\min_{w \in \Delta_T} g_w^\top g_0 + \sqrt\phi\,\|g_w\|,\qquad
    d = \frac{1}{\rho}\Big(g_0 + \frac{\sqrt\phi}{\|g_{w^\star}\|}\, g_{w^\star}\Big)
      = G^\top w,\qquad
    w = \frac{1}{\rho}\Big(\frac{1}{T}\mathbf 1 + \frac{\sqrt\phi}{\|g_{w^\star}\|} w^\star\Big),

g_w = Gᵀw, all from K (g_wᵀg0 = wᵀK1/T, ‖g_w‖² = wᵀKw, ‖g0‖² = 1ᵀK1/T²), and the
official code's ``rescale``: ρ = 1 + c² (1, its default), 1 (0) or 1 + c (2). The inner problem
is solved by ``fastmtl.solvers.cagrad.cagrad_simplex`` (a root search over simplex min-norm
solves, in float64: exact Wolfe solves on CPU, ending early, ~2 ms at T = 10; ONE
single-program Triton kernel for the whole search on CUDA, no host sync).
T = 1: d = (1 + c)/ρ · g (= (1 + c)/(1 + c²) g by default). c = 0: d = g0. w is
invariant under G → cG (d scales with G).

Degenerate cases: if g0 = 0 (φ = 0), d = g0 = 0 (w = 1/(Tρ)). If ‖g_w⋆‖ <= ``norm_eps`` ·
‖G‖_F (= √tr K), the gradients are (nearly) Pareto-stationary and g_w⋆/‖g_w⋆‖ is undefined:
w = 0, d = 0, torchjd's convention (a solution of the max-min problem whenever c >= 1; for
c < 1 this case is not generic).

Departures and conventions:

- Official code (Cranial-XIX/CAGrad, ``cagrad(grads, alpha=0.5, rescale=1)``; its NYUv2 runs use
  alpha = c = 0.4, the default here): scipy SLSQP from w = 1/T on the same objective, with
  absolute epsilons (√(‖g0‖² + 1e-8), c‖g0‖ + 1e-8, √(wᵀKw + 1e-8), ‖g_w‖ + 1e-8) that make
  tiny gradients behave differently; here the problem is solved to ~1e-12 and guarded
  relatively. LibMTL (calpha = 0.5, rescale = 1) is the same.
- torchjd's ``CAGrad(c)``: CLARABEL (cvxpy) on the trace-normalised Gram, *no rescale*
  (``rescale=0`` here) and w = 0 when ‖g_w‖ < norm_eps √tr K (and when tr K < norm_eps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmtl._checks import check_int, check_number
from fastmtl.aggregators.base import Aggregator
from fastmtl.solvers.cagrad import cagrad_simplex

__all__ = ["CAGrad"]


class CAGrad(Aggregator):
    """CAGrad weights (Liu et al. 2021): w = (1/T + (√φ/‖g_w⋆‖) w⋆)/ρ (see the module
    docstring).

    Args:
        c: radius of the ball around g0, in units of ‖g0‖ (the paper's c; "alpha" in the code).
        rescale: 0 (none, as torchjd), 1 (divide by 1 + c², the official default) or
            2 (divide by 1 + c).
        steps: root-search steps of the inner solver (each one simplex min-norm solve).
        max_iter: step budget of the iterative simplex solver on CUDA (CPU: exact).
        tol: its KKT tolerance.
        norm_eps: ‖g_w⋆‖ below ``norm_eps`` · √tr K counts as zero (w = 0, see above).
        check: value checks of the inputs (see ``Aggregator``).
    """

    def __init__(self, c: float = 0.4, rescale: int = 1, steps: int = 24, max_iter: int = 1000,
                 tol: float = 1e-6, norm_eps: float = 1e-4, *,
                 check: bool | None = None) -> None:
        super().__init__(check=check)
        self.c = check_number("c", c, low=0)
        if rescale not in (0, 1, 2) or isinstance(rescale, bool):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        self.rescale = rescale
        self.steps = check_int("steps", steps, 0)
        self.max_iter = check_int("max_iter", max_iter)
        self.tol = check_number("tol", tol, low=0)
        self.norm_eps = check_number("norm_eps", norm_eps, low=0)

    def _weights(self, K: Tensor, losses: Tensor | None) -> Tensor:
        T = K.shape[0]
        w_star = cagrad_simplex(K, self.c, self.steps, self.max_iter, self.tol).double()
        K64 = K.double()
        g0 = (K64.sum() / (T * T)).clamp_min(0.0).sqrt()
        sqrt_phi = self.c * g0
        norm = (w_star @ K64 @ w_star).clamp_min(0.0).sqrt()
        stationary = norm <= self.norm_eps * K64.diagonal().sum().clamp_min(0.0).sqrt()
        ratio = torch.where(sqrt_phi > 0, sqrt_phi / torch.where(stationary, 1.0, norm), 0.0)
        w = 1.0 / T + ratio * w_star
        w = torch.where(stationary & (sqrt_phi > 0), 0.0, w)
        rho = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return (w / rho).to(K.dtype)

    def __repr__(self) -> str:
        return (f"CAGrad(c={self.c}, rescale={self.rescale}, steps={self.steps}, "
                f"max_iter={self.max_iter}, tol={self.tol}, norm_eps={self.norm_eps})")
