r"""EDM: the equiangular direction, the min-norm point of the normalised gradients rescaled.

Katrutsa, Merkulov, Tursynbek & Oseledets, "Follow the bisector: a simple method for
multi-objective optimization", arXiv:2007.06937 (2020):

.. math::

    u_i = \frac{g_i}{\|g_i\|},\qquad
    \alpha = \arg\min_{\alpha \in \Delta_T} \Big\| \sum_i \alpha_i u_i \Big\|^2,\qquad
    \gamma = \Big(\sum_i \frac{\alpha_i}{\|g_i\|}\Big)^{-1},\qquad
    d = \gamma \sum_i \alpha_i u_i = G^\top w,\quad w_i = \frac{\gamma\,\alpha_i}{\|g_i\|}.

w lies on the simplex (Σ w_i = 1, w >= 0): d is a convex combination of the raw gradients. By
the KKT conditions of the min-norm problem ⟨u_i, Σ α_j u_j⟩ >= ‖Σ α_j u_j‖² with equality
where α_i > 0, so d makes the same angle with every g_i in the support (all of them when α is
interior: the "bisector") and a no-larger angle with the others: a common descent direction.
For T = 2, d = (1/‖g_1‖ + 1/‖g_2‖)⁻¹ (u_1 + u_2). T = 1: w = 1, d = g (γ = ‖g‖).

Scaling: w is invariant under G → cG (d scales with G), and under g_i → c_i g_i only α and the
angles are (the lengths of the gradients set γ). The min-norm problem is solved on the scaled
Gram (min ‖g‖)² U Uᵀ by ``fastmtl.solvers.min_norm_simplex`` (exact on CPU; the single-program
Triton kernel on CUDA, so EDM costs one kernel plus a few elementwise ops there).

Zero gradients: ‖g_i‖ is floored at ``eps`` · max_j ‖g_j‖ (``floor_scales``), so a zero
gradient has u_i = 0: it is in the hull, α = e_i, and w = e_i, d = 0 (with several zero
gradients w is spread over them). That is Gama & Grassi's guard in CDTT ("if any ‖g_i‖ = 0, no
shared update this step"), and it is the limit of EDM as ‖g_i‖ → 0 (γ → 0), so the weights are
continuous there. All-zero K gives w = 1/T. Duplicated or parallel gradients share α.

Departures: torchjd and LibMTL have no EDM. The CDTT reference code (Gama & Grassi) solves the
same QP by Frank–Wolfe on the normalised gradients and applies γ as here.
"""

from __future__ import annotations

from torch import Tensor

from fastmtl._checks import check_int, check_number
from fastmtl.aggregators.base import Aggregator
from fastmtl.solvers.central import central_coefficients

__all__ = ["EDM"]


class EDM(Aggregator):
    """EDM weights (Katrutsa et al. 2020): w_i = γ α_i / ‖g_i‖ with α the min-norm point of the
    normalised gradients and γ = 1 / Σ α_i/‖g_i‖ (see the module docstring); Σ w = 1.

    Args:
        max_iter: step budget of the iterative simplex solver on CUDA (the CPU one is exact).
        tol: its KKT tolerance, relative to ‖Σ α_i u_i‖².
        eps: relative floor of the gradient norms (zero gradients, see above).
        check: value checks of the inputs (see ``Aggregator``).
    """

    def __init__(self, max_iter: int = 1000, tol: float = 1e-6, eps: float = 1e-8, *,
                 check: bool | None = None) -> None:
        super().__init__(check=check)
        check_int("max_iter", max_iter)
        check_number("tol", tol, low=0, bool_ok=True)
        check_number("eps", eps, low=0, high=1, low_open=True, high_open=True)
        self.max_iter = max_iter
        self.tol = float(tol)
        self.eps = float(eps)

    def _weights(self, K: Tensor, losses: Tensor | None) -> Tensor:
        # Σ α_i / D_i >= α_i / D_i > 0 for the largest α_i: never 0/0
        return central_coefficients(K, self.max_iter, self.tol, self.eps)

    def __repr__(self) -> str:
        return f"EDM(max_iter={self.max_iter}, tol={self.tol}, eps={self.eps})"
