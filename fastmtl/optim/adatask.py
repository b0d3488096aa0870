r"""AdaTask optimizers (Yang et al., "AdaTask: A Task-aware Adaptive Learning Rate Approach to
Multi-task Learning", AAAI 2023): per-task moments on the shared parameters.

.. code-block:: python

    opt = fm.optim.AdaTaskAdam([{"params": encoder.parameters(), "shared": True},
                                {"params": heads.parameters()}], num_tasks=T, lr=1e-3)
    for x, y in loader:
        losses = compute_losses(model(x), y)   # T scalars
        opt.zero_grad()
        opt.backward(losses)                   # per-task grads of the shared params (engine),
        opt.step()                             #   Σ_k ∇(w_k L_k) in the heads' .grad

Groups flagged ``shared=True`` keep T moment sets per parameter and take the **sum** of the
per-task preconditioned steps (the equations are in ``fastmtl.ops.adatask``); other groups
run the ordinary algorithm on their ``.grad`` (the summed loss), with the same
hyperparameters: T = 1 or a non-shared group is exactly ``torch.optim.Adam`` / ``RMSprop`` /
``Adagrad``. The effective step of a shared parameter is up to T times Adam's (the paper
kept Adam's lr).

Where the per-task gradients come from: ``backward(losses)`` (the engine of
``fastmtl.engine``, T backward passes or one vmapped one; it also writes Σ_k ∇(w_k L_k) into the
non-shared parameters' ``.grad``), or ``step(task_grads=...)`` with explicit (T, *p.shape)
tensors (a list in the order of the shared parameters, or a dict keyed by parameter).
``task_weights`` scales the losses in ``backward`` (g_k = ∇(w_k L_k), as the official code);
explicit ``task_grads`` are used as given. Per-task gradients behave like ``.grad``: a second
``backward`` before ``step`` adds to them, ``zero_grad()`` clears them, a ``step()`` without
them leaves the shared parameters untouched (like a ``None`` ``.grad``).

Missing gradients: a task that does not reach a shared parameter (the engine's ``reached``
mask; ``None`` in explicit ``task_grads``) skips that task's moment update and step counter for
that parameter and adds nothing to its step; a parameter no task reaches is not updated. A zero
gradient is a gradient: it decays the moments. Non-finite gradients propagate into the
parameters, as in torch's optimizers; ``backward(losses, check_finite=True)`` raises on a
non-finite loss before any gradient is computed.

Implementations (``fused``/``foreach`` as in ``torch.optim``): ``fused=True`` runs
``fastmtl.ops.adatask_*_`` (one Triton multi-tensor launch per (device, dtype) group on a GPU;
T × torch's fused CPU kernels on the CPU), ``foreach=True`` torch's foreach functions once per
task, ``foreach=False`` torch's single-tensor loop once per task (bit-identical to torch's
optimizer for T = 1). Default: fused where it is supported (every option but RMSprop's
``momentum``/``centered``, which use foreach on CUDA, the loop on CPU). Moments may be stored
in a lower precision (``moment_dtype=torch.bfloat16``: fused path only, arithmetic in float32).

Memory: the shared parameters' state is 2·T·|θ_sh| (Adam; 3·T·|θ_sh| with amsgrad), T·|θ_sh|
for RMSprop (more with momentum/centered) and Adagrad, plus T float32 step counters per
shared tensor; half of it with bfloat16 moments.

Weight decay (not in the official code, which ignores it): ``decoupled_weight_decay=True``
multiplies θ by 1 − ηλ once per step (AdamW); the default coupled L2 is the term λ/2‖θ‖² of
the summed objective shared equally, g_k += (λ/T)θ, so T = 1 is torch's coupled decay.
``capturable=True`` keeps the step counters on the device (CUDA graphs; the fused path always
does): warm the step up once before capturing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastmtl._checks import (
    check_bool,
    check_engine_name,
    check_finite_losses,
    check_int,
    check_losses_list,
    check_number,
    check_task_grads,
)
from fastmtl.engine.task_gradients import TaskGradients
from fastmtl.ops import adatask as adatask_ops

__all__ = ["AdaTaskAdagrad", "AdaTaskAdam", "AdaTaskRMSprop"]


class _AdaTask(Optimizer):
    """Shared plumbing of the three AdaTask optimizers (per-task gradients, state, paths)."""

    _algo: str
    _moments: tuple[str, ...]  # state names of the (T, *shape) moment tensors

    def __init__(self, params: Any, num_tasks: int, defaults: dict[str, Any], *,
                 task_weights: Sequence[float] | Tensor | None, moment_dtype: torch.dtype | None,
                 engine: str) -> None:
        self.num_tasks = check_int("num_tasks", num_tasks, 1)
        if task_weights is None:
            self.task_weights = None
        else:
            weights = torch.as_tensor(task_weights, dtype=torch.float64).flatten()
            if weights.numel() != self.num_tasks or not torch.isfinite(weights).all():
                raise ValueError(f"task_weights must be {self.num_tasks} finite numbers, "
                                 f"got {task_weights!r}")
            self.task_weights = weights.tolist()
        if moment_dtype is not None and (not isinstance(moment_dtype, torch.dtype)
                                         or not moment_dtype.is_floating_point):
            raise TypeError(f"moment_dtype must be a floating torch.dtype, got {moment_dtype!r}")
        self.moment_dtype = moment_dtype
        self.engine_name = check_engine_name(engine, who="AdaTask")
        defaults = dict(defaults, shared=False)
        for key in ("foreach", "fused"):
            if defaults[key] is not None:
                check_bool(key, defaults[key])
        if defaults["fused"] and defaults["foreach"]:
            raise ValueError("fused=True and foreach=True cannot both be set")
        check_bool("capturable", defaults["capturable"])
        check_bool("maximize", defaults["maximize"])
        check_bool("decoupled_weight_decay", defaults["decoupled_weight_decay"])
        super().__init__(params, defaults)
        self._engine: TaskGradients | None = None
        self._task_grads: dict[int, Tensor] = {}   # id(p) -> (T, *p.shape), since zero_grad
        self._reached: dict[int, tuple[bool, ...]] = {}  # id(p) -> which tasks reached p

    # -- groups ------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_bool("shared", group["shared"])
        if group["fused"] and not self._fused_supported(group):
            raise ValueError(f"fused=True does not support {self._unfused_reason(group)}")
        if self.moment_dtype is not None and group["shared"] and not self._use_fused(group):
            raise ValueError("moment_dtype needs the fused path (fused=True or the default), "
                             f"which this group does not use: {self._unfused_reason(group)}"
                             if not self._fused_supported(group) else
                             "moment_dtype needs the fused path: leave foreach/fused unset "
                             "or set fused=True")
        self._engine = None  # the shared parameter list changed

    def _fused_supported(self, group: dict[str, Any]) -> bool:
        return True

    def _unfused_reason(self, group: dict[str, Any]) -> str:
        return ""

    def shared_params(self) -> list[Tensor]:
        """The parameters of the ``shared=True`` groups, in order."""
        return [p for g in self.param_groups if g["shared"] for p in g["params"]]

    # -- per-task gradients ------------------------------------------------------------------
    def backward(self, losses: Any, *, check_finite: bool = False) -> None:
        """Per-task gradients of the shared parameters (kept until ``zero_grad``) and
        Σ_k ∇(w_k L_k) into every other parameter's ``.grad``; ``losses``: T scalars."""
        losses = check_losses_list(losses)
        if len(losses) != self.num_tasks:
            raise ValueError(f"got {len(losses)} losses for num_tasks={self.num_tasks}")
        if check_finite:
            check_finite_losses(losses)
        if self.task_weights is not None:
            losses = [loss * w for loss, w in zip(losses, self.task_weights)]
        shared = self.shared_params()
        if not shared:
            torch.autograd.backward(torch.stack(losses).sum())
            return
        if self._engine is None or not self._engine.matches(shared):
            self._engine = TaskGradients(shared, self.engine_name)
        if self._task_grads:  # pending views of the buffer the engine is about to overwrite
            self._task_grads = {k: g.clone() for k, g in self._task_grads.items()}
        self._engine._compute(losses)  # checked above
        reached = [tuple(col) for col in self._engine.reached.t().tolist()]  # host, no sync
        for k, (p, g) in enumerate(zip(shared, self._engine.grads())):
            old = self._task_grads.get(id(p))
            if old is None:
                self._task_grads[id(p)] = g  # a view of the engine's buffer
                self._reached[id(p)] = reached[k]
            else:  # accumulate, like .grad (own the sum: the buffer is reused)
                self._task_grads[id(p)] = old + g
                self._reached[id(p)] = tuple(a or b for a, b in zip(self._reached[id(p)],
                                                                     reached[k]))

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._task_grads.clear()
        self._reached.clear()

    def _explicit(self, task_grads: Any) -> None:
        shared = self.shared_params()
        items = check_task_grads(task_grads, shared, self.num_tasks)
        self._task_grads.clear()
        self._reached.clear()
        T = self.num_tasks
        for p, g in zip(shared, items):
            if g is None:
                continue
            self._task_grads[id(p)] = g.detach().to(p.dtype).contiguous()
            self._reached[id(p)] = (True,) * T

    # -- state -------------------------------------------------------------------------------
    def _on_device(self, group: dict[str, Any]) -> bool:
        return bool(group["capturable"]) or self._use_fused(group)

    def _use_fused(self, group: dict[str, Any]) -> bool:
        if group["fused"] is not None:
            return bool(group["fused"])
        if group["foreach"] is not None:
            return False
        return self._fused_supported(group)

    def _moment_dtype(self, p: Tensor, group: dict[str, Any]) -> torch.dtype:
        if self.moment_dtype is None or not group["shared"]:
            return p.dtype
        return self.moment_dtype

    def _moment_fills(self, group: dict[str, Any]) -> dict[str, float]:
        """The state tensors (shaped like the parameter, with a leading T on shared groups)
        this group's parameters get, and their initial value."""
        raise NotImplementedError

    def _state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            lead = (self.num_tasks,) if group["shared"] else ()  # one row per task
            device = p.device if self._on_device(group) else torch.device("cpu")
            state["step"] = torch.zeros(lead, dtype=torch.float32, device=device)
            dtype = self._moment_dtype(p, group)
            for name, fill in self._moment_fills(group).items():
                state[name] = torch.full((*lead, *p.shape), fill, dtype=dtype, device=p.device)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype and leaves the steps where they
        # were saved: restore this optimizer's placement and moment dtype.
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                device = p.device if self._on_device(group) else torch.device("cpu")
                state["step"] = state["step"].to(device=device, dtype=torch.float32)
                dtype = self._moment_dtype(p, group)
                for name in self._moments:
                    if name in state:
                        state[name] = state[name].to(dtype=dtype)

    # -- step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None,
             task_grads: Sequence[Tensor | None] | Mapping[Tensor, Tensor] | None = None) -> Any:
        """One update of every parameter with a gradient (``closure`` re-evaluates the model
        and returns the loss, as in ``torch.optim``; ``task_grads``: explicit per-task
        gradients of the shared parameters, replacing any from ``backward``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if task_grads is not None:
            self._explicit(task_grads)
        for group in self.param_groups:
            if group["shared"]:
                entries = [(p, self._task_grads[id(p)], self._reached[id(p)])
                           for p in group["params"] if id(p) in self._task_grads]
                entries = [e for e in entries if any(e[2])]
            else:
                entries = [(p, p.grad.unsqueeze(0), None) for p in group["params"]
                           if p.grad is not None]
            if not entries:
                continue
            for p, _, _ in entries:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse "
                                       "gradients")
            self._update_group(group, entries)
        return loss

    def _update_group(self, group: dict[str, Any], entries: list) -> None:
        fused = self._use_fused(group)
        buckets: dict[tuple, list] = {}
        for entry in entries:
            p = entry[0]
            key = (p.device, p.dtype) if fused else ()
            buckets.setdefault(key, []).append(entry)
        for bucket in buckets.values():
            params = [p for p, _, _ in bucket]
            grads = [g for _, g, _ in bucket]
            states = [self._state(p, group) for p in params]
            steps = [s["step"].view(-1) for s in states]
            moments = {name: [s[name].unsqueeze(0) if not group["shared"] else s[name]
                              for s in states] for name in self._moments if name in states[0]}
            masks = [r for _, _, r in bucket]
            active = None
            if group["shared"] and not all(all(r) for r in masks):
                active = torch.tensor(masks, dtype=torch.bool)
            if fused:
                self._fused(group, params, grads, moments, steps, active)
            else:
                self._torch(group, params, grads, moments, steps, active)

    def _fused(self, group, params, grads, moments, steps, active) -> None:
        raise NotImplementedError

    def _torch(self, group, params, grads, moments, steps, active) -> None:
        raise NotImplementedError

    def _common(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"],
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                    maximize=group["maximize"])

    def _fused_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(self._common(group), validate=False)

    def _foreach(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        if group["foreach"] is not None:
            return bool(group["foreach"])
        return all(p.is_cuda for p in params)


class AdaTaskAdam(_AdaTask):
    """AdaTask-Adam (Yang et al. 2023, Algorithm 2; the official ``Adam_with_AdaTask``).

    Args:
        params: parameters or param groups; groups with ``"shared": True`` get per-task state.
        num_tasks: T.
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, fused: as
            ``torch.optim.Adam``; ``decoupled_weight_decay``: AdamW's decay (module docstring).
        task_weights: w_k scaling task k's loss in ``backward`` (default all 1).
        moment_dtype: storage dtype of the shared parameters' moments (default: theirs).
        engine: "auto" | "loop" | "vmap", how ``backward`` computes per-task gradients.
    """

    _algo = "adam"
    _moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params: Iterable[Any], num_tasks: int, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *,
                 decoupled_weight_decay: bool = False, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False,
                 fused: bool | None = None, task_weights: Sequence[float] | None = None,
                 moment_dtype: torch.dtype | None = None, engine: str = "auto") -> None:
        check_number("lr", lr, low=0)
        check_number("eps", eps, low=0)
        check_number("weight_decay", weight_decay, low=0)
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of floats, got {betas!r}")
        for k, beta in enumerate(betas):
            check_number(f"betas[{k}]", beta, low=0, high=1, high_open=True)
        check_bool("amsgrad", amsgrad)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, decoupled_weight_decay=decoupled_weight_decay,
                        maximize=maximize, foreach=foreach, capturable=capturable, fused=fused)
        super().__init__(params, num_tasks, defaults, task_weights=task_weights,
                         moment_dtype=moment_dtype, engine=engine)

    def _moment_fills(self, group):
        names = self._moments if group["amsgrad"] else self._moments[:2]
        return dict.fromkeys(names, 0.0)

    def _fused(self, group, params, grads, moments, steps, active) -> None:
        beta1, beta2 = group["betas"]
        adatask_ops.adatask_adam_(
            params, grads, moments["exp_avg"], moments["exp_avg_sq"], steps,
            max_exp_avg_sqs=moments.get("max_exp_avg_sq"), active=active, beta1=beta1,
            beta2=beta2, **self._fused_kwargs(group))

    def _torch(self, group, params, grads, moments, steps, active) -> None:
        beta1, beta2 = group["betas"]
        adatask_ops.torch_per_task(
            "adam", params, grads, moments["exp_avg"], moments["exp_avg_sq"], steps,
            max_exp_avg_sqs=moments.get("max_exp_avg_sq"), active=active, a=beta1, b=beta2,
            foreach=self._foreach(group, params), capturable=group["capturable"],
            **self._common(group))


class AdaTaskRMSprop(_AdaTask):
    """AdaTask-RMSprop (Yang et al. 2023, reconstructed: per-task squared averages, summed
    steps; METHODS.md 2.3). Arguments as ``torch.optim.RMSprop`` plus those of
    ``AdaTaskAdam``; ``momentum`` and ``centered`` keep per-task buffers too (torch paths
    only: with them ``fused=True`` is an error)."""

    _algo = "rmsprop"
    _moments = ("square_avg", "momentum_buffer", "grad_avg")

    def __init__(self, params: Iterable[Any], num_tasks: int, lr: float = 1e-2,
                 alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0, centered: bool = False, *,
                 decoupled_weight_decay: bool = False, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False,
                 fused: bool | None = None, task_weights: Sequence[float] | None = None,
                 moment_dtype: torch.dtype | None = None, engine: str = "auto") -> None:
        check_number("lr", lr, low=0)
        check_number("alpha", alpha, low=0, high=1)
        check_number("eps", eps, low=0)
        check_number("weight_decay", weight_decay, low=0)
        check_number("momentum", momentum, low=0)
        check_bool("centered", centered)
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=centered,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                        foreach=foreach, capturable=capturable, fused=fused)
        super().__init__(params, num_tasks, defaults, task_weights=task_weights,
                         moment_dtype=moment_dtype, engine=engine)

    def _fused_supported(self, group):
        return group["momentum"] == 0 and not group["centered"]

    def _unfused_reason(self, group):
        return "RMSprop's momentum or centered options (use foreach)"

    def _moment_fills(self, group):
        used = (True, group["momentum"] > 0, group["centered"])
        return {name: 0.0 for name, on in zip(self._moments, used) if on}

    def _fused(self, group, params, grads, moments, steps, active) -> None:
        adatask_ops.adatask_rmsprop_(params, grads, moments["square_avg"], steps, active=active,
                                     alpha=group["alpha"], **self._fused_kwargs(group))

    def _torch(self, group, params, grads, moments, steps, active) -> None:
        adatask_ops.torch_per_task(
            "rmsprop", params, grads, None, moments["square_avg"], steps, active=active,
            a=group["alpha"], momentum=group["momentum"], centered=group["centered"],
            momentum_buffers=moments.get("momentum_buffer"), grad_avgs=moments.get("grad_avg"),
            foreach=self._foreach(group, params), capturable=group["capturable"],
            **self._common(group))


class AdaTaskAdagrad(_AdaTask):
    """AdaTask-Adagrad (Yang et al. 2023, reconstructed: per-task accumulated squares, summed
    steps; METHODS.md 2.3). Arguments as ``torch.optim.Adagrad`` plus those of
    ``AdaTaskAdam`` (``capturable`` only places the step counters on the device)."""

    _algo = "adagrad"
    _moments = ("sum",)

    def __init__(self, params: Iterable[Any], num_tasks: int, lr: float = 1e-2,
                 lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, *,
                 decoupled_weight_decay: bool = False, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False,
                 fused: bool | None = None, task_weights: Sequence[float] | None = None,
                 moment_dtype: torch.dtype | None = None, engine: str = "auto") -> None:
        check_number("lr", lr, low=0)
        check_number("lr_decay", lr_decay, low=0)
        check_number("weight_decay", weight_decay, low=0)
        check_number("initial_accumulator_value", initial_accumulator_value, low=0)
        check_number("eps", eps, low=0)
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                        foreach=foreach, capturable=capturable, fused=fused)
        super().__init__(params, num_tasks, defaults, task_weights=task_weights,
                         moment_dtype=moment_dtype, engine=engine)

    def _moment_fills(self, group):
        return {"sum": float(group["initial_accumulator_value"])}

    def _fused(self, group, params, grads, moments, steps, active) -> None:
        adatask_ops.adatask_adagrad_(params, grads, moments["sum"], steps, active=active,
                                     lr_decay=group["lr_decay"], **self._fused_kwargs(group))

    def _torch(self, group, params, grads, moments, steps, active) -> None:
        adatask_ops.torch_per_task(
            "adagrad", params, grads, None, moments["sum"], steps, active=active,
            lr_decay=group["lr_decay"], foreach=self._foreach(group, params),
            **self._common(group))
