r"""PaMaL's inner loss weightings: the coefficients c(α) in L(α) = Σ_t c_t(α) L_t(θ(α)).

From the official code (``nik-dim/pamal``, ``src/methods/pamal_weight_methods.py``;
Dimitriadis, Frossard & Fleuret, ICML 2023):

- ``"ls"`` (linear scalarisation, the paper's objective): c_t = α_t.
- ``"gradnorm"`` (gradient balancing): c_t = α_t / (‖∇_θ L_t‖ + ε), ε = 1e-3, the norm taken
  without a graph (a constant scale). θ: the ``shared`` parameters given to ``PaMaL`` (default:
  all its model's trainable parameters, i.e. the members). Costs T extra backward passes per
  forward.
- ``"rwa"`` (loss balancing over a running window of ``size`` = 25 forwards): with L̄_t the
  mean of task t's (detached) losses over the last 25 forwards, the current one included,
  c_t = α_t·w_t, w_t = 1 − |L̄_t| / Σ_s |L̄_s|; as in the code, w = 1 during the first
  ``size + 1`` forwards (warm-up). For T = 2 this equalises the weighted losses.
- ``"full"``: both, as the code composes them: the norms are those of the balanced losses
  w_t L_t, so c_t = α_t·w_t / (w_t‖∇_θ L_t‖ + ε).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastmtl._checks import check_int

__all__ = ["INNER_METHODS", "LossWindow", "task_gradient_norms"]

INNER_METHODS = ("ls", "gradnorm", "rwa", "full")


def task_gradient_norms(losses: Tensor, params: Sequence[Tensor]) -> Tensor:
    """‖∇_θ L_t‖ for each of the T losses (T,), detached; the graph is kept for the backward."""
    norms = []
    for t in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        zero = losses.new_zeros((), dtype=torch.float32)
        norms.append(torch.stack(sq).sum().sqrt() if sq else zero)
    return torch.stack(norms).to(losses.dtype)


class LossWindow:
    """The last ``size`` loss vectors (T,), for the "rwa" balance 1 − |L̄_t| / Σ|L̄|."""

    def __init__(self, num_tasks: int, size: int = 25) -> None:
        self.num_tasks = check_int("num_tasks", num_tasks, who="LossWindow")
        self.size = check_int("size", size, who="LossWindow")
        self.buffer: Tensor | None = None
        self.count = 0

    def push(self, losses: Tensor) -> None:
        """Add one forward's task losses (detached)."""
        if self.buffer is None or self.buffer.device != losses.device:
            self.buffer = torch.zeros(self.size, self.num_tasks, device=losses.device,
                                      dtype=torch.float32)
            self.count = 0
        self.buffer[self.count % self.size] = losses.detach().float()
        self.count += 1

    def balance(self) -> Tensor:
        """w = 1 − |L̄_t| / Σ_s |L̄_s| over the last ``size`` pushes, (T,) float32; ones until
        more than ``size + 1`` losses were pushed (the code's warm-up) and for T = 1."""
        if self.buffer is None or self.count == 0:
            raise RuntimeError("LossWindow.balance: no losses pushed yet")
        if self.num_tasks == 1 or self.count <= self.size + 1:
            return torch.ones(self.num_tasks, device=self.buffer.device)
        mean = self.buffer.mean(0).abs()
        return 1.0 - mean / mean.sum().clamp_min(torch.finfo(mean.dtype).tiny)

    def state_dict(self) -> dict[str, object]:
        return {"buffer": None if self.buffer is None else self.buffer.clone(),
                "count": self.count}

    def load_state_dict(self, state: dict[str, object]) -> None:
        buffer = state["buffer"]
        self.buffer = None if buffer is None else buffer.clone()  # type: ignore[union-attr]
        self.count = int(state["count"])  # type: ignore[arg-type]
