r"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018, Algorithm 1).

Learnable loss weights w_i (initialised to 1); W is the last shared layer (the user passes its
parameters). At step t, with n_i = ‖∇_W L_i‖:

.. math::

    G_i = \|\nabla_W w_i L_i\| = |w_i|\, n_i, \qquad \bar G = \tfrac1T \sum_i G_i, \qquad
    \tilde L_i = L_i(t)/L_i(0), \qquad r_i = \tilde L_i \big/ \tfrac1T \sum_j \tilde L_j,

    L_{\mathrm{grad}} = \sum_i \big| G_i - [\bar G\, r_i^{\alpha}]_{\mathrm{const}} \big|,
    \qquad \frac{\partial L_{\mathrm{grad}}}{\partial w_i}
        = \operatorname{sign}(G_i - \bar G r_i^\alpha)\operatorname{sign}(w_i)\, n_i

(the target Ḡ r_i^α is a constant, as the paper prescribes). The model is trained on
Σ_i w_i(t) L_i; w takes one step of its own optimizer (here Adam, lr 0.025 by default) on
∇_w L_grad and is then renormalised so that Σ_i w_i = T. α = 1.5 (the paper's NYUv2 setting
and LibMTL's default; 0.12 in the paper's toy). L_i(0) are the losses of the first call.

How n_i is obtained: ``backward(losses)`` runs the per-task engine
(``fastmtl.engine.TaskGradients`` on W's parameters) on the *weighted* losses w_i(t) L_i, with
w(t) as constants. That single pass leaves every parameter other than W with
Σ_i w_i ∇ L_i in ``.grad`` (the model gradient), fills the (T, N_W) buffer with the rows
w_i ∇_W L_i, whose Gram diagonal gives G_i² directly (n_i = G_i/|w_i|; 0 where w_i = 0), and
W gets the row sum. So one call replaces ``(w·L).sum().backward()``. Cost: the engine's
(T backward passes with "loop", one batched pass with "vmap"). With norms from elsewhere,
``update(losses, grad_norms)`` performs only the weight step.

Departures: LibMTL's ``GradNorm`` parametrises w = T·softmax(ξ) (no renormalisation step),
takes L_i(0) as the first epoch's mean loss and starts balancing from the second epoch. Weights
are not clamped: a w_i that reaches 0 stops moving (its ∂/∂w_i is 0); a learning rate that
drives weights to 0 is too large.

When to call what::

    gn = fm.weighting.GradNorm(num_tasks=T, last_shared_params=model.encoder[-1].parameters())
    for x, y in loader:
        losses = compute_losses(model(x), y)   # T scalars
        opt.zero_grad()
        w = gn.backward(losses)                # .grad ← ∇ Σ_i w_i(t) L_i; w(t) → w(t+1)
        opt.step()                             # the model's step (w has its own optimizer)

No host synchronisation in ``backward`` or ``update``: the weights, L(0) and the optimizer
state live on the losses' device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from fastmtl.engine import pipeline
from fastmtl.engine.task_gradients import TaskGradients
from fastmtl.weighting.base import check_num_tasks, check_positive, stack_losses

__all__ = ["GradNorm"]


class GradNorm:
    """GradNorm loss weights (see the module docstring for the math and the call sequence).

    Args:
        num_tasks: T.
        last_shared_params: the parameters of the last shared layer W.
        alpha: α, the strength of the restoring force (1.5).
        lr: learning rate of the weights' optimizer (0.025).
        optimizer: a factory ``params -> torch.optim.Optimizer`` for the weights (default:
            ``torch.optim.Adam(params, lr=lr)``).
        engine: "loop" | "vmap" | "auto", the per-task gradient engine on W.
        check: value checks of the losses (see ``fastmtl.weighting.base``).
    """

    def __init__(self, num_tasks: int, last_shared_params: Iterable[Tensor],
                 alpha: float = 1.5, lr: float = 0.025,
                 optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
                 engine: str = "auto", *, check: bool | None = None) -> None:
        self.num_tasks = check_num_tasks(num_tasks)
        self.alpha = check_positive("alpha", alpha, allow_zero=True)
        self.lr = check_positive("lr", lr)
        if optimizer is not None and not callable(optimizer):
            raise TypeError("optimizer must be a callable params -> torch.optim.Optimizer")
        self._factory = optimizer or (lambda params: torch.optim.Adam(params, lr=self.lr))
        self.engine = TaskGradients(last_shared_params, engine)
        self.check = check
        self._w: Tensor | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._initial: Tensor | None = None
        self._pending: dict[str, Any] | None = None     # loaded before the first call

    # -- state on the losses' device ---------------------------------------------------------
    def _weights_on(self, like: Tensor) -> Tensor:
        if self._w is None:
            dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
            w = torch.ones(self.num_tasks, device=like.device, dtype=dtype)
            pending, self._pending = self._pending, None
            if pending is not None:
                w.copy_(pending["weights"])
                if pending["initial_losses"] is not None:
                    self._initial = pending["initial_losses"].to(like.device, dtype)
            self._w = w.requires_grad_(True)
            self._opt = self._factory([self._w])
            if pending is not None and pending["optimizer"] is not None:
                self._opt.load_state_dict(pending["optimizer"])
        elif self._w.device != like.device:
            raise ValueError(f"GradNorm: the weights live on {self._w.device} but the losses "
                             f"are on {like.device}")
        return self._w

    @property
    def weights(self) -> Tensor:
        """The current w (T,), detached (ones before the first call, on the CPU then)."""
        if self._w is None:
            if self._pending is not None:
                return self._pending["weights"].clone()
            return torch.ones(self.num_tasks)
        return self._w.detach().clone()

    @property
    def initial_losses(self) -> Tensor | None:
        """L(0), the losses of the first call (None before it)."""
        return None if self._initial is None else self._initial.clone()

    # -- the step -----------------------------------------------------------------------------
    def backward(self, losses: Any) -> Tensor:
        """Fill ``.grad`` with ∇ Σ_i w_i(t) L_i (accumulating, like ``backward()``), take the
        GradNorm step on w, and return w(t), the weights the gradient was built with."""
        if not isinstance(losses, Tensor) and isinstance(losses, Iterable):
            losses = list(losses)                         # a generator is read once
        stacked = stack_losses(losses, self.num_tasks, "GradNorm", self.check)
        items = list(losses.reshape(-1).unbind(0)) if isinstance(losses, Tensor) else losses
        w_now = self._weights_on(stacked).detach().clone()
        weighted = [loss.reshape(()) * w_now[i].to(loss.dtype) for i, loss in enumerate(items)]
        K = pipeline.run(self.engine, weighted, lambda K, _: torch.ones_like(K[0])).K  # d = Σ_i g_i
        G = K.diagonal().clamp_min(0).sqrt().to(device=w_now.device, dtype=w_now.dtype)
        scale = w_now.abs()
        norms = torch.where(scale > 0, G / torch.where(scale > 0, scale, 1), 0)
        self._step(stacked.detach(), norms)
        return w_now

    def update(self, losses: Any, grad_norms: Tensor) -> Tensor:
        """The weight step alone, from the losses and n_i = ‖∇_W L_i‖ (T,) computed elsewhere;
        returns the new weights."""
        stacked = stack_losses(losses, self.num_tasks, "GradNorm", self.check, detach=True)
        if not isinstance(grad_norms, Tensor) or tuple(grad_norms.shape) != (self.num_tasks,):
            raise ValueError(f"GradNorm.update: grad_norms must be a ({self.num_tasks},) tensor, "
                             f"got {getattr(grad_norms, 'shape', type(grad_norms).__name__)}")
        self._weights_on(stacked)
        self._step(stacked, grad_norms.detach())
        return self.weights

    def _step(self, losses: Tensor, norms: Tensor) -> None:
        w = self._w
        losses = losses.to(w.dtype)
        norms = norms.to(device=w.device, dtype=w.dtype)
        if self._initial is None:
            self._initial = losses.clone()
        with torch.no_grad():
            ratio = losses / self._initial                 # L̃_i
            r = ratio / ratio.mean()
            G = w.abs() * norms
            target = G.mean() * r.pow(self.alpha)
            grad = torch.sign(G - target) * torch.sign(w) * norms
        self._opt.zero_grad(set_to_none=True)
        w.grad = grad
        self._opt.step()
        with torch.no_grad():
            w.mul_(self.num_tasks / w.sum())
        w.grad = None

    # -- state_dict ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._w is None and self._pending is not None:
            return dict(self._pending)
        return {"weights": self.weights, "initial_losses": self.initial_losses,
                "optimizer": None if self._opt is None else self._opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {"weights", "initial_losses", "optimizer"}
        if set(state) != keys:
            raise ValueError(f"GradNorm.load_state_dict expects keys {sorted(keys)}, "
                             f"got {sorted(state)}")
        w = state["weights"]
        if not isinstance(w, Tensor) or tuple(w.shape) != (self.num_tasks,):
            raise ValueError(f"GradNorm.load_state_dict: weights must be a ({self.num_tasks},) "
                             "tensor")
        if self._w is None:
            self._pending = {k: (v.detach().clone() if isinstance(v, Tensor) else v)
                             for k, v in state.items()}
            return
        with torch.no_grad():
            self._w.copy_(w)
        init = state["initial_losses"]
        self._initial = None if init is None else init.to(self._w.device, self._w.dtype)
        if state["optimizer"] is not None:
            self._opt.load_state_dict(state["optimizer"])

    def __repr__(self) -> str:
        return (f"GradNorm(num_tasks={self.num_tasks}, alpha={self.alpha}, "
                f"params={len(self.engine.params)})")
