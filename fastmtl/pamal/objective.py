r"""PaMaL's training objective: sampled α, W forwards, inner weighting and ordering regulariser.

Dimitriadis, Frossard & Fleuret, "Pareto Manifold Learning: Tackling multiple tasks via
ensembles of single-task models", ICML 2023 (PMLR 202:8015–8052; arXiv:2210.09759); official
code ``nik-dim/pamal`` (``src/trainer/ensemble_trainer.py``,
``src/trainer/multi_forward_ensemble_trainer.py``). The goal is

.. math::  \min_{W_1..W_T}\ \mathbb{E}_{\alpha\sim\mathrm{Dir}(p\mathbf 1)}
           \Big[\sum_t \alpha_t L_t\big(\theta(\alpha)\big)\Big],
           \qquad \theta(\alpha) = \sum_t \alpha_t W_t .

One step of ``PaMaL.loss`` (window W = 1 is the single-forward method):

1. draw α^(1..W) ~ Dir(p·1) (one α per forward, shared by the whole network and batch);
2. for each w, run the model at α^(w) on the same batch: task losses ℓ^(w) (T,), weighted loss
   Σ_t c_t(α^(w)) ℓ_t^(w) with c from the inner weighting (``fastmtl.pamal.inner``);
3. L_tot = Σ_w Σ_t c_t ℓ_t^(w); with W > 1 and λ > 0 add λ·R, R the ordering regulariser
   (``fastmtl.pamal.regularizer``), only where λ·R < L_tot when ``gate=True`` (the safety gate
   of the official code; a ``torch.where``, no host synchronisation).

The caller then runs ``loss.backward()`` and one optimizer step over all the members (Adam, lr
1e-3 in most of the paper's experiments). BatchNorm running statistics are updated during each
forward at the α drawn for it (one shared set, as in the official code).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastmtl._checks import (
    check_bool,
    check_choice,
    check_generator,
    check_int,
    check_number,
    generator_state,
    load_generator_state,
)
from fastmtl.pamal.alpha import sample_alpha, use_alpha
from fastmtl.pamal.inner import INNER_METHODS, LossWindow, task_gradient_norms
from fastmtl.pamal.layers import subspace_layers
from fastmtl.pamal.regularizer import DIRECTIONS, ordering_regularizer
from fastmtl.weighting.base import stack_losses

__all__ = ["PaMaL"]

LossFns = Callable[[Any, Any], Any] | Sequence[Callable[[Any, Any], Tensor]]


def _per_task(value: Any, t: int, num_tasks: int) -> Any:
    if isinstance(value, list | tuple) and len(value) == num_tasks:
        return value[t]
    return value


class PaMaL:
    """Pareto Manifold Learning objective for a model converted with ``to_subspace``.

    Args:
        model: the subspace model (``to_subspace(model, num_tasks)``).
        num_tasks: T (the layers' number of members).
        concentration: p of Dir(p·1) (paper: 1 for MultiMNIST/Census, 2 UTKFace, 7 Cityscapes).
        window: W, forwards per step on the same batch (1: single-forward PaMaL).
        reg_lambda: λ of the ordering regulariser (used when W > 1).
        temperature: τ of the regulariser (1 in the paper).
        direction: the regulariser's sign, "intuitive" (default) or "code" (see
            ``fastmtl.pamal.regularizer``).
        gate: add λR only where λR < L_tot (the official code's gate).
        inner: "ls" (default), "gradnorm", "rwa" or "full" (see ``fastmtl.pamal.inner``).
        rwa_window: forwards averaged by "rwa"/"full" (25 in the code).
        gradnorm_eps: ε of "gradnorm"/"full" (1e-3).
        shared: parameters whose per-task gradient norms "gradnorm"/"full" use (default: all
            the model's parameters that require grad).
        forward: ``forward(model, x)`` runs the model (default ``model(x)``).
        precompute: compute every layer's W(α) once before each forward (``use_alpha``).
        generator: a ``torch.Generator`` for the α draws (its device draws them), or None.

    ``loss_fns``: a callable ``(outputs, targets) -> T losses``, or a sequence of T callables
    with loss t = ``loss_fns[t](outputs_t, targets_t)``, where ``outputs_t``/``targets_t`` is
    item t of a list or tuple of length T and the whole value otherwise.

    After each ``loss`` call: ``last_alphas`` (W, T), ``last_losses`` (W, T, detached),
    ``last_regularizer`` (detached scalar, before λ) and ``last_objective`` (detached L_tot).
    """

    def __init__(self, model: nn.Module, num_tasks: int, concentration: float = 1.0,
                 window: int = 1, reg_lambda: float = 0.0, *, temperature: float = 1.0,
                 direction: str = "intuitive", gate: bool = True, inner: str = "ls",
                 rwa_window: int = 25, gradnorm_eps: float = 1e-3,
                 shared: Iterable[Tensor] | None = None,
                 forward: Callable[[nn.Module, Any], Any] | None = None,
                 precompute: bool = False, generator: torch.Generator | None = None) -> None:
        who = "PaMaL"
        self.num_tasks = check_int("num_tasks", num_tasks, who=who)
        layers = subspace_layers(model)
        if not layers:
            raise ValueError("PaMaL: the model has no subspace layers; convert it first with "
                             "fastmtl.pamal.to_subspace(model, num_tasks)")
        if layers[0].num_members != self.num_tasks:
            raise ValueError(f"PaMaL: num_tasks={num_tasks} but the model's layers have "
                             f"{layers[0].num_members} members")
        self.model = model
        self.concentration = check_number("concentration", concentration, low=0, low_open=True,
                                          who=who)
        self.window = check_int("window", window, who=who)
        self.reg_lambda = check_number("reg_lambda", reg_lambda, low=0, who=who)
        self.temperature = check_number("temperature", temperature, low=0, low_open=True,
                                        who=who)
        self.direction = check_choice("direction", direction, DIRECTIONS, who=who)
        self.gate = check_bool("gate", gate, who=who)
        self.inner = check_choice("inner", inner, INNER_METHODS, who=who)
        self.gradnorm_eps = check_number("gradnorm_eps", gradnorm_eps, low=0, who=who)
        self.precompute = check_bool("precompute", precompute, who=who)
        self.generator = check_generator(generator, "PaMaL")
        self.forward = forward if forward is not None else (lambda m, x: m(x))
        self.shared = None if shared is None else list(shared)
        self.loss_window = LossWindow(self.num_tasks, rwa_window)
        self.last_alphas: Tensor | None = None
        self.last_losses: Tensor | None = None
        self.last_regularizer: Tensor | None = None
        self.last_objective: Tensor | None = None

    def sample(self, device: torch.device | str | None = None) -> Tensor:
        """The step's α^(1..W), (W, T) float32, from Dir(p·1)."""
        return sample_alpha(self.num_tasks, self.concentration, self.window,
                            generator=self.generator, device=device)

    def task_losses(self, outputs: Any, targets: Any, loss_fns: LossFns) -> Tensor:
        """The T task losses (T,) of one forward's outputs (see the class docstring)."""
        T = self.num_tasks
        if callable(loss_fns):
            return stack_losses(loss_fns(outputs, targets), T, "PaMaL")
        if not isinstance(loss_fns, Sequence) or len(loss_fns) != T:
            raise ValueError(f"PaMaL: loss_fns must be a callable or a sequence of {T} "
                             f"callables, got {type(loss_fns).__name__}")
        return stack_losses([fn(_per_task(outputs, t, T), _per_task(targets, t, T))
                             for t, fn in enumerate(loss_fns)], T, "PaMaL")

    def _coefficients(self, alpha: Tensor, losses: Tensor) -> Tensor:
        c = alpha.to(losses.dtype)
        balance = torch.ones_like(c)
        if self.inner in ("rwa", "full"):
            self.loss_window.push(losses)
            balance = self.loss_window.balance().to(c.dtype)
            c = c * balance
        if self.inner in ("gradnorm", "full"):
            params = self.shared if self.shared is not None else [
                p for p in self.model.parameters() if p.requires_grad]
            c = c / (balance * task_gradient_norms(losses, params) + self.gradnorm_eps)
        return c

    def loss(self, x: Any, targets: Any, loss_fns: LossFns) -> Tensor:
        """L_tot (+ λR) for one batch: W forwards at fresh α (see the module docstring)."""
        device = next(iter(self.model.parameters())).device
        alphas = self.sample(device)
        total, rows = None, []
        for w in range(self.window):
            with use_alpha(self.model, alphas[w], precompute=self.precompute, check=False):
                outputs = self.forward(self.model, x)
            losses = self.task_losses(outputs, targets, loss_fns)
            term = (self._coefficients(alphas[w], losses) * losses).sum()
            total = term if total is None else total + term
            rows.append(losses)
        losses = torch.stack(rows)
        reg = ordering_regularizer(alphas, losses, temperature=self.temperature,
                                   direction=self.direction)
        self.last_alphas, self.last_losses = alphas, losses.detach()
        self.last_regularizer, self.last_objective = reg.detach(), total.detach()
        if self.window < 2 or self.reg_lambda == 0.0:
            return total
        penalised = total + self.reg_lambda * reg
        if not self.gate:
            return penalised
        return torch.where(self.reg_lambda * reg.detach() < total.detach(), penalised, total)

    def state_dict(self) -> dict[str, Any]:
        """The generator's state and the "rwa" loss window."""
        return {"generator_state": generator_state(self.generator),
                "loss_window": self.loss_window.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"generator_state", "loss_window"}:
            raise ValueError(f"PaMaL.load_state_dict expects keys ['generator_state', "
                             f"'loss_window'], got {sorted(state)}")
        load_generator_state(self.generator, state["generator_state"], "PaMaL")
        self.loss_window.load_state_dict(state["loss_window"])

    def __repr__(self) -> str:
        return (f"PaMaL(num_tasks={self.num_tasks}, concentration={self.concentration}, "
                f"window={self.window}, reg_lambda={self.reg_lambda}, inner={self.inner!r}, "
                f"direction={self.direction!r})")
