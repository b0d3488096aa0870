r"""GradVac: raise each pair's gradient cosine to an EMA target instead of only to zero.

Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models", ICLR 2021 (Algorithm 1). For each task i,
visiting the other tasks j in a random order, with φ_ij = cos(g'_i, g_j) (g'_i the gradient of
task i as modified so far, g_j the *original* gradient of task j):

.. math::

    \text{if } \phi_{ij} < \hat\phi_{ij}:\quad
    g'_i \leftarrow g'_i + \frac{\|g'_i\|\big(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2}
        - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\big)}{\|g_j\|\sqrt{1-\hat\phi_{ij}^2}}\, g_j;
    \qquad \hat\phi_{ij} \leftarrow (1-\beta)\,\hat\phi_{ij} + \beta\,\phi_{ij};
    \qquad d = \sum_i g'_i,

which sets cos(g'_i, g_j) to exactly φ̂_ij when it was below. φ̂ starts at 0. With φ̂ ≡ 0 this
is PCGrad (``GradVac(beta=0)`` gives PCGrad's weights for the same seed: one loop,
``fastmtl.solvers.surgery``). Computed in coefficient space from K: g'_i = Σ_k C_ik g_k,
⟨g'_i, g_j⟩ = (C K)_ij, ‖g'_i‖² = (C K Cᵀ)_ii; w = Cᵀ1 ("sum") or Cᵀ1/T ("mean"); the
projected gradients are G' = C G (``return_projected=True``: ``agg(G)`` returns ``(d, G')``).
T − 1 sequential steps of batched T-vector ops, no host synchronisation. The state is the
T×T EMA φ̂ and the call counter of the random orders, on K's device (``state_dict()``
round-trips both). T = 1: w = [1].

Departures and conventions:

- The EMA is updated for every visited pair (i, j), with the cosine φ_ij measured *before*
  that pair's correction (torchjd; our reading of the paper's Algorithm 1, where the EMA line
  follows the ``if``, not verified against the PDF here). LibMTL's code (commit 13f5fc7)
  updates φ̂_ij only for pairs it corrects, so its targets can only decrease from 0.
- β = 0.01 as in the paper; LibMTL and torchjd default to β = 0.5.
- Whole-vector cosines (LibMTL's ``group_type=0``, "whole_model"). The paper, and LibMTL's
  other group types, keep one φ̂ per (i, j, layer/parameter group); for that, run one GradVac
  per group on that group's columns of G (each instance keeps its own EMA).
- LibMTL and torchjd add eps = 1e-8 to the denominators; here a pair with ‖g'_i‖‖g_j‖ = 0
  has φ := 0 and is not corrected (its EMA still moves toward 0, as theirs does), and an
  unattainable target φ̂ = ±1 is skipped: zero, duplicated or rank-deficient gradients give
  finite weights.
- Random orders: see ``fastmtl.aggregators.pcgrad`` (a hash of seed and call count, not
  torch's global RNG as in torchjd).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmtl._checks import check_number
from fastmtl.aggregators.pcgrad import SurgeryAggregator
from fastmtl.solvers.surgery import surgery_coefficients

__all__ = ["GradVac"]


class GradVac(SurgeryAggregator):
    """GradVac weights (Wang et al. 2021): w = Cᵀ1 with C the coefficients of the vaccinated
    gradients g'_i = Σ_k C_ik g_k (see the module docstring).

    Args:
        beta: EMA rate of the cosine targets φ̂, in [0, 1] (0.01, the paper's; 0 keeps φ̂ ≡ 0,
            i.e. PCGrad).
        seed: seed of the random visiting orders (None: drawn from torch's global RNG).
        reduction: "sum" (default, the paper) or "mean" of the modified gradients.
        return_projected: ``agg(G)`` returns ``(d, G')`` instead of d.
        check: value checks of the inputs (see ``Aggregator``).
    """

    def __init__(self, beta: float = 0.01, seed: int | None = None, reduction: str = "sum",
                 return_projected: bool = False, *, check: bool | None = None) -> None:
        check_number("beta", beta, low=0, high=1)
        super().__init__(seed, reduction, return_projected, check=check)
        self.beta = float(beta)

    def _init_state(self, K: Tensor) -> dict[str, Tensor]:
        state = super()._init_state(K)
        state["ema"] = torch.zeros_like(K)
        return state

    def _coefficients(self, K: Tensor, state: dict[str, Tensor]) -> Tensor:
        ema = state["ema"]
        C, phi = surgery_coefficients(K, self._orders(K, state), ema.to(K.dtype))
        off = ~torch.eye(K.shape[0], dtype=torch.bool, device=K.device)
        ema.copy_(torch.where(off, (1.0 - self.beta) * ema + self.beta * phi.to(ema.dtype), ema))
        return C

    def __repr__(self) -> str:
        return (f"GradVac(beta={self.beta}, seed={self.seed}, reduction={self.reduction!r}, "
                f"return_projected={self.return_projected})")
