r"""MGDA: the min-norm element of the convex hull of the task gradients.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
(Algorithm 2; the multiple-gradient descent algorithm of Désidéri, 2012):

.. math::

    \alpha = \arg\min_{\alpha \in \Delta_T} \Big\| \sum_i \alpha_i \hat g_i \Big\|^2
           = \arg\min_{\alpha \in \Delta_T} \alpha^\top \tilde K \alpha,
    \qquad \hat g_i = g_i / D_{ii}, \qquad \tilde K = D^{-1} K D^{-1},

    d = \sum_i \alpha_i \hat g_i = G^\top w, \qquad w_i = \alpha_i / D_{ii},

with the optional gradient normalisation of the official code ("optional and not included in
the paper"): D = I ("none"), diag(‖g_i‖) ("l2"), diag(L_i) ("loss") or diag(L_i ‖g_i‖)
("loss+"), ‖g_i‖ = √K_ii. d is then a descent direction for every task: by the KKT conditions
of the QP, ⟨g_i, d⟩ = D_ii ⟨ĝ_i, d⟩ >= D_ii ‖d‖² >= 0, and d = 0 at a Pareto-stationary point.
The QP is solved by ``fastmtl.solvers.min_norm_simplex`` (exact active set on CPU; one
single-program Triton kernel, pairwise Frank–Wolfe, on CUDA). T = 1: w = 1/D_11 (the gradient
itself for "none", its normalisation otherwise).

Departures and conventions:

- torchjd's ``MGDA(epsilon=1e-3, max_iters=100)`` / ``MGDAWeighting``: the same QP on the raw
  Gramian ("none" only), solved by plain Frank–Wolfe (Algorithm 2's line search), stopping when
  the step size falls below epsilon; weights on the simplex, as here for "none". Here the QP is
  solved to the KKT tolerance ``tol`` (exactly on CPU), so weights agree up to torchjd's early
  stop.
- Sener & Koltun's code (and Kurin et al. 2022) normalise with "loss+" and use Frank–Wolfe with
  MAX_ITER = 250, STOP_CRIT = 1e-5 (change of α in ℓ1), starting at the best pair. LibMTL's
  default is "none". Both scale the losses by α: LibMTL applies α to the *normalised* gradients
  (folded into w here, ``fold_normalization=True``); Sener's official code back-propagates
  Σ α_i L_i, i.e. α on the raw gradients: ``fold_normalization=False`` gives w = α (with a
  normalisation, Σ α_i g_i then need not be a descent direction for every task).
- Zero norms and zero losses: D_ii is floored at ``eps`` · max_j D_jj (D = I if all are 0),
  so a zero gradient gets a finite weight and never a NaN. The loss normalisations use |L_i|
  (a negative loss must not flip its gradient); ``weights`` raises ``ValueError`` without
  losses.
"""

from __future__ import annotations

from torch import Tensor

from fastmtl._checks import check_bool, check_choice, check_int, check_number
from fastmtl.aggregators.base import Aggregator
from fastmtl.solvers import floor_scales, gradient_norms, min_norm_simplex, scaled_gram

__all__ = ["MGDA"]

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(Aggregator):
    """MGDA weights (Sener & Koltun 2018): w_i = α_i / D_ii with α the min-norm point of the
    simplex for the normalised Gram D⁻¹ K D⁻¹ (see the module docstring).

    Args:
        normalization: "none" (default, as torchjd and LibMTL), "l2", "loss" or "loss+".
        max_iter: step budget of the iterative solver on CUDA (the CPU solver is exact).
        tol: KKT tolerance, relative to the largest (normalised) squared gradient norm.
        eps: relative floor of the normaliser D (zero gradients, zero losses).
        fold_normalization: w = α / D (True, LibMTL) or w = α (False, Sener's official code).
        check: value checks of the inputs (see ``Aggregator``).
    """

    def __init__(self, normalization: str = "none", max_iter: int = 1000, tol: float = 1e-6,
                 eps: float = 1e-8, fold_normalization: bool = True, *,
                 check: bool | None = None) -> None:
        super().__init__(check=check)
        check_choice("normalization", normalization, _NORMALIZATIONS)
        check_int("max_iter", max_iter)
        check_number("tol", tol, low=0, bool_ok=True)
        check_number("eps", eps, low=0, high=1, low_open=True, high_open=True)
        check_bool("fold_normalization", fold_normalization)
        self.normalization = normalization
        self.max_iter = max_iter
        self.tol = float(tol)
        self.eps = float(eps)
        self.fold_normalization = fold_normalization
        self.requires_losses = normalization in ("loss", "loss+")

    def _normalizer(self, K: Tensor, losses: Tensor | None) -> Tensor:
        """D_ii before the floor: ‖g_i‖, |L_i| or |L_i| ‖g_i‖."""
        norms = gradient_norms(K)
        if self.normalization == "l2":
            return norms
        assert losses is not None
        if self.normalization == "loss":
            return losses.abs()
        return losses.abs() * norms

    def _weights(self, K: Tensor, losses: Tensor | None) -> Tensor:
        if self.normalization == "none":
            return min_norm_simplex(K, self.max_iter, self.tol)
        D = floor_scales(self._normalizer(K, losses), self.eps)
        alpha = min_norm_simplex(scaled_gram(K, D), self.max_iter, self.tol)
        return alpha / D if self.fold_normalization else alpha

    def __repr__(self) -> str:
        return (f"MGDA(normalization={self.normalization!r}, max_iter={self.max_iter}, "
                f"tol={self.tol}, eps={self.eps}, fold_normalization={self.fold_normalization})")
