r"""``TaskDominance``: the AU / rAU task-dominance metric of AdaTask (Yang et al., AAAI 2023).

For every tracked parameter θ (element-wise) and task k, with Δθ_t^k the part of step t's update
attributable to task k:

.. math::

    AU_t^k = \beta AU_{t-1}^k + (1-\beta)(\Delta\theta_t^k)^2, \qquad
    rAU_t^k = AU_t^k / \textstyle\sum_j AU_t^j

θ is "dominated" by task k when rAU^k ≫ 1/T. The paper averages rAU per layer: under Adam the
higher shared layers are dominated by one task, under AdaTask they are balanced.

.. code-block:: python

    dom = fm.diagnostics.TaskDominance(encoder.named_parameters(), num_tasks=T)
    opt.zero_grad(); opt.backward(losses); opt.step()      # AdaTaskAdam
    dom.update_from(opt)                                   # before the next zero_grad
    dom.per_layer()                                        # {name: (T,) mean rAU}

Sources of Δθ_k (``update_from(optimizer, task_grads=None)``, right after ``optimizer.step()``):

- ``AdaTaskAdam``: Δθ_k = −η m̂_k / (√v̂_k + ε), read from its per-task state.
- ``AdaTaskRMSprop`` / ``AdaTaskAdagrad``: −η g_k / (√v_k + ε) (Adagrad: its decayed η), which
  needs ``task_grads``: the per-task gradients the step used (momentum/centered unsupported).
- ``torch.optim.Adam`` / ``AdamW`` (the paper's comparison): Δθ_k = −η m̂_k / (√v̂ + ε) with the
  **joint** v̂ of Adam's state and m_k the EMA (β1) of task k's gradient, kept here from
  ``task_grads`` (the gradients whose sum Adam stepped on). m = Σ_k m_k is linear in the tasks,
  so Σ_k Δθ_k is Adam's update. Track from Adam's first step, or the m_k miss the earlier
  gradients.

Choices the paper leaves open (METHODS.md 2.4; the official code has no AU):

- β defaults to 0.9 (a horizon of about 10 steps). It is not the paper's value (unknown).
  AU is not bias-corrected: every task's AU shares the factor 1 − β^t, which cancels in rAU.
- Attribution of the first moment: the linear share m_k above; the second moment is not split
  (AdaTask's own v_k, Adam's joint v).
- Weight decay is attributed to no task: decoupled decay (AdamW) is left out of every Δθ_k;
  coupled decay is inside AdaTask-Adam's per-task moments (its λ/T share) but outside the
  task gradients passed for the other sources, so Σ_k Δθ_k then differs from the update by it.
- AU decays once per ``update_from`` for every tracked parameter the optimizer holds state for
  (and, for the sources that need them, was given task gradients); a task whose step counter
  did not move this step (it did not reach θ) contributes Δθ_k = 0.
- Where Σ_j AU^j = 0 (nothing updated yet) rAU is 1/T: nobody dominates.

Memory: AU is T·|θ| (float32; float64 for float64 parameters); the plain-Adam source adds T·|θ|
for the m_k, and one (T, *θ.shape) temporary per parameter during ``update_from``.
``update_from`` runs tensor ops only (no host synchronisation).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastmtl._checks import check_int, check_number
from fastmtl.diagnostics import _updates
from fastmtl.ops._common import acc_dtype

__all__ = ["TaskDominance"]

_LABELS = {"adatask": "an AdaTask optimizer", "adam": "torch.optim.Adam"}


def _named(params: Any) -> tuple[list[str], list[Tensor]]:
    if isinstance(params, Tensor):
        raise TypeError("TaskDominance: params must be an iterable of tensors or of (name, "
                        "tensor) pairs, got a single tensor")
    items = list(params)
    if not items:
        raise ValueError("TaskDominance: params is empty")
    names, tensors = [], []
    for k, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, p = item
        else:
            name, p = str(k), item
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise TypeError(f"TaskDominance: params[{k}] must be a floating tensor, got "
                            f"{getattr(p, 'dtype', type(p).__name__)}")
        names.append(name)
        tensors.append(p)
    if len({id(p) for p in tensors}) != len(tensors):
        raise ValueError("TaskDominance: params contains a parameter twice")
    if len(set(names)) != len(names):
        raise ValueError("TaskDominance: params contains a name twice")
    return names, tensors


class TaskDominance:
    """AU / rAU of each task on each tracked parameter (module docstring).

    Args:
        params: tensors, or ``(name, tensor)`` pairs (``module.named_parameters()``); names
            key ``per_layer``; plain tensors are named by their index ("0", "1", ...).
        num_tasks: T.
        beta: the decay β of AU, in [0, 1) (default 0.9; not given by the paper).
    """

    def __init__(self, params: Iterable[Any], num_tasks: int, beta: float = 0.9) -> None:
        self.num_tasks = check_int("num_tasks", num_tasks, 1, who="TaskDominance")
        self.beta = check_number("beta", beta, low=0, high=1, high_open=True,
                                 who="TaskDominance")
        self.names, self._params = _named(params)
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._by_name = {name: i for i, name in enumerate(self.names)}
        self._au = [torch.zeros((self.num_tasks, *p.shape), dtype=acc_dtype(p.dtype),
                                device=p.device) for p in self._params]
        self.reset()

    def reset(self) -> None:
        """Forget everything: AU = 0, no source, no plain-Adam first moments."""
        for au in self._au:
            au.zero_()
        n = len(self._params)
        self.source: str | None = None      # "adatask" | "adam" once fed
        self._seen: list[Tensor | None] = [None] * n
        self._exp_avg: list[Tensor | None] = [None] * n

    # -- update -----------------------------------------------------------------------------
    @torch.no_grad()
    def update_from(self, optimizer: Optimizer, task_grads: Any = None) -> dict[str, Tensor]:
        """Fold the step ``optimizer`` just took into AU; returns this step's per-task updates
        Δθ_k, {name: (T, *p.shape)}, for the parameters it covered (see the module docstring).

        ``task_grads``: (T, *p.shape) tensors, a list in tracked order or a dict keyed by
        parameter; needed by ``torch.optim.Adam``, ``AdaTaskRMSprop`` and ``AdaTaskAdagrad``.
        """
        T = self.num_tasks
        if isinstance(optimizer, tuple(_updates.ADATASK)):
            source = "adatask"
        elif isinstance(optimizer, torch.optim.Adam):
            source = "adam"
        else:
            raise TypeError("TaskDominance.update_from: optimizer must be torch.optim.Adam "
                            "(or AdamW) or a fastmtl AdaTask optimizer, got "
                            f"{type(optimizer).__name__}")
        if self.source not in (None, source):
            raise ValueError(f"TaskDominance.update_from: this diagnostic was fed by "
                             f"{_LABELS[self.source]}; reset() before feeding it "
                             f"{_LABELS[source]}")
        if source == "adatask":
            updates = _updates.adatask_updates(optimizer, self._params, self.names, T,
                                               self._seen, task_grads)
        else:
            updates = _updates.adam_updates(optimizer, self._params, self.names, T,
                                            self._seen, self._exp_avg, task_grads)
        self.source = source
        out = {}
        for i, delta in updates:
            self._au[i].mul_(self.beta).addcmul_(delta, delta, value=1 - self.beta)
            out[self.names[i]] = delta
        return out

    # -- read-out ---------------------------------------------------------------------------
    def _find(self, param: Tensor | str) -> int:
        i = (self._by_name.get(param) if isinstance(param, str)
             else self._index.get(id(param)))
        if i is None:
            what = repr(param) if isinstance(param, str) else \
                f"a tensor of shape {tuple(getattr(param, 'shape', ()))}"
            raise ValueError(f"TaskDominance: {what} is not a tracked parameter")
        return i

    def au(self, param: Tensor | str) -> Tensor:
        """AU of ``param`` (the tensor or its name): (T, *p.shape), this object's state."""
        return self._au[self._find(param)]

    def rau(self, param: Tensor | str) -> Tensor:
        """rAU of ``param``: (T, *p.shape), AU / Σ_j AU_j, and 1/T where Σ_j AU_j = 0."""
        au = self._au[self._find(param)]
        total = au.sum(0, keepdim=True)
        return torch.where(total > 0, au / total, torch.full_like(au, 1 / self.num_tasks))

    def per_layer(self) -> dict[str, Tensor]:
        """{name: (T,)}: rAU averaged over the elements of each tracked tensor."""
        return {name: self._mean(self.rau(name)) for name in self.names}

    def dominated_fraction(self, threshold: float | None = None) -> dict[str, Tensor]:
        """{name: (T,)}: the share of each tensor's elements with rAU_k > ``threshold``.

        Default threshold (1 + 1/T) / 2, halfway between balance (1/T) and full dominance (1):
        0.75 for T = 2, above 1/2 for every T, so at most one task dominates an element and the
        T fractions sum to at most 1 (with T = 1 nothing is dominated)."""
        T = self.num_tasks
        if threshold is None:
            threshold = (1 + 1 / T) / 2
        threshold = check_number("threshold", threshold, low=0, high=1,
                                 who="TaskDominance.dominated_fraction")
        if T == 1:
            return {name: torch.zeros(1, dtype=au.dtype, device=au.device)
                    for name, au in zip(self.names, self._au)}
        return {name: self._mean((self.rau(name) > threshold).to(self._au[i].dtype))
                for i, name in enumerate(self.names)}

    def _mean(self, x: Tensor) -> Tensor:
        if x[0].numel() == 0:
            return torch.full((self.num_tasks,), 1 / self.num_tasks, dtype=x.dtype,
                              device=x.device)
        return x.reshape(self.num_tasks, -1).mean(1)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """AU, the plain-Adam first moments and the last seen step counters (references, as
        ``torch.optim``), with T, β, the source and the names."""
        return {"num_tasks": self.num_tasks, "beta": self.beta, "source": self.source,
                "names": list(self.names), "au": list(self._au),
                "exp_avg": list(self._exp_avg), "seen": list(self._seen)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()`` (copied into this object's tensors, on their devices)."""
        T, n = state_dict["num_tasks"], len(self._params)
        if T != self.num_tasks:
            raise ValueError(f"TaskDominance.load_state_dict: state has num_tasks={T}, "
                             f"this object {self.num_tasks}")
        if len(state_dict["au"]) != n:
            raise ValueError(f"TaskDominance.load_state_dict: state has "
                             f"{len(state_dict['au'])} parameters, this object {n}")
        for i, (au, saved) in enumerate(zip(self._au, state_dict["au"])):
            if tuple(saved.shape) != tuple(au.shape):
                raise ValueError(f"TaskDominance.load_state_dict: AU of {self.names[i]!r} has "
                                 f"shape {tuple(saved.shape)}, expected {tuple(au.shape)}")
        self.beta = check_number("beta", state_dict["beta"], low=0, high=1, high_open=True,
                                 who="TaskDominance.load_state_dict")
        for au, saved in zip(self._au, state_dict["au"]):
            au.copy_(saved)
        self.source = state_dict["source"]

        def copy(x: Tensor | None, p: Tensor) -> Tensor | None:
            return None if x is None else x.detach().to(p.device, copy=True)

        self._exp_avg = [copy(x, p) for x, p in zip(state_dict["exp_avg"], self._params)]
        self._seen = [copy(x, p) for x, p in zip(state_dict["seen"], self._params)]

    def __repr__(self) -> str:
        return (f"TaskDominance(num_tasks={self.num_tasks}, beta={self.beta}, "
                f"params={len(self._params)}, source={self.source!r})")
