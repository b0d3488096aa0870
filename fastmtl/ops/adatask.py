r"""AdaTask updates (Yang et al., AAAI 2023): per-task moments on shared parameters, one pass.

For a parameter θ with T task gradients g_1..g_T (rows of a (T, *θ.shape) tensor) and per-task
state, every active task k updates its own moments and the parameter takes the **sum** of the
per-task steps (AdaTask, Algorithm 2 and the official ``Adam_with_AdaTask``):

.. math::

    \theta \leftarrow \theta(1 - \eta\lambda)_{\text{decoupled}} - \sum_{k} u_k, \qquad
    g_k \leftarrow \pm g_k + \tfrac{\lambda}{T}\theta\ \ (\text{coupled } L_2)

- Adam:    m_k = β1 m_k + (1−β1) g_k,  v_k = β2 v_k + (1−β2) g_k²  (v_k ← max(v̂ buffer, v_k)
  with amsgrad),  u_k = η/(1−β1^{t_k}) · m_k / (√v_k/√(1−β2^{t_k}) + ε)
- RMSprop: v_k = α v_k + (1−α) g_k²,  u_k = η g_k / (√v_k + ε)
- Adagrad: s_k = s_k + g_k²,  u_k = η/(1 + (t_k − 1)δ) · g_k / (√s_k + ε)

t_k is task k's step counter (float32 tensor of shape (T,) per parameter, incremented here for
the active tasks): a task that did not reach θ this step (``active[i, k]`` False) leaves its
moments and counter unchanged and adds no step, so its bias correction stays that of the steps
it took. With T = 1 each update is exactly torch's Adam / RMSprop / Adagrad (ε outside the
square root, after bias correction; coupled decay g + λθ; decoupled θ(1 − ηλ) as AdamW).
The coupled decay is the term λ/2‖θ‖² of the summed objective shared equally by the tasks and
uses θ before the step; ``maximize`` negates g_k before the decay is added (torch's order).

``adatask_{adam,rmsprop,adagrad}_(params, grads, ...)`` take lists: ``params`` (P tensors, one
device and dtype), ``grads[i]`` (T, *params[i].shape) (any row stride, unit stride inside a
row, e.g. the engine's buffer views), moments (T, *shape) contiguous in one dtype (the
parameters' or a lower one such as bfloat16: storage only, arithmetic in float32), steps (T,)
float32 on the parameters' device. Implementations (``fastmtl.backend``):

==========  =========================================================================
"cuda"      the same multi-tensor launch as "triton" in the compiled extension
            (``csrc/adatask.cu``), through the same address and block tables
"triton"    one multi-tensor launch per call (``fastmtl.kernels.adatask``): θ read and
            written once, T gradients read, 2T moments read and written; no host sync
"torch"     per task, torch's own optimizer functions on the list of that task's
            tensors (``_fused_adam_``/``_fused_adagrad_`` on CPU where torch has them,
            else foreach), after applying the decay once; moments in another dtype than
            the parameters use ``adatask_reference``
==========  =========================================================================

``adatask_reference`` is the spec: a plain loop over parameters and tasks in torch ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim import adagrad as _torch_adagrad
from torch.optim import adam as _torch_adam
from torch.optim import rmsprop as _torch_rmsprop

from fastmtl._checks import check_bool, check_number
from fastmtl.ops._common import acc_dtype, kernel, select

__all__ = [
    "ALGORITHMS",
    "adatask_adagrad_",
    "adatask_adam_",
    "adatask_reference",
    "adatask_rmsprop_",
    "torch_per_task",
]

ALGORITHMS = ("adam", "rmsprop", "adagrad")


def _as_list(op: str, name: str, x: object) -> list[Tensor]:
    if isinstance(x, Tensor) or not isinstance(x, Sequence):
        raise TypeError(f"{op}: {name} must be a list of tensors, got {type(x).__name__}")
    if not all(isinstance(t, Tensor) for t in x):
        raise TypeError(f"{op}: every element of {name} must be a torch.Tensor")
    return list(x)


def _check(op: str, params, grads, moments: dict[str, object], steps, active):
    """Validate the lists; return them with grads flattened to (T, n) views, and T."""
    params = _as_list(op, "params", params)
    grads = _as_list(op, "grads", grads)
    lists = {name: _as_list(op, name, m) for name, m in moments.items()}
    steps = _as_list(op, "state_steps", steps)
    P = len(params)
    for name, other in [("grads", grads), ("state_steps", steps), *lists.items()]:
        if len(other) != P:
            raise ValueError(f"{op}: {name} has {len(other)} tensors for {P} params")
    if P == 0:
        return params, grads, lists, steps, None, 0
    device, dtype = params[0].device, params[0].dtype
    T = grads[0].shape[0] if grads[0].dim() > 0 else 0
    if T < 1:
        raise ValueError(f"{op}: grads[0] must have shape (T, *params[0].shape) with T >= 1")
    state_dtype = next(iter(lists.values()))[0].dtype
    flat = []
    for i, (p, g, s) in enumerate(zip(params, grads, steps)):
        if not p.is_floating_point():
            raise TypeError(f"{op}: params[{i}] must be floating point, got {p.dtype}")
        if p.device != device or p.dtype != dtype:
            raise ValueError(f"{op}: params[{i}] is {p.dtype} on {p.device}; all params must "
                             f"share params[0]'s device ({device}) and dtype ({dtype})")
        if tuple(g.shape) != (T, *p.shape):
            raise ValueError(f"{op}: grads[{i}] must have shape {(T, *p.shape)}, "
                             f"got {tuple(g.shape)}")
        if g.device != device or g.dtype != dtype:
            raise ValueError(f"{op}: grads[{i}] is {g.dtype} on {g.device}; expected {dtype} "
                             f"on {device}")
        for name, ms in lists.items():
            m = ms[i]
            if tuple(m.shape) != (T, *p.shape) or not m.is_contiguous():
                raise ValueError(f"{op}: {name}[{i}] must be contiguous of shape "
                                 f"{(T, *p.shape)}, got {tuple(m.shape)}")
            if m.device != device or m.dtype != state_dtype or not m.is_floating_point():
                raise ValueError(f"{op}: {name}[{i}] is {m.dtype} on {m.device}; all moments "
                                 f"must be one floating dtype ({state_dtype}) on {device}")
        if tuple(s.shape) != (T,) or s.dtype != torch.float32 or s.device != device:
            raise ValueError(f"{op}: state_steps[{i}] must be a float32 tensor of shape "
                             f"({T},) on {device}, got {s.dtype} {tuple(s.shape)} on {s.device}")
        g2 = g.reshape(T, -1)
        if p.numel() > 1 and g2.stride(1) != 1:
            raise ValueError(f"{op}: grads[{i}] must have unit stride inside each task row")
        flat.append(g2)
    if active is not None:
        if not isinstance(active, Tensor) or active.dtype != torch.bool \
                or tuple(active.shape) != (P, T):
            raise ValueError(f"{op}: active must be a bool tensor of shape ({P}, {T})")
    return params, flat, lists, steps, active, T


def _decay(params, grads, T, lr, weight_decay, decoupled, maximize):
    """Apply the decay once: θ(1 − ηλ) in place (decoupled), or the task gradients
    ±g_k + (λ/T)θ as new tensors (coupled; torch's order: sign first). Returns the gradients
    and whether the callee must still negate them (``maximize`` not yet applied)."""
    if weight_decay == 0:
        return grads, maximize
    if decoupled:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        return grads, maximize
    signed = [torch.neg(g) for g in grads] if maximize else grads
    return [g.add(p.unsqueeze(0), alpha=weight_decay / T)
            for g, p in zip(signed, params)], False


def adatask_reference(algo: str, params, grads, exp_avgs, exp_avg_sqs, state_steps, *,
                      max_exp_avg_sqs=None, active=None, lr: float, a: float = 0.9,
                      b: float = 0.999, eps: float = 1e-8, lr_decay: float = 0.0,
                      weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                      maximize: bool = False) -> None:
    """The update of the module docstring as a loop over params and tasks (the spec).

    ``algo`` in ``ALGORITHMS``; ``a``: β1 (Adam) or α (RMSprop); ``b``: β2 (Adam).
    ``exp_avgs`` is unused except by Adam (pass the second moments again). Arithmetic in
    float32 (float64 for float64 params), moments stored back in their dtype.
    """
    T = grads[0].shape[0] if grads else 0
    for i, p in enumerate(params):
        cdt = acc_dtype(p.dtype)
        theta = p.detach().reshape(-1).to(cdt)
        new = theta * (1.0 - lr * weight_decay) if decoupled_weight_decay else theta.clone()
        for k in range(T):
            if active is not None and not bool(active[i, k]):
                continue
            g = grads[i][k].reshape(-1).to(cdt)
            g = -g if maximize else g
            if weight_decay != 0 and not decoupled_weight_decay:
                g = g + (weight_decay / T) * theta
            state_steps[i][k] += 1
            step = float(state_steps[i][k])
            v = exp_avg_sqs[i][k].reshape(-1).to(cdt)
            if algo == "adam":
                m = torch.lerp(exp_avgs[i][k].reshape(-1).to(cdt), g, 1 - a)
                v = v * b + (1 - b) * g * g
                exp_avgs[i][k].copy_(m.view_as(exp_avgs[i][k]))
                exp_avg_sqs[i][k].copy_(v.view_as(exp_avg_sqs[i][k]))
                if max_exp_avg_sqs is not None:
                    v = torch.maximum(max_exp_avg_sqs[i][k].reshape(-1).to(cdt), v)
                    max_exp_avg_sqs[i][k].copy_(v.view_as(max_exp_avg_sqs[i][k]))
                denom = v.sqrt() / (1 - b**step) ** 0.5 + eps
                new = new - (lr / (1 - a**step)) * (m / denom)
            elif algo == "rmsprop":
                v = v * a + (1 - a) * g * g
                exp_avg_sqs[i][k].copy_(v.view_as(exp_avg_sqs[i][k]))
                new = new - lr * (g / (v.sqrt() + eps))
            else:
                v = v + g * g
                exp_avg_sqs[i][k].copy_(v.view_as(exp_avg_sqs[i][k]))
                new = new - (lr / (1 + (step - 1) * lr_decay)) * (g / (v.sqrt() + eps))
        with torch.no_grad():
            p.copy_(new.view_as(p))


def torch_per_task(algo: str, params, grads, exp_avgs, exp_avg_sqs, state_steps, *,
                   max_exp_avg_sqs=None, active=None, lr: float, a: float = 0.9,
                   b: float = 0.999, eps: float = 1e-8, lr_decay: float = 0.0,
                   weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                   maximize: bool = False, foreach: bool | None = None,
                   fused: bool | None = None, capturable: bool = False,
                   momentum: float = 0.0, centered: bool = False, momentum_buffers=None,
                   grad_avgs=None) -> None:
    """The update with torch's own optimizer functions, one call per task over that task's
    tensors (``foreach``/``fused``/``capturable`` as in ``torch.optim``): the decay is applied
    once beforehand, so each call runs without decay. With T = 1, no decay or coupled decay,
    this is the same sequence of torch operations as ``torch.optim.Adam`` & co. (bit for bit
    on the single-tensor path). RMSprop's ``momentum``/``centered`` keep per-task buffers
    (``momentum_buffers``/``grad_avgs``, lists of (T, *shape)); ``a``, ``b`` as in
    ``adatask_reference``."""
    if not params:
        return
    T = grads[0].shape[0]
    grads, flip = _decay(params, grads, T, lr, weight_decay, decoupled_weight_decay, maximize)
    for k in range(T):
        idx = [i for i in range(len(params)) if active is None or bool(active[i, k])]
        if not idx:
            continue
        ps = [params[i] for i in idx]
        gs = [grads[i][k].view_as(params[i]) for i in idx]
        steps = [state_steps[i][k] for i in idx]
        vs = [exp_avg_sqs[i][k] for i in idx]
        common = dict(foreach=foreach, lr=lr, weight_decay=0.0, eps=eps, maximize=flip)
        if algo == "adam":
            ms = [exp_avgs[i][k] for i in idx]
            xs = [max_exp_avg_sqs[i][k] for i in idx] if max_exp_avg_sqs is not None else []
            _torch_adam.adam(ps, gs, ms, vs, xs, steps, fused=fused, capturable=capturable,
                                  amsgrad=max_exp_avg_sqs is not None, beta1=a, beta2=b,
                                  **common)
        elif algo == "rmsprop":
            bufs = [momentum_buffers[i][k] for i in idx] if momentum > 0 else []
            avgs = [grad_avgs[i][k] for i in idx] if centered else []
            _torch_rmsprop.rmsprop(ps, gs, vs, avgs, bufs, steps, capturable=capturable,
                                        alpha=a, momentum=momentum, centered=centered,
                                        **common)
        else:
            _torch_adagrad.adagrad(ps, gs, vs, steps, fused=fused, lr_decay=lr_decay,
                                        **common)


_ALGO_INDEX = {name: k for k, name in enumerate(ALGORITHMS)}
_TORCH_FUSED_CPU = ("adam", "adagrad")  # torch has _fused_adam_ / _fused_adagrad_ for CPU


def _update(op: str, algo: str, params, grads, exp_avgs, exp_avg_sqs, state_steps, maxes,
            active, hyper: dict, validate: bool) -> None:
    moments = {"exp_avg_sqs": exp_avg_sqs}
    if algo == "adam":
        moments["exp_avgs"] = exp_avgs
    if maxes is not None:
        moments["max_exp_avg_sqs"] = maxes
    if validate:
        params, flat, lists, steps, active, T = _check(op, params, grads, moments, state_steps,
                                                       active)
        for key in ("lr", "eps", "weight_decay", "a", "b", "lr_decay"):
            check_number(key, hyper[key], low=0, who=op)
        check_bool("maximize", hyper["maximize"], who=op)
        check_bool("decoupled_weight_decay", hyper["decoupled_weight_decay"], who=op)
    else:  # the caller built these lists (the optimizers): the same, without the checks
        lists, steps = moments, state_steps
        flat = [g.reshape(g.shape[0], -1) for g in grads]
    if not params:
        return
    name = select(params[0])
    exp_avgs = lists.get("exp_avgs", lists["exp_avg_sqs"])
    with torch.no_grad():
        if name in ("triton", "cuda"):
            if active is None:
                torch._foreach_add_(steps, 1.0)
                flags = None
            else:
                flags = active.to(device=params[0].device, dtype=torch.int8)
                torch._foreach_add_(steps, list(flags.to(torch.float32).unbind(0)))
            # Both launchers take the same arguments ("cuda": fastmtl._ext.adatask).
            kernel("adatask", name)(
                _ALGO_INDEX[algo], params, flat, exp_avgs, lists["exp_avg_sqs"],
                maxes if maxes is not None else lists["exp_avg_sqs"], steps, flags,
                lr=hyper["lr"], weight_decay=hyper["weight_decay"], eps=hyper["eps"],
                a=hyper["a"], b=hyper["b"], lr_decay=hyper["lr_decay"],
                amsgrad=maxes is not None, maximize=hyper["maximize"],
                decoupled=hyper["decoupled_weight_decay"])
        elif lists["exp_avg_sqs"][0].dtype != params[0].dtype:
            adatask_reference(algo, params, grads, exp_avgs, lists["exp_avg_sqs"], steps,
                              max_exp_avg_sqs=maxes, active=active, **hyper)
        else:
            cpu = params[0].device.type == "cpu"
            fused = cpu and algo in _TORCH_FUSED_CPU
            torch_per_task(algo, params, list(grads), exp_avgs, lists["exp_avg_sqs"], steps,
                           max_exp_avg_sqs=maxes, active=active, foreach=not fused,
                           fused=fused or None, **hyper)


def adatask_adam_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                  exp_avg_sqs: list[Tensor], state_steps: list[Tensor], *,
                  max_exp_avg_sqs: list[Tensor] | None = None, active: Tensor | None = None,
                  lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                  weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                  maximize: bool = False, validate: bool = True) -> None:
    """AdaTask-Adam in place on lists (module docstring); ``max_exp_avg_sqs`` turns on
    amsgrad; ``active`` (P, T) bool: which tasks update which parameter (default: all).
    ``validate=False`` skips the input checks (for callers that built the lists themselves,
    like ``fm.optim.AdaTaskAdam``: a bad list is then undefined behaviour in a kernel)."""
    _update("adatask_adam_", "adam", params, grads, exp_avgs, exp_avg_sqs, state_steps,
            max_exp_avg_sqs, active,
            dict(lr=lr, a=beta1, b=beta2, eps=eps, lr_decay=0.0, weight_decay=weight_decay,
                 decoupled_weight_decay=decoupled_weight_decay, maximize=maximize), validate)


def adatask_rmsprop_(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor],
                     state_steps: list[Tensor], *, active: Tensor | None = None, lr: float,
                     alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                     decoupled_weight_decay: bool = False, maximize: bool = False,
                     validate: bool = True) -> None:
    """AdaTask-RMSprop in place on lists (module docstring; no momentum, not centered: those
    run on the optimizer's torch paths); ``validate`` as in ``adatask_adam_``."""
    _update("adatask_rmsprop_", "rmsprop", params, grads, None, square_avgs, state_steps,
            None, active,
            dict(lr=lr, a=alpha, b=0.0, eps=eps, lr_decay=0.0, weight_decay=weight_decay,
                 decoupled_weight_decay=decoupled_weight_decay, maximize=maximize), validate)


def adatask_adagrad_(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor],
                     state_steps: list[Tensor], *, active: Tensor | None = None, lr: float,
                     lr_decay: float = 0.0, eps: float = 1e-10, weight_decay: float = 0.0,
                     decoupled_weight_decay: bool = False, maximize: bool = False,
                     validate: bool = True) -> None:
    """AdaTask-Adagrad in place on lists (module docstring); ``validate`` as in
    ``adatask_adam_``."""
    _update("adatask_adagrad_", "adagrad", params, grads, None, state_sums, state_steps,
            None, active,
            dict(lr=lr, a=0.0, b=0.0, eps=eps, lr_decay=lr_decay, weight_decay=weight_decay,
                 decoupled_weight_decay=decoupled_weight_decay, maximize=maximize), validate)
