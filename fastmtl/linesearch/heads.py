"""Evaluation of modules at trial parameters θ − t_k g: one point, or all K points batched.

- ``sequential``: ``torch.func.functional_call`` at θ − t g for one step t (a plain forward).
- ``batched``: the parameters of all K trials stacked into (K, *θ.shape) tensors by
  ``fm.ops.trial_points`` and the module run once under ``torch.vmap`` over them (and over
  the K inputs); a head made of ``nn.Linear`` layers and elementwise activations only (the
  usual MLP head) skips vmap's per-op overhead: batched matmuls over the K parameter sets.
  A module torch cannot vmap raises; the callers then fall back to ``sequential`` for good
  (same t, see ``LatentBacktracking``).

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


_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU,
                nn.Softplus, nn.Identity)


def _linear_chain(module: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The layers of a head made only of ``nn.Linear`` and elementwise activations (nested
    ``nn.Sequential`` allowed, dropout in eval mode is skipped) with their parameter-name
    prefixes, or None for any other head."""
    chain: list[tuple[str, nn.Module]] = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Sequential):
            continue
        if isinstance(sub, nn.Linear):
            chain.append((f"{name}." if name else "", sub))
        elif isinstance(sub, _ELEMENTWISE):
            chain.append((name, sub))
        elif isinstance(sub, nn.modules.dropout._DropoutNd) and not sub.training:
            continue
        else:
            return None
    linear = [m for _, m in chain if isinstance(m, nn.Linear)]
    counted = sum(2 if m.bias is not None else 1 for m in linear)
    if not linear or counted != len(list(module.parameters())):
        return None
    return chain


def _chain_outputs(chain: list[tuple[str, nn.Module]], params: dict[str, Tensor],
                   Z: Tensor) -> Tensor:
    """(K, B, out): the chain at the K stacked parameter sets on Z (K, B, in), by bmm."""
    X = Z
    for prefix, layer in chain:
        if isinstance(layer, nn.Linear):
            W = params[f"{prefix}weight"].transpose(1, 2)
            bias = params.get(f"{prefix}bias")
            X = torch.bmm(X, W) if bias is None else torch.baddbmm(bias.unsqueeze(1), X, W)
        else:
            X = layer(X)
    return X


def batched_head_losses(heads: Sequence[ModuleState], loss_fns: Sequence[Callable],
                        targets: Sequence, Z: Tensor, steps: Tensor) -> Tensor:
    """(K, T): every head at θ_i − t_k g_i on Z[k]. A head that is a chain of linear layers
    and elementwise activations on (B, features) inputs runs as batched matmuls over k (then
    its loss once per k); any other head in one vmapped call over k."""
    columns = []
    for h, loss_fn, y in zip(heads, loss_fns, targets):
        chain = _linear_chain(h.module) if Z.dim() == 3 else None
        if chain is not None:
            out = _chain_outputs(chain, h.stacked(steps), Z)
            columns.append(torch.stack([loss_fn(o, y).reshape(()) for o in out.unbind(0)]))
            continue

        def one(params: dict[str, Tensor], zk: Tensor, h=h, loss_fn=loss_fn, y=y) -> Tensor:
            return loss_fn(h.call(params, zk), y).reshape(())

        columns.append(torch.vmap(one, in_dims=(0, 0))(h.stacked(steps), Z))
    return torch.stack(columns, dim=1)
