r"""PCGrad: project each task gradient onto the normal plane of the gradients it conflicts with.

Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning",
NeurIPS 2020 (Algorithm 1). For each task i, visiting the other tasks j in a random order:

.. math::

    g'_i \leftarrow g_i;\qquad
    \text{if } \langle g'_i, g_j\rangle < 0:\quad
    g'_i \leftarrow g'_i - \frac{\langle g'_i, g_j\rangle}{\|g_j\|^2}\, g_j;\qquad
    d = \sum_i g'_i \ \ (\text{"sum"}) \ \text{ or } \ \tfrac1T \sum_i g'_i \ \ (\text{"mean"}),

always against the *original* g_j. Computed in coefficient space from K
(``fastmtl.solvers.surgery``): g'_i = Σ_k C_ik g_k, ⟨g'_i, g_j⟩ = (C K)_ij, so the weights on
the raw rows are w = Cᵀ1 (Cᵀ1/T for "mean"), and the projected gradients are G' = C G. The
T − 1 sequential steps are each a handful of batched T-vector ops; no host synchronisation.
T = 1: w = [1], the gradient itself.

Random orders: a counter-based hash of (seed, call count), see ``task_orders``; the call count
is a device tensor in the state, so the orders are reproducible with ``seed=``, survive
``state_dict()``/``load_state_dict()``, are identical on CPU and CUDA, and trace under
``torch.compile`` (a ``torch.Generator`` does not). ``seed=None`` draws the seed from torch's
global RNG at construction (so ``torch.manual_seed`` before construction fixes it).
``reset()`` restarts the order stream.

``return_projected=True``: ``agg(G)`` returns ``(d, G')`` with G' = C G (T, N) the projected
per-task gradients (``fm.ops.project``), instead of d alone; ``weights`` is unchanged.

Departures and conventions:

- torchjd's ``PCGrad``/``PCGradWeighting``: the same Gramian-space algorithm, "sum", run on
  the CPU with one ``torch.randperm`` per task from the global RNG (a host loop with a
  data-dependent branch per pair). Same weights for the same orders.
- LibMTL and the popular PyTorch port (WeiChengTseng/Pytorch-PCGrad) work on explicit
  gradients and shuffle all T tasks, i itself included (a no-op unless g'_i has turned against
  its own original gradient); the port's default reduction is "mean". LibMTL adds 1e-8 to
  ‖g_j‖²; here a zero g_j is skipped instead (below).
- A zero gradient g_j (K_jj = 0) has no normal plane: it is skipped, never a NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmtl import ops
from fastmtl._checks import check_bool, check_choice, check_seed
from fastmtl.aggregators.base import LossesLike, StatefulAggregator, check_gram, check_losses
from fastmtl.solvers.surgery import surgery_coefficients, task_orders

__all__ = ["PCGrad"]

_REDUCTIONS = ("sum", "mean")


def _work(K: Tensor) -> Tensor:
    return K if K.dtype in (torch.float32, torch.float64) else K.float()


class SurgeryAggregator(StatefulAggregator):
    """Shared plumbing of PCGrad and GradVac: seeded random orders, the reduction, the
    coefficient matrix C and ``return_projected``. Subclasses implement ``_coefficients``."""

    def __init__(self, seed: int | None = None, reduction: str = "sum",
                 return_projected: bool = False, *, check: bool | None = None) -> None:
        super().__init__(check=check)
        seed = check_seed(seed)
        check_choice("reduction", reduction, _REDUCTIONS)
        check_bool("return_projected", return_projected)
        self.seed = seed
        self.reduction = reduction
        self.return_projected = return_projected

    def _init_state(self, K: Tensor) -> dict[str, Tensor]:
        return {"counter": torch.zeros((), dtype=torch.int64, device=K.device)}

    def _orders(self, K: Tensor, state: dict[str, Tensor]) -> Tensor:
        orders = task_orders(K.shape[0], self.seed, state["counter"])
        state["counter"].add_(1)
        return orders

    def _coefficients(self, K: Tensor, state: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _stateful_weights(self, K: Tensor, losses: Tensor | None,
                          state: dict[str, Tensor]) -> Tensor:
        C = self._coefficients(_work(K), state)
        w = C.sum(0) if self.reduction == "sum" else C.mean(0)
        return w.to(K.dtype)

    def coefficients(self, K: Tensor, losses: LossesLike = None) -> Tensor:
        """C (T, T): row i holds the coefficients of the modified gradient g'_i on the rows of
        G (G' = C G). Advances the state like ``weights`` (w = Cᵀ1, or Cᵀ1/T for "mean")."""
        K = check_gram(K, self.check)
        check_losses(losses, K, self.check)
        C = self._coefficients(_work(K), self._state_for(K)).to(K.dtype)
        self.step += 1
        return C

    def __call__(self, G: Tensor, losses: LossesLike = None) -> Tensor | tuple[Tensor, Tensor]:
        """d = Gᵀ w (N,); with ``return_projected=True`` the pair (d, G') with G' = C G (T, N)."""
        if not self.return_projected:
            return super().__call__(G, losses)
        C = self.coefficients(ops.gram(G), losses)
        w = C.sum(0) if self.reduction == "sum" else C.mean(0)
        return ops.combine(w, G), ops.project(C, G)


class PCGrad(SurgeryAggregator):
    """PCGrad weights (Yu et al. 2020): w = Cᵀ1 with C the coefficients of the projected
    gradients g'_i = Σ_k C_ik g_k (see the module docstring).

    Args:
        seed: seed of the random visiting orders (None: drawn from torch's global RNG).
        reduction: "sum" (default, the paper and torchjd) or "mean" of the projected gradients.
        return_projected: ``agg(G)`` returns ``(d, G')`` instead of d.
        check: value checks of the inputs (see ``Aggregator``).
    """

    def _coefficients(self, K: Tensor, state: dict[str, Tensor]) -> Tensor:
        C, _ = surgery_coefficients(K, self._orders(K, state))
        return C

    def __repr__(self) -> str:
        return (f"PCGrad(seed={self.seed}, reduction={self.reduction!r}, "
                f"return_projected={self.return_projected})")
