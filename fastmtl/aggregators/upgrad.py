r"""UPGrad: each gradient projected onto the dual cone of all of them, then averaged.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (arXiv:2406.16232),
the default aggregator of torchjd. With the normalised, regularised Gram

.. math::

    \tilde K = \begin{cases}
        K / \operatorname{tr} K & \operatorname{tr} K \ge \varepsilon_n
                                   \text{ and } \operatorname{tr} K > 0 \\
        0 & \text{otherwise} \end{cases} \; + \; \varepsilon_r I,

and a preference p (default p_i = 1/T), task i's projection of p_i g_i onto the dual cone
{x : Gx >= 0} is G̃ᵀv^(i) with (Proposition 1)

.. math::

    v^{(i)} = \arg\min_{v \ge p_i e_i} v^\top \tilde K v,\qquad
    w = \sum_i v^{(i)},\qquad d = G^\top w .

The T problems are solved together by ``fastmtl.solvers.dual_cone_projection`` (principal
pivoting: exact and finite on CPU; one Triton launch, one program per problem, on CUDA). The
weights apply to the raw rows of G, as in torchjd.

Guarantees. KKT of each problem: v^(i) >= p_i e_i and (K̃v^(i))_j >= 0 for every j, = 0 where
v^(i)_j > p_i δ_ij. Summing, when K is normalised, ⟨g_j, d⟩ = (Kw)_j >= −ε_r · tr(K) · w_j (the
regularisation is the only slack; the pivoting adds ~1e-12 relative), and w >= p. Without
conflict (K >= 0 entrywise) every v^(i) = p_i e_i: w = p exactly, d = the mean gradient.
T = 1: w = [1] (p = 1), so d = g itself, factor 1. K = 0 (or tr K < ε_n): w = p, the mean.
With the default ε_n = 0 the weights depend on K only through K / tr K: w(c²K) = w(K), so
d(cG) = c d(G) for every c > 0 (the paper's "linear under scaling").

Departures from torchjd's ``UPGrad()`` (``UPGradWeighting`` + ``QuadprogProjector(norm_eps=1e-4,
reg_eps=1e-4)``): the same problem and ε_r; torchjd solves the T QPs one by one with quadprog
on the host (float64) and raises if quadprog fails; here they are solved in one batch (float64)
with no host sync on CUDA. Weights agree with torchjd's to ~1e-12 (float64) whenever
tr K >= 1e-4. Below that torchjd's absolute threshold ε_n = 1e-4 replaces K by 0, i.e. UPGrad
silently becomes the mean for small gradients (common late in training, or in latent mode);
the default here is ε_n = 0 (normalise whenever tr K > 0; the paper has no threshold), and
``norm_eps=1e-4`` reproduces torchjd exactly. (torchjd with ε_n = 0 gives NaN for K = 0; here
K̃ = ε_r I then.) ``pref`` plays the part of torchjd's ``pref_vector``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastmtl._checks import check_int, check_number
from fastmtl.aggregators.base import Aggregator
from fastmtl.solvers.nnqp import dual_cone_projection, normalized_gram, upgrad_weights

__all__ = ["UPGrad"]


class UPGrad(Aggregator):
    """UPGrad weights (Quinton & Rey 2024): w = Σ_i argmin_{v >= p_i e_i} vᵀK̃v (module docstring).

    Args:
        pref: the preference p (T non-negative numbers), or None for the mean (1/T each).
        norm_eps: K is divided by tr K when tr K >= norm_eps (and > 0), else replaced by 0.
            Default 0: scale-equivariant; torchjd uses 1e-4 (module docstring).
        reg_eps: ridge added to the normalised Gram, making it positive definite (torchjd 1e-4).
        max_iter: pivot budget of the iterative CUDA solvers (default 4 T + 20; the CPU
            solver is exact).
        check: value checks of the inputs (see ``Aggregator``).
    """

    def __init__(self, pref: Sequence[float] | Tensor | None = None, norm_eps: float = 0.0,
                 reg_eps: float = 1e-4, max_iter: int | None = None, *,
                 check: bool | None = None) -> None:
        super().__init__(check=check)
        self.norm_eps = check_number("norm_eps", norm_eps, low=0.0)
        self.reg_eps = check_number("reg_eps", reg_eps, low=0.0)
        if self.reg_eps == 0:
            raise ValueError(f"reg_eps must be > 0 (it makes K̃ positive definite), got {reg_eps!r}")
        check_int("max_iter", max_iter, none_ok=True)
        self.max_iter = max_iter
        self.pref: Tensor | None = None
        if pref is not None:
            p = torch.as_tensor(pref, dtype=torch.float64).detach().cpu()
            if p.dim() != 1 or p.numel() < 1 or not bool(torch.isfinite(p).all()) \
                    or bool((p < 0).any()):
                raise ValueError(f"pref must be a 1-D sequence of finite numbers >= 0, "
                                 f"got {pref!r}")
            self.pref = p

    def _preference(self, K: Tensor) -> Tensor:
        T = K.shape[0]
        if self.pref is None:
            return torch.full((T,), 1.0 / T, dtype=torch.float64, device=K.device)
        if self.pref.numel() != T:
            raise ValueError(f"pref has {self.pref.numel()} entries but K is {T}×{T}")
        return self.pref.to(K.device)

    def normalized_gram(self, K: Tensor) -> Tensor:
        """K̃ (float64): K / tr K (0 when tr K < norm_eps or tr K = 0) + reg_eps · I."""
        return normalized_gram(K, self.norm_eps, self.reg_eps)

    def projections(self, K: Tensor) -> Tensor:
        """V (T, T) float64: row i is v^(i), the weights of task i's projection (w = V.sum(0))."""
        return dual_cone_projection(self.normalized_gram(K), torch.diag(self._preference(K)),
                                    self.max_iter)

    def _weights(self, K: Tensor, losses: Tensor | None) -> Tensor:
        w = upgrad_weights(K, self._preference(K), self.norm_eps, self.reg_eps, self.max_iter)
        return w.to(K.dtype)

    def __repr__(self) -> str:
        pref = None if self.pref is None else self.pref.tolist()
        return (f"UPGrad(pref={pref}, norm_eps={self.norm_eps}, reg_eps={self.reg_eps}, "
                f"max_iter={self.max_iter})")
