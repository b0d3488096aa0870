r"""FAMO: Fast Adaptive Multitask Optimization (Liu, Feng, Stone & Liu, NeurIPS 2023;
arXiv:2306.03792; official code github.com/Cranial-XIX/FAMO, ``famo.py``).

Task logits ξ (T,), initialised to 0; z = softmax(ξ). With lower bounds b_i (``min_losses``,
0 by default) and D_i = ℓ_i − b_i + ε, the model is trained on

.. math::

    \mathcal L = \frac{1}{c} \sum_i z_i \log D_i, \qquad c = \sum_i \frac{z_i}{D_i}
    \quad (z \text{ and } c \text{ constants}),

whose gradient Σ_i (z_i/D_i)/c · ∇ℓ_i is a convex combination of the task gradients. After the
model step, the losses ℓ(t+1) are recomputed on the *same* batch and the logits move towards
the tasks whose log-loss decreased least:

.. math::

    \delta_i = \log(\ell_i(t) - b_i + \varepsilon) - \log(\ell_i(t+1) - b_i + \varepsilon),
    \qquad \nabla_\xi = J_{\mathrm{softmax}}(\xi)^\top \delta = z \odot (\delta - z^\top\delta),

followed by one Adam step on ξ (lr β = 0.025, weight decay γ = 1e-5: coupled L2, as
``torch.optim.Adam(weight_decay=γ)``; betas (0.9, 0.999), eps 1e-8). Adam descends along ∇_ξ,
so z_i grows where δ_i is *below* the z-weighted mean: the task that decreased slowest gains
weight. T = 1: z = 1 and the model gets ∇ℓ itself (∇_ξ = 0).

Facts from the official code, followed here: b is a fixed per-task lower bound (zeros unless
``set_min_losses`` is called); there is no running-minimum tracking in ``famo.py`` or the
experiment trainers, and a running minimum would make D_i ≈ ε (or negative) for the task at
its minimum. ε = 1e-8 inside both logs and in c. The logits' Adam has its own state and is
never stepped by the model's optimizer. γ: ``famo.py`` defaults to 0.01, the experiments'
``methods/weight_methods.py`` to 1e-5 (used here); LibMTL and the paper's Algorithm 2 use 1e-3.
The official ``backward`` also clips the shared parameters' gradient to norm 1.0
(``max_norm``); that is left to the training loop here (``torch.nn.utils.clip_grad_norm_``).

When to call what (one extra forward per step, no gradient)::

    famo = fm.weighting.FAMO(num_tasks=T)
    for x, y in loader:
        losses = compute_losses(model(x), y)          # T scalars, ℓ(t)
        opt.zero_grad()
        famo(losses).backward()                       # records ℓ(t); weights famo.weights
        opt.step()
        with torch.no_grad():
            new_losses = compute_losses(model(x), y)  # ℓ(t+1), same batch
        famo.update(new_losses)                       # one Adam step on ξ

Values are checked per ``fastmtl.weighting.base``: non-finite losses, or losses at or below
their bound (D_i <= 0, a NaN log), raise ``ValueError`` when checked. All state lives on the
losses' device; ``__call__`` and ``update`` do not synchronise with the host.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fastmtl.weighting.base import check_num_tasks, check_positive, checking_values, stack_losses

__all__ = ["FAMO"]


def _copy(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()


class FAMO:
    """FAMO loss weighting (see the module docstring for the math and the order of calls).

    Args:
        num_tasks: T.
        lr: β, the Adam learning rate of the logits (0.025).
        weight_decay: γ, Adam's (coupled) weight decay on the logits (1e-5).
        min_losses: b, per-task lower bounds of the losses (T values; default zeros).
        eps: ε added to ℓ − b (1e-8).
        betas, adam_eps: the logits' Adam (0.9, 0.999) and 1e-8.
        check: value checks of the losses (see ``fastmtl.weighting.base``).
    """

    def __init__(self, num_tasks: int, lr: float = 0.025, weight_decay: float = 1e-5,
                 min_losses: Any = None, eps: float = 1e-8,
                 betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8, *,
                 check: bool | None = None) -> None:
        self.num_tasks = check_num_tasks(num_tasks)
        self.lr = check_positive("lr", lr)
        self.weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        self.eps = check_positive("eps", eps, allow_zero=True)
        self.adam_eps = check_positive("adam_eps", adam_eps)
        if len(betas) != 2 or not all(isinstance(b, float | int) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.check = check
        self._min = None if min_losses is None else self._bounds(min_losses)
        self.reset()

    def _bounds(self, values: Any) -> Tensor:
        b = torch.as_tensor(values).detach().reshape(-1)
        if b.shape[0] != self.num_tasks or not b.is_floating_point():
            raise ValueError(f"min_losses must be {self.num_tasks} floating values, "
                             f"got shape {tuple(b.shape)} and dtype {b.dtype}")
        return b.clone()

    def reset(self) -> None:
        """Logits back to 0, Adam state cleared, no recorded losses."""
        self.logits: Tensor | None = None       # ξ, created on the first call's device
        self._m: Tensor | None = None
        self._v: Tensor | None = None
        self.step = 0                            # Adam steps taken on ξ
        self._prev: Tensor | None = None         # ℓ(t), detached

    def set_min_losses(self, min_losses: Any) -> None:
        """Set the lower bounds b (T values), as the official ``set_min_losses``."""
        self._min = self._bounds(min_losses)

    # -- state on the losses' device ---------------------------------------------------------
    def _state(self, like: Tensor) -> tuple[Tensor, Tensor]:
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        if self.logits is None:
            zeros = torch.zeros(self.num_tasks, device=like.device, dtype=dtype)
            self.logits, self._m, self._v = zeros, zeros.clone(), zeros.clone()
        elif self.logits.device != like.device or self.logits.dtype != dtype:
            self.logits, self._m, self._v = (t.to(like.device, dtype)
                                             for t in (self.logits, self._m, self._v))
        b = (torch.zeros_like(self.logits) if self._min is None
             else self._min.to(like.device, dtype))
        return self.logits, b

    def _gaps(self, stacked: Tensor, b: Tensor) -> Tensor:
        D = stacked - b + self.eps
        if checking_values(self.check, stacked) and not bool((D.detach() > 0).all()):
            raise ValueError("FAMO: every loss must exceed its lower bound (min_losses): "
                             f"ℓ − b + eps = {D.detach().tolist()}")
        return D

    @property
    def weights(self) -> Tensor:
        """z = softmax(ξ) (T,); uniform before the first call (on the CPU then)."""
        if self.logits is None:
            return torch.full((self.num_tasks,), 1.0 / self.num_tasks)
        return torch.softmax(self.logits, dim=0)

    def __call__(self, losses: Any) -> Tensor:
        """The loss to back-propagate, (1/c) Σ_i z_i log D_i; records ℓ(t) for ``update``."""
        stacked = stack_losses(losses, self.num_tasks, "FAMO", self.check)
        xi, b = self._state(stacked)
        D = self._gaps(stacked.to(xi.dtype), b)
        z = torch.softmax(xi, dim=0)
        c = (z / D).sum().detach()
        self._prev = stacked.detach().to(xi.dtype).clone()
        return (z * torch.log(D)).sum() / c

    def update(self, new_losses: Any) -> Tensor:
        """One Adam step on ξ from ℓ(t) (the last call) and ``new_losses`` = ℓ(t+1); returns the
        new weights z."""
        if self._prev is None:
            raise RuntimeError("FAMO.update(new_losses) needs the losses of the step first: "
                               "call famo(losses) before the model step")
        new = stack_losses(new_losses, self.num_tasks, "FAMO", self.check, detach=True)
        xi, b = self._state(new)
        new = new.to(xi.dtype)
        self._gaps(new, b)
        prev = self._prev.to(xi.device)
        delta = torch.log(prev - b + self.eps) - torch.log(new - b + self.eps)
        z = torch.softmax(xi, dim=0)
        grad = z * (delta - (z * delta).sum())              # J_softmaxᵀ δ (J symmetric)
        self._adam(grad)
        self._prev = None
        return torch.softmax(self.logits, dim=0)

    def _adam(self, grad: Tensor) -> None:
        """torch.optim.Adam's update (coupled weight decay), bias corrections from a host int."""
        beta1, beta2 = self.betas
        self.step += 1
        if self.weight_decay:
            grad = grad + self.weight_decay * self.logits
        self._m.mul_(beta1).add_(grad, alpha=1 - beta1)
        self._v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1 ** self.step
        bias2 = 1 - beta2 ** self.step
        denom = (self._v.sqrt() / math.sqrt(bias2)).add_(self.adam_eps)
        self.logits.addcdiv_(self._m, denom, value=-self.lr / bias1)

    # -- state_dict ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"logits": _copy(self.logits), "exp_avg": _copy(self._m),
                "exp_avg_sq": _copy(self._v), "step": self.step,
                "prev_losses": _copy(self._prev), "min_losses": _copy(self._min)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {"logits", "exp_avg", "exp_avg_sq", "step", "prev_losses", "min_losses"}
        if set(state) != keys:
            raise ValueError(f"FAMO.load_state_dict expects keys {sorted(keys)}, "
                             f"got {sorted(state)}")
        for k in ("logits", "exp_avg", "exp_avg_sq", "prev_losses", "min_losses"):
            t = state[k]
            if t is not None and tuple(t.shape) != (self.num_tasks,):
                raise ValueError(f"FAMO.load_state_dict: {k} must have shape "
                                 f"({self.num_tasks},), got {tuple(t.shape)}")
        if (state["logits"] is None) != (state["exp_avg"] is None):
            raise ValueError("FAMO.load_state_dict: logits and the Adam state go together")
        self.logits, self._m, self._v = (_copy(state[k])
                                         for k in ("logits", "exp_avg", "exp_avg_sq"))
        self.step = int(state["step"])
        self._prev = _copy(state["prev_losses"])
        self._min = _copy(state["min_losses"])

    def __repr__(self) -> str:
        return (f"FAMO(num_tasks={self.num_tasks}, lr={self.lr}, "
                f"weight_decay={self.weight_decay}, eps={self.eps})")
