r"""DWA: Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019, Eq. 7; the MTAN paper).

.. math::

    w_k(t) = \frac{T \exp(r_k(t-1)/\tau)}{\sum_j \exp(r_j(t-1)/\tau)}, \qquad
    r_k(t-1) = \frac{\bar L_k(t-1)}{\bar L_k(t-2)},

where :math:`\bar L_k(t)` is the mean of task k's training loss over the batches of epoch t
(MTAN's code averages the per-iteration losses of the epoch) and w_k(t) = 1 for the first two
epochs (t = 0, 1), when r is not yet defined. τ = 2 in the paper. The weights sum to T and are
constant within an epoch; the model is trained on Σ_k w_k(t) L_k. LibMTL's ``DWA`` is the same
(T = 2, epoch means, weights 1 while epoch <= 1).

When to call what::

    dwa = fm.weighting.DWA(num_tasks=T)             # temperature=2.0
    for epoch in range(num_epochs):
        for x, y in loader:
            losses = compute_losses(model(x), y)    # T scalars
            opt.zero_grad()
            dwa(losses).backward()                  # Σ_k w_k(epoch) L_k  (dwa.weights() is w)
            opt.step()
            dwa.update(losses)                      # accumulate the epoch means (detached)
        dwa.end_epoch()                             # the next epoch's weights are now fixed

``weights()`` can also be read directly (e.g. to pass ``w * losses`` to ``fm.mtl_backward``).
Everything stays on the losses' device; there is no host synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastmtl.weighting.base import check_num_tasks, check_positive, stack_losses

__all__ = ["DWA"]


class DWA:
    """Dynamic Weight Average: T·softmax(r/τ) of the ratios of the last two epoch-mean losses.

    Args:
        num_tasks: T.
        temperature: τ (2.0 in the paper); smaller τ gives more extreme weights.
        check: value checks of the losses (see ``fastmtl.weighting.base``).

    Methods (see the module docstring for the order of calls):
        weights(device=None, dtype=None): w(t) for the current epoch, (T,).
        __call__(losses): Σ_k w_k(t) L_k (records nothing).
        update(losses): add this batch's (detached) losses to the epoch's running sums.
        end_epoch(): close the epoch: its mean losses become L̄(t); raises if no batch was seen.
    """

    def __init__(self, num_tasks: int, temperature: float = 2.0, *,
                 check: bool | None = None) -> None:
        self.num_tasks = check_num_tasks(num_tasks)
        self.temperature = check_positive("temperature", temperature)
        self.check = check
        self.reset()

    def reset(self) -> None:
        """Back to epoch 0 (weights 1), forgetting all recorded losses."""
        self.epoch = 0
        self._history: list[Tensor] = []     # epoch means of the last (up to) two epochs
        self._sum: Tensor | None = None
        self._count = 0

    def weights(self, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> Tensor:
        """w(t) (T,) for the current epoch: ones for epochs 0 and 1, then T·softmax(r/τ).

        Defaults: the device of the recorded losses (CPU before any), float32 (float64 when
        the recorded losses are float64)."""
        ref = self._history[-1] if self._history else self._sum
        if device is None:
            device = ref.device if ref is not None else torch.device("cpu")
        if dtype is None:
            dtype = ref.dtype if ref is not None else torch.float32
        if len(self._history) < 2:
            return torch.ones(self.num_tasks, device=device, dtype=dtype)
        ratio = self._history[-1] / self._history[-2]
        w = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        return w.to(device=device, dtype=dtype)

    def __call__(self, losses: Any) -> Tensor:
        """Σ_k w_k(t) L_k, differentiable in the losses (the weights are constants)."""
        stacked = stack_losses(losses, self.num_tasks, "DWA", self.check)
        return (self.weights(stacked.device, stacked.dtype) * stacked).sum()

    def update(self, losses: Any) -> None:
        """Add one batch's losses (detached) to the current epoch's sums."""
        stacked = stack_losses(losses, self.num_tasks, "DWA", self.check, detach=True)
        dtype = torch.float64 if stacked.dtype == torch.float64 else torch.float32
        stacked = stacked.to(dtype)
        if self._sum is None:
            self._sum = stacked.clone()
        else:
            self._sum = self._sum.to(stacked.device) + stacked
        self._count += 1

    def end_epoch(self) -> None:
        """Close the epoch: L̄(t) = the mean of its recorded losses; t ← t + 1."""
        if self._count == 0 or self._sum is None:
            raise RuntimeError(f"DWA.end_epoch(): no losses were recorded in epoch {self.epoch}; "
                               "call dwa.update(losses) after every training batch")
        self._history = [*self._history[-1:], self._sum / self._count]
        self._sum, self._count = None, 0
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "history": [h.clone() for h in self._history],
                "sum": None if self._sum is None else self._sum.clone(), "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"epoch", "history", "sum", "count"}
        if set(state) != expected:
            raise ValueError(f"DWA.load_state_dict expects keys {sorted(expected)}, "
                             f"got {sorted(state)}")
        for h in state["history"]:
            if h.shape != (self.num_tasks,):
                raise ValueError(f"DWA.load_state_dict: history entries must have shape "
                                 f"({self.num_tasks},), got {tuple(h.shape)}")
        self.epoch = int(state["epoch"])
        self._history = [h.clone() for h in state["history"]][-2:]
        self._sum = None if state["sum"] is None else state["sum"].clone()
        self._count = int(state["count"])

    def __repr__(self) -> str:
        return (f"DWA(num_tasks={self.num_tasks}, temperature={self.temperature}, "
                f"epoch={self.epoch})")
