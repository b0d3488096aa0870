r"""IMTL-G: the direction with equal cosines to every task gradient.

Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
ICLR 2021 (the gradient part, IMTL-G): with u_i = g_i/‖g_i‖,
D = [g_1 − g_2, …, g_1 − g_T] and U = [u_1 − u_2, …, u_1 − u_T],

.. math::

    \alpha_{2..T} = g_1^\top U (D^\top U)^{-1}, \qquad \alpha_1 = 1 - \sum_{i \ge 2} \alpha_i,
    \qquad d = \sum_i \alpha_i g_i,

i.e. the d = Gᵀα with Σ α = 1 whose projections on the unit vectors are equal,
⟨d, u_i⟩ = ⟨d, u_j⟩. Equivalently (the form used here, all from K): with β = (U Uᵀ)⁻¹ 1 the
coefficients of the equal-angle direction x = Uᵀβ (⟨x, u_i⟩ = 1 for all i),

.. math::

    w_i = \frac{\beta_i / \|g_i\|}{\sum_j \beta_j / \|g_j\|},\qquad
    d = G^\top w = \frac{x}{\sum_j \beta_j / \|g_j\|},

so cos(d, g_i) is the same for every i. The weights may be negative, and for T >= 3 the sum
Σ β_j/‖g_j‖ may be negative (the formula then gives the equal-angle direction of *ascent*,
⟨d, g_i⟩ < 0 for all i: that is the paper's α, kept as it is, as torchjd and LibMTL do).

Rank-deficient U Uᵀ (T > N, duplicated or parallel gradients): (U Uᵀ)⁻¹ becomes the
pseudo-inverse (eigenvalues above T·ε·λ_max kept, ``kept_eigenvalues``), so x is the minimum-norm
least-squares solution of U x = 1: duplicated gradients share their weight equally, and for
T > N the cosines are as equal as least squares makes them. A zero gradient (u_i = 0, norm
floored as in ``floor_scales``) gets w_i = 0 and the others are balanced among themselves. If
|Σ β_j/‖g_j‖| <= T·ε · Σ |β_j|/‖g_j‖ (no direction with Σ α = 1 exists) the weights are 0.
T = 1: w = 1 (d = g). w is invariant under G → cG (d scales with G) and under g_i → c_i g_i
only the angles are.

The pseudo-inverse comes from ``fastmtl.solvers.eigh.symmetric_eigh`` of the unit-diagonal
Gram (LAPACK on CPU; on CUDA one single-program Triton Jacobi kernel, no host sync, where
``torch.linalg.solve``/``pinv`` would synchronise): one kernel plus a few small ops.

Departures: torchjd's ``IMTLG`` computes v = K⁺ √diag(K) and w = v/Σv (zero if |Σv| < 1e-12):
for invertible K, or duplicated rows, exactly the weights here. For T > N the pseudo-inverses
of K and of U Uᵀ differ (the least-squares problems are weighted differently); the one here is
scale-free per task. LibMTL inverts Dᵀ U as in the paper (which fails when it is singular).
Kurin et al. (2022) add 1e-6·I before inverting.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmtl._checks import check_int, check_number
from fastmtl.aggregators.base import Aggregator
from fastmtl.solvers.eigh import MAX_SWEEPS, kept_eigenvalues, symmetric_eigh
from fastmtl.solvers.scaling import floor_scales, gradient_norms, scaled_gram

__all__ = ["IMTLG"]


class IMTLG(Aggregator):
    """IMTL-G weights (Liu et al. 2021): the d = Gᵀw, Σ w = 1, with equal cosines to all g_i
    (see the module docstring).

    Args:
        eps: relative floor of the gradient norms (zero gradients get weight 0).
        max_sweeps: Jacobi sweep budget of the eigendecomposition on CUDA.
        check: value checks of the inputs (see ``Aggregator``).
    """

    def __init__(self, eps: float = 1e-8, max_sweeps: int = MAX_SWEEPS, *,
                 check: bool | None = None) -> None:
        super().__init__(check=check)
        check_number("eps", eps, low=0, high=1, low_open=True, high_open=True)
        check_int("max_sweeps", max_sweeps)
        self.eps = float(eps)
        self.max_sweeps = max_sweeps

    def _weights(self, K: Tensor, losses: Tensor | None) -> Tensor:
        norms = gradient_norms(K)
        D = floor_scales(norms, self.eps)
        lam, V = symmetric_eigh(scaled_gram(K, D), self.max_sweeps)
        keep = kept_eigenvalues(lam)
        inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
        beta = V @ (inv * V.sum(0))  # (U Uᵀ)⁺ 1, up to the positive factor of scaled_gram
        v = torch.where(norms > 0, beta / D.to(beta.dtype), 0.0)  # exactly 0 on zero rows
        total = v.sum()
        T = K.shape[0]
        ok = total.abs() > T * torch.finfo(v.dtype).eps * v.abs().sum()
        w = torch.where(ok, v / torch.where(ok, total, 1.0), 0.0)
        w = w + 0.0 * (total + lam.sum())  # non-finite K: NaN (never a finite answer)
        return w.to(K.dtype)

    def __repr__(self) -> str:
        return f"IMTLG(eps={self.eps}, max_sweeps={self.max_sweeps})"
