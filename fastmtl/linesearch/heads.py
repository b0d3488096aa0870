"""Evaluation of modules at trial parameters θ − t_k g: one point, or all K points batched.

- ``sequential``: ``torch.func.functional_call`` at θ − t g for one step t (a plain forward).
- ``batched``: the parameters of all K trials stacked into (K, *θ.shape) tensors by
  ``fm.ops.trial_points`` and the module run once under ``torch.vmap`` over them (and over
  the K inputs). A module torch cannot vmap raises; the callers then fall back to
  ``sequential`` for good (same t, see ``LatentBacktracking``).

Both run under ``torch.no_grad`` (no graph is built for a trial). Modules whose output depends
on ``training`` (dropout, batch norm, instance norm with running statistics) are evaluated in
eval mode during trials (``trial_mode``), so a trial never updates running statistics and is
deterministic; the callers then also re-evaluate the reference point in eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fastmtl.ops.trial_points import trial_points

__all__ = ["ModuleState", "batched_head_losses", "head_losses", "mode_sensitive", "trial_mode"]

_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
              nn.modules.dropout._DropoutNd)


def mode_sensitive(modules: Sequence[nn.Module]) -> bool:
    """True if a module in training mode contains a layer that behaves differently in eval."""
    return any(sub.training and isinstance(sub, _SENSITIVE)
               for m in modules for sub in m.modules())


@contextlib.contextmanager
def trial_mode(modules: Sequence[nn.Module], switch: bool) -> Iterator[None]:
    """Eval mode for ``modules`` while inside (when ``switch``), restoring every submodule's
    own ``training`` flag afterwards; always under ``torch.no_grad``."""
    saved = [(sub, sub.training) for m in modules for sub in m.modules()] if switch else []
    try:
        if switch:
            for m in modules:
                m.eval()
        with torch.no_grad():
            yield
    finally:
        for sub, flag in saved:
            sub.training = flag


class ModuleState:
    """A module's parameters θ, their step g (``.grad``, zeros where None) and its buffers."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p.detach() for _, p in named]
        self.grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach()
                      for _, p in named]
        self.buffers = dict(module.named_buffers())

    def at(self, step: Tensor) -> dict[str, Tensor]:
        """{name: θ − t g} for ``step`` (1,): row 0 of ``trial_points``."""
        return {n: trial_points(p, g, step)[0]
                for n, p, g in zip(self.names, self.params, self.grads)}

    def stacked(self, steps: Tensor) -> dict[str, Tensor]:
        """{name: (K, *θ.shape)} with row k = θ − t_k g, one ``trial_points`` per tensor."""
        return {n: trial_points(p, g, steps)
                for n, p, g in zip(self.names, self.params, self.grads)}

    def sq_norm(self, device: torch.device) -> Tensor:
        """‖g‖² summed over the parameters, float64 on ``device`` (0 when there are none)."""
        total = torch.zeros((), dtype=torch.float64, device=device)
        for g in self.grads:
            total = total + g.double().pow(2).sum().to(device)
        return total

    def call(self, params: dict[str, Tensor], *args: object) -> object:
        return functional_call(self.module, (params, self.buffers), args)


def head_losses(heads: Sequence[ModuleState], loss_fns: Sequence[Callable], targets: Sequence,
                z: Tensor, params: Sequence[dict[str, Tensor]]) -> Tensor:
    """(T,) L_i(h_i(z; params_i), y_i) at one point."""
    out = [loss_fn(h.call(p, z), y) for h, loss_fn, y, p in zip(heads, loss_fns, targets, params)]
    return torch.stack([loss.reshape(()) for loss in out])


def batched_head_losses(heads: Sequence[ModuleState], loss_fns: Sequence[Callable],
                        targets: Sequence, Z: Tensor, steps: Tensor) -> Tensor:
    """(K, T): every head at θ_i − t_k g_i on Z[k], in one vmapped call over k."""
    def one(params: list[dict[str, Tensor]], zk: Tensor) -> Tensor:
        return head_losses(heads, loss_fns, targets, zk, params)

    return torch.vmap(one, in_dims=(0, 0))([h.stacked(steps) for h in heads], Z)
