r"""The central direction of EDM (Katrutsa, Merkulov, Tursynbek, Oseledets 2020), from K.

With n_i = ‖g_i‖ = √K_ii and u_i = g_i / n_i:

.. math::

    \alpha = \arg\min_{\alpha \in \Delta_T} \Big\|\sum_i \alpha_i u_i\Big\|^2,\qquad
    d^\ast = \gamma \sum_i \alpha_i u_i,\quad \gamma = \Big(\sum_i \alpha_i / n_i\Big)^{-1},

so d* = Gᵀa with a_i = γ α_i / n_i: the coefficients a = r / Σ r, r = α / n, sum to 1. d* makes
equal angles with every g_i when α is interior (for T = 2, d* = (u_1 + u_2)/(1/n_1 + 1/n_2)).
The QP is MGDA's on the normalised Gram (``min_norm_simplex`` on ``scaled_gram``). Zero norms
are floored at ``eps`` · max_j n_j (``floor_scales``): a zero gradient is a zero u_i, so the
hull contains 0 and d* = 0; never a NaN. T = 1: a = [1], d* = g_1.
"""

from __future__ import annotations

from torch import Tensor

from fastmtl.solvers.scaling import floor_scales, gradient_norms, scaled_gram
from fastmtl.solvers.simplex import min_norm_simplex

__all__ = ["central_coefficients"]


def central_coefficients(K: Tensor, max_iter: int = 1000, tol: float = 1e-6,
                         eps: float = 1e-8) -> Tensor:
    """a (T,) with d* = Gᵀa the EDM central direction (module docstring); Σ a_i = 1.

    ``max_iter``/``tol``: the simplex solver's (``min_norm_simplex``); ``eps``: the relative
    floor of the norms. No host synchronisation.
    """
    D = floor_scales(gradient_norms(K), eps)
    alpha = min_norm_simplex(scaled_gram(K, D), max_iter, tol)
    r = alpha / D
    return r / r.sum()
