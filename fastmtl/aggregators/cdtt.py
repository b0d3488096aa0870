r"""CDTT: the central (EDM) direction pulled toward each task by a convergence-driven tension.

Nakamura, Grassi Jr, Wolf, "Leveraging convergence behavior to balance conflicting tasks in
multi-task learning" ("task tensioners"), Neurocomputing 511:43–53, 2022 (arXiv:2204.06698);
as in the official code (tiemink/MTL_TaskTensioner) and Gama & Grassi's ``CDTT``
(Gabriel-SGama/UnitScal_vs_SMTOs, ``optimizers/task_tensioners.py``). Per step, n_i = ‖g_i‖:

1. central direction d* = Gᵀa, a the EDM coefficients (``solvers.central``);
2. history: the last ``window`` (10) norms of each task; ζ_i(t) = Σ of them;
3. δ_i = ζ_i(t)/ζ_i(t−1) + log10 ℓ_i, tension c_i = 1 − α + α σ(e(δ_i − 1)) ∈ (1 − α, 1];
4. v = d* + Σ_i c_i (g_i − d*)/‖g_i − d*‖;
5. for i = 1..T in order: if ⟨g_i, v⟩ < 0 (angle > 90°), v ← the point where the segment
   from g_i to v crosses the hyperplane ⟂ g_i.

Coefficient space (only K, the losses and the norm history; one combine at the end):

.. math::

    \|g_i - d^\ast\|^2 = K_{ii} - 2(Ka)_i + a^\top K a =: r_i^2,\qquad
    v = G^\top b,\quad b = a + \sum_i \frac{c_i}{r_i}(e_i - a),

    \text{step 5: } \langle g_i, v\rangle = (Kb)_i < 0 \;\Rightarrow\;
    b \leftarrow t\,b + (1 - t)\,e_i,\quad t = \frac{K_{ii}}{K_{ii} - (Kb)_i} \in (0, 1),

since the crossing point is (1 − t) g_i + t v with ⟨g_i, ·⟩ = 0. It equals the paper's
tan(π − ∠(g_i, v − g_i)) ‖g_i‖ w/‖w‖, w = v − ⟨v, g_i⟩g_i/‖g_i‖² (both are t w), and Gama's
coefficient update. The weights are w = b (w = a during the warm-up). Step 5 is one pass: a
later projection keeps ⟨g_k, v⟩ >= 0 for an earlier task k when ⟨g_k, g_i⟩ >= 0, so v conflicts
with no task when no two gradients conflict (and it never did for T = 2 in 20,000 random
trials); when g_k and g_i conflict and T >= 3, the projection for i can turn v against g_k
again (the paper's, and Gama's, single pass; not repeated here).

Warm-up: tensions start once the history holds ``window`` norms *and* a previous ζ exists,
i.e. on the (window + 1)-th recorded step (the 11th); before that w = a, the EDM direction.
The count lives on the device (the state's ``count``), not in ``self.step``, because, as in
Gama's code, a step with a zero gradient is not recorded (next point).

Degenerate inputs (finite output, no host synchronisation; every branch is a ``torch.where``):

- any n_i = 0: w = 0 for this step and the history is left untouched (Gama's guard).
- r_i ≈ 0 (g_i = d*, e.g. T = 1 or equal gradients): task i's tension is dropped (its unit
  vector is undefined; Gama's code divides by zero); "≈" is r_i² <= 16 ε (K_ii + aᵀKa), the
  cancellation noise of r_i² in the work dtype. T = 1 gives w = [1].
- ℓ_i <= 0: log10 uses max(ℓ_i, tiny), i.e. the smallest tension 1 − α (Gama's code gives
  −inf for ℓ = 0, the same tension, and NaN for ℓ < 0).

``weights`` needs the losses. The state (``norms`` (T, window), oldest first; ``count``) is on
K's device; ``state_dict()`` round-trips it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastmtl._checks import check_int, check_number
from fastmtl.aggregators.base import StatefulAggregator
from fastmtl.solvers.central import central_coefficients
from fastmtl.solvers.scaling import gradient_norms

__all__ = ["CDTT"]

_SLOPE = math.e  # the sigmoid slope, hard-coded in the official code
_NOISE = 16.0    # r_i² below _NOISE · ε · (K_ii + aᵀKa) counts as 0


def tensions(zeta: Tensor, zeta_prev: Tensor, losses: Tensor, alpha: float) -> Tensor:
    """c_i = 1 − α + α σ(e(δ_i − 1)), δ_i = ζ_i(t)/ζ_i(t−1) + log10 max(ℓ_i, tiny)."""
    tiny = torch.finfo(losses.dtype).tiny
    safe_prev = torch.where(zeta_prev > 0, zeta_prev, 1.0)
    delta = zeta / safe_prev + torch.log10(losses.clamp_min(tiny))
    return 1.0 - alpha + alpha * torch.sigmoid(_SLOPE * (delta - 1.0))


def tensioned_coefficients(K: Tensor, a: Tensor, c: Tensor) -> Tensor:
    """b with Gᵀb = v: the tensioned direction (step 4), then the non-conflict pass (step 5)."""
    T = K.shape[0]
    Ka = K @ a
    aKa = a @ Ka
    diag = K.diagonal()
    r2 = diag - 2.0 * Ka + aKa
    keep = r2 > _NOISE * torch.finfo(K.dtype).eps * (diag + aKa).abs()
    pull = torch.where(keep, c / torch.where(keep, r2, 1.0).sqrt(), 0.0)  # c_i / r_i
    b = a * (1.0 - pull.sum()) + pull
    eye = torch.eye(T, dtype=K.dtype, device=K.device)
    for i in range(T):
        kb = K[i] @ b
        conflict = kb < 0
        t = torch.where(conflict, diag[i] / torch.where(conflict, diag[i] - kb, 1.0), 1.0)
        b = t * b + (1.0 - t) * eye[i]
    return b


class CDTT(StatefulAggregator):
    """CDTT weights (Nakamura, Grassi Jr & Wolf 2022): the EDM direction plus task tensions
    driven by each task's gradient-norm history and loss (see the module docstring).

    Args:
        alpha: tension sensitivity α in [0, 1] (0.3, the official toy; 0: the EDM direction
            plus unit pulls, c_i = 1).
        window: length of the norm history (10, hard-coded in the official code), >= 1.
        max_iter, tol: the EDM simplex solver's (``min_norm_simplex``).
        eps: relative floor of the norms inside the EDM solve.
        check: value checks of the inputs (see ``Aggregator``).
    """

    requires_losses = True

    def __init__(self, alpha: float = 0.3, window: int = 10, max_iter: int = 1000,
                 tol: float = 1e-6, eps: float = 1e-8, *, check: bool | None = None) -> None:
        super().__init__(check=check)
        check_number("alpha", alpha, low=0, high=1)
        check_int("window", window)
        check_int("max_iter", max_iter)
        check_number("tol", tol, low=0, bool_ok=True)
        check_number("eps", eps, low=0, high=1, low_open=True, high_open=True)
        self.alpha = float(alpha)
        self.window = window
        self.max_iter = max_iter
        self.tol = float(tol)
        self.eps = float(eps)

    def _init_state(self, K: Tensor) -> dict[str, Tensor]:
        return {"norms": K.new_zeros(K.shape[0], self.window),
                "count": torch.zeros((), dtype=torch.int64, device=K.device)}

    def _stateful_weights(self, K: Tensor, losses: Tensor | None,
                          state: dict[str, Tensor]) -> Tensor:
        assert losses is not None
        work = K if K.dtype in (torch.float32, torch.float64) else K.float()
        norms = gradient_norms(work)
        valid = (norms != 0).all()  # NaN norms stay NaN: non-finite K gives NaN
        a = central_coefficients(work, self.max_iter, self.tol, self.eps)
        history, count = state["norms"].to(work.dtype), state["count"]
        new_history = torch.cat([history[:, 1:], norms[:, None]], dim=1)
        c = tensions(new_history.sum(1), history.sum(1), losses.to(work.dtype), self.alpha)
        b = tensioned_coefficients(work, a, c)
        w = torch.where(valid, torch.where(count >= self.window, b, a), 0.0)
        state["norms"].copy_(torch.where(valid, new_history, history))
        count.copy_(torch.where(valid, (count + 1).clamp_max(self.window + 1), count))
        return w.to(K.dtype)

    def __repr__(self) -> str:
        return (f"CDTT(alpha={self.alpha}, window={self.window}, max_iter={self.max_iter}, "
                f"tol={self.tol}, eps={self.eps})")
