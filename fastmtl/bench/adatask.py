"""AdaTask step benchmark: one optimizer step over a real network's parameter list, T tasks.

Parameter lists: ResNet-18 (torchvision's layout: 62 tensors, 11.7 M elements) and a
transformer block (d = 1024, MLP 4d: 12.6 M elements), ``scale`` dividing every width for
smoke runs. Per-task gradients are given (random, fixed); only the step is timed. Compared
in one run:

- ``fastmtl fused``: ``AdaTaskAdam(fused=True)`` (one multi-tensor launch on a GPU; T × torch's
  fused CPU Adam on the CPU)
- ``foreach path``: ``AdaTaskAdam(foreach=True)`` (torch's foreach Adam once per task)
- ``official loop``: the official code's structure, a Python loop over parameters and tasks
  with in-place torch ops (``Adam_with_AdaTask``)
- ``T x torch Adam(fused)``: T ``torch.optim.Adam(fused=True)`` instances, one per task, each
  stepping the same parameters (the speed AdaTask cannot beat without fusing across tasks)

Bytes-moved floor of a step (float32): read T gradients, read and write 2T moments, read and
write θ once: (5T + 2)·|θ|·4 bytes.
"""

from __future__ import annotations

import math

import torch

from fastmtl.bench.cases import Row, _time_impls
from fastmtl.optim.adatask import AdaTaskAdam

__all__ = ["PARAM_LISTS", "adatask_cases", "param_shapes"]


def _resnet18(scale: int) -> list[tuple[int, ...]]:
    c = [64 // scale, 128 // scale, 256 // scale, 512 // scale]
    shapes: list[tuple[int, ...]] = [(c[0], 3, 7, 7), (c[0],), (c[0],)]
    cin = c[0]
    for stage, cout in enumerate(c):
        for block in range(2):
            first = block == 0 and stage > 0
            shapes += [(cout, cin if block == 0 else cout, 3, 3), (cout,), (cout,),
                       (cout, cout, 3, 3), (cout,), (cout,)]
            if first:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
        cin = cout
    return shapes + [(1000 // scale, c[3]), (1000 // scale,)]


def _transformer_block(scale: int) -> list[tuple[int, ...]]:
    d = 1024 // scale
    return [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,),
            (d, 4 * d), (d,)]


PARAM_LISTS = {"resnet18": _resnet18, "transformer-block": _transformer_block}


def param_shapes(name: str, scale: int = 1) -> list[tuple[int, ...]]:
    return PARAM_LISTS[name](scale)


def _official_loop(params, grads, state, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8) -> None:
    """The official ``Adam_with_AdaTask.step`` structure: per parameter, per task, in place."""
    with torch.no_grad():
        for p, g in zip(params, grads):
            st = state[p]
            st["step"] += 1
            bc1, bc2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
            for k in range(g.shape[0]):
                m, v = st["m"][k], st["v"][k]
                m.mul_(b1).add_(g[k], alpha=1 - b1)
                v.mul_(b2).addcmul_(g[k], g[k], value=1 - b2)
                denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bc1)


def adatask_cases(device: str, name: str, T: int, scale: int = 1) -> list[Row]:
    gen = torch.Generator(device=device).manual_seed(T)
    shapes = param_shapes(name, scale)
    numel = sum(math.prod(s) for s in shapes)

    def fresh():
        return [torch.randn(s, generator=gen, device=device) for s in shapes]

    grads = [torch.randn((T, *s), generator=gen, device=device) * 1e-2 for s in shapes]
    fused_p, foreach_p, loop_p, torch_p = fresh(), fresh(), fresh(), fresh()
    fused = AdaTaskAdam([{"params": fused_p, "shared": True}], num_tasks=T, fused=True)
    foreach = AdaTaskAdam([{"params": foreach_p, "shared": True}], num_tasks=T, foreach=True)
    loop_state = {p: {"step": 0, "m": torch.zeros(T, *p.shape, device=device),
                      "v": torch.zeros(T, *p.shape, device=device)} for p in loop_p}
    per_task = [torch.optim.Adam(torch_p, fused=True) for _ in range(T)]

    def torch_steps():
        for k, opt in enumerate(per_task):
            for p, g in zip(torch_p, grads):
                p.grad = g[k]
            opt.step()

    impls = {
        "fastmtl fused": lambda: fused.step(task_grads=grads),
        "foreach path": lambda: foreach.step(task_grads=grads),
        "official loop": lambda: _official_loop(loop_p, grads, loop_state),
        "T x torch Adam(fused)": torch_steps,
    }
    case = f"{name}{'' if scale == 1 else f'/{scale}'} T={T} ({numel / 1e6:.2g}M)"
    return _time_impls("adatask.step", case, device, impls, (5 * T + 2) * numel * 4)
