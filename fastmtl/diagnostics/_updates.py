r"""Per-task updates Δθ_k of one optimizer step, read back from the optimizer's state (not public).

Called right after ``optimizer.step()``; every function checks its input first, then returns
``(index, Δ)`` pairs, Δ of shape
(T, *p.shape) in ``acc_dtype(p.dtype)`` on p's device, for the tracked parameters the optimizer
holds state for. Tensor ops only: no host synchronisation.

- AdaTask-Adam (per-task state):  Δθ_k = −η m̂_k / (√v̂_k + ε)  (v_k: the amsgrad maximum)
- AdaTask-RMSprop:                Δθ_k = −η g_k / (√v_k + ε)
- AdaTask-Adagrad:                Δθ_k = −η / (1 + (t_k − 1)δ) · g_k / (√s_k + ε)
- torch.optim.Adam / AdamW:       Δθ_k = −η m̂_k / (√v̂ + ε), m_k = EMA_β1 of g_k kept by the
  caller (``exp_avgs``), v̂ Adam's joint second moment, so Σ_k m_k = Adam's m and Σ_k Δθ_k is
  Adam's update (without weight decay).

A task whose step counter did not move since the previous call (it did not reach the parameter,
or the optimizer skipped the parameter) gets Δθ_k = 0: ``seen`` holds the counters of the last
call, per tracked parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastmtl._checks import check_task_grads
from fastmtl.ops._common import acc_dtype
from fastmtl.optim.adatask import AdaTaskAdagrad, AdaTaskAdam, AdaTaskRMSprop

__all__ = ["ADATASK", "adam_updates", "adatask_updates", "group_of"]

ADATASK = {AdaTaskAdam: "adam", AdaTaskRMSprop: "rmsprop", AdaTaskAdagrad: "adagrad"}

_WHO = "TaskDominance.update_from"


def group_of(optimizer: Optimizer, params: Sequence[Tensor],
             names: Sequence[str]) -> list[dict[str, Any]]:
    """The param group of every tracked parameter (ValueError when one is not in the optimizer)."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p, name in zip(params, names):
        if id(p) not in groups:
            raise ValueError(f"{_WHO}: tracked parameter {name!r} is not in "
                             f"{type(optimizer).__name__}'s param_groups")
        out.append(groups[id(p)])
    return out


def _moved(step: Tensor, seen: list[Tensor | None], i: int) -> Tensor:
    """step != the step of the previous call (then remember ``step``)."""
    if seen[i] is None or seen[i].shape != step.shape:
        seen[i] = torch.zeros_like(step)
    moved = step != seen[i]
    seen[i].copy_(step)
    return moved


def _bias_correction(beta: float, step: Tensor) -> Tensor:
    """1 − β^t, and 1 where t = 0 (no step yet: the update is masked out anyway)."""
    return torch.where(step > 0, 1 - beta ** step, torch.ones_like(step))


def adatask_updates(optimizer: Optimizer, params: Sequence[Tensor], names: Sequence[str],
                    T: int, seen: list[Tensor | None],
                    task_grads: Any) -> list[tuple[int, Tensor]]:
    """Δθ_k of an AdaTask optimizer (``task_grads`` needed for RMSprop and Adagrad only).
    Everything is checked before ``seen`` changes."""
    algo = next(name for cls, name in ADATASK.items() if isinstance(optimizer, cls))
    if optimizer.num_tasks != T:
        raise ValueError(f"{_WHO}: the optimizer has num_tasks={optimizer.num_tasks}, this "
                         f"diagnostic {T}")
    groups = group_of(optimizer, params, names)
    for name, group in zip(names, groups):
        if not group["shared"]:
            raise ValueError(f"{_WHO}: tracked parameter {name!r} is in a non-shared group "
                             f"of {type(optimizer).__name__} (no per-task state): track only "
                             "shared parameters")
        if algo == "rmsprop" and (group["momentum"] != 0 or group["centered"]):
            raise ValueError(f"{_WHO}: AdaTaskRMSprop with momentum or centered is not "
                             "supported")
    grads: list[Tensor | None] = [None] * len(params)
    if algo != "adam":
        if task_grads is None:
            raise ValueError(f"{_WHO}: {type(optimizer).__name__}'s per-task step needs the "
                             "per-task gradients of the step: pass task_grads (only "
                             "AdaTaskAdam's step can be read from its state alone)")
        grads = check_task_grads(task_grads, params, T, names=names, who=_WHO,
                             kind="tracked")
    out = []
    for i, (p, group) in enumerate(zip(params, groups)):
        state = optimizer.state.get(p)
        if not state or (algo != "adam" and grads[i] is None):
            continue
        cdt = acc_dtype(p.dtype)
        view = (T,) + (1,) * p.dim()
        step = state["step"].to(device=p.device, dtype=cdt)
        moved = _moved(step, seen, i).view(view)
        lr, eps = group["lr"], group["eps"]
        if algo == "adam":
            beta1, beta2 = group["betas"]
            m = state["exp_avg"].to(cdt)
            v = state["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"].to(cdt)
            bc1 = _bias_correction(beta1, step).view(view)
            bc2 = _bias_correction(beta2, step).view(view)
            delta = -(lr / bc1) * m / (v.sqrt() / bc2.sqrt() + eps)
        else:
            g = grads[i].to(cdt)
            g = -g if group["maximize"] else g
            if algo == "rmsprop":
                delta = -lr * g / (state["square_avg"].to(cdt).sqrt() + eps)
            else:
                clr = lr / (1 + (step - 1).clamp_min(0) * group["lr_decay"])
                delta = -clr.view(view) * g / (state["sum"].to(cdt).sqrt() + eps)
        out.append((i, torch.where(moved, delta, torch.zeros_like(delta))))
    return out


def adam_updates(optimizer: Optimizer, params: Sequence[Tensor], names: Sequence[str], T: int,
                 seen: list[Tensor | None], exp_avgs: list[Tensor | None],
                 task_grads: Any) -> list[tuple[int, Tensor]]:
    """Δθ_k of ``torch.optim.Adam``: task k's share m_k of the linear first moment (kept here in
    ``exp_avgs``, updated only when Adam's step counter moved) over Adam's joint √v̂.
    Everything is checked before ``seen`` and ``exp_avgs`` change."""
    if task_grads is None:
        raise ValueError(f"{_WHO}: torch.optim.Adam keeps no per-task state: pass task_grads, "
                         "the per-task gradients whose sum Adam stepped on")
    groups = group_of(optimizer, params, names)
    grads = check_task_grads(task_grads, params, T, names=names, who=_WHO,
                             kind="tracked")
    out = []
    for i, (p, group, g) in enumerate(zip(params, groups, grads)):
        state = optimizer.state.get(p)
        if not state or g is None:
            continue
        cdt = acc_dtype(p.dtype)
        step = state["step"].to(device=p.device, dtype=cdt)
        moved = _moved(step, seen, i)
        beta1, beta2 = group["betas"]
        g = g.to(cdt)
        g = -g if group["maximize"] else g
        if exp_avgs[i] is None:
            exp_avgs[i] = torch.zeros((T, *p.shape), dtype=cdt, device=p.device)
        m = exp_avgs[i]
        m.copy_(torch.where(moved, torch.lerp(m, g, 1 - beta1), m))
        v = state["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"].to(cdt)
        bc1, bc2 = _bias_correction(beta1, step), _bias_correction(beta2, step)
        delta = -(group["lr"] / bc1) * m / (v.sqrt() / bc2.sqrt() + group["eps"])
        out.append((i, torch.where(moved, delta, torch.zeros_like(delta))))
    return out
