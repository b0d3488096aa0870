"""Latent mode (MGDA-UB, Sener & Koltun 2018, §3.3): per-task gradients w.r.t. a shared
representation z instead of the shared parameters.

    bind(z)             the features of this step (the engine forgets them after ``apply``)
    compute(losses)     G_z[i] = vec(∇_z L_i)        (T, z.numel()); T VJPs that stop at z
                                                     ("loop"), or one batched VJP ("vmap")
    gram()              K_z = G_z G_zᵀ
    direction(w)        d_z = G_zᵀ w                  (shaped like z)
    apply(w)            pull d_z back (returned if asked):
                          heads (between z and the losses)  .grad += Σ_i ∇ L_i
                          parameters behind z               .grad += J_zᵀ d_z   (one VJP)

"loop" gives the heads their gradients in its T passes (as the parameter-space engines do) and
``apply`` runs one backward pass from z alone. Where a leaf is both in front of z and behind
it (a skip connection around z, a shared tensor used by a head), and with "vmap", ``apply``
is instead one backward pass of Σ_i L_i during which a hook on z replaces the gradient flowing
into z by d_z: such a parameter also receives its plain gradient Σ_i ∇ L_i along its other
paths.
The graph is retained between ``compute`` and ``apply`` and freed by ``apply`` (or
``discard``).
``reached`` (T,) says which losses depend on z; the rows of the others are zero. The (T, n)
buffer is reused while T, z.numel(), z's dtype and device stay the same.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from fastmtl import ops
from fastmtl._checks import check_engine_name, check_features
from fastmtl.engine.base import GradientEngine, auto_mode
from fastmtl.engine.graph import children, task_masks
from fastmtl.engine.vmap import VmapUnsupportedError
from fastmtl.ops._common import acc_dtype

__all__ = ["LatentGradients"]


class LatentGradients(GradientEngine):
    """Per-task gradients w.r.t. the features z in a persistent (T, z.numel()) buffer."""

    def __init__(self, engine: str = "auto") -> None:
        self.engine = check_engine_name(engine, who="LatentGradients")
        self.buffer: Tensor | None = None
        self.num_tasks: int | None = None
        self.mode: str | None = None
        self._features: Tensor | None = None                      # z, from bind to apply
        self._pending: list[Tensor] | None = None                 # the losses, until apply
        self._vmap_ok: bool | None = None
        self._split = False    # compute gave the heads their gradients (see ``_loop``)

    def bind(self, features: Tensor) -> LatentGradients:
        """Take ``features`` (the shared representation z of this step) for the next
        ``compute``; returns ``self``."""
        return self._bind(check_features(features))

    def _bind(self, features: Tensor) -> LatentGradients:
        """``bind`` on features already checked (by an entry point)."""
        self._features = features
        return self

    def _allocate(self, T: int, z: Tensor) -> None:
        b = self.buffer
        if b is None or b.shape != (T, z.numel()) or b.dtype != z.dtype or b.device != z.device:
            self.buffer = torch.zeros(T, z.numel(), dtype=z.dtype, device=z.device)

    def _compute(self, losses: list[Tensor]) -> LatentGradients:
        """G_z[i] = ∇_z L_i for the bound features z; keeps the graph for ``apply``."""
        z = self._features
        if z is None:
            raise RuntimeError("LatentGradients: bind(features) before compute(losses): the "
                               "features z are those of the step")
        T = len(losses)
        self._allocate(T, z)
        mode = self.engine if self.engine != "auto" else (
            "loop" if self._vmap_ok is False else auto_mode(losses[0].device, T))
        if mode == "vmap":
            try:
                reached = self._vmap(losses, z)
                self._vmap_ok = True
            except VmapUnsupportedError as exc:
                if self.engine != "auto":
                    raise
                warnings.warn(f"fastmtl: engine='auto' falls back to 'loop' for good: {exc}",
                              RuntimeWarning, stacklevel=2)
                self._vmap_ok, mode = False, "loop"
        self._split = False
        if mode == "loop":
            reached = self._loop(losses, z)
        self._reached = torch.tensor(reached, dtype=torch.bool)
        self.num_tasks, self.mode, self._pending = T, mode, losses
        return self

    def _loop(self, losses: list[Tensor], z: Tensor) -> list[bool]:
        """T VJPs that stop at z. When no leaf in front of z (a head) is also behind it, the
        same passes give the heads their Σ_i ∇ L_i, and ``apply`` then runs from z alone."""
        heads, _ = task_masks(losses, target=z)
        heads = [leaf for leaf, _ in heads if leaf is not z]
        self._split = not _behind(z, heads)
        inputs = [z, *heads] if self._split else [z]
        summed: list[Tensor | None] = [None] * (len(inputs) - 1)
        reached = []
        T = len(losses)
        for i, loss in enumerate(losses):
            g, *rest = torch.autograd.grad(loss, inputs, allow_unused=True,
                                           retain_graph=not self._split or i < T - 1)
            with torch.no_grad():
                if g is None:
                    self.buffer[i].zero_()
                else:
                    self.buffer[i].copy_(g.reshape(-1))
            for k, h in enumerate(rest):
                if h is not None:
                    summed[k] = h if summed[k] is None else summed[k] + h
            reached.append(g is not None)
        with torch.no_grad():
            for leaf, h in zip(heads, summed):   # Σ_i ∇ L_i, as backward() gives the heads
                if h is not None:
                    leaf.grad = h if leaf.grad is None else leaf.grad.add_(h)
        return reached

    def _vmap(self, losses: list[Tensor], z: Tensor) -> list[bool]:
        T = len(losses)
        _, mask = task_masks(losses, target=z)
        stacked = torch.stack(losses)
        eye = torch.eye(T, dtype=stacked.dtype, device=stacked.device)
        try:
            (g,) = torch.autograd.grad(stacked, z, grad_outputs=eye, is_grads_batched=True,
                                       retain_graph=True, allow_unused=True)
        except RuntimeError as exc:
            raise VmapUnsupportedError(
                f"engine='vmap': the batched VJP into the features failed ({exc}); "
                "use engine='loop' instead.") from exc
        with torch.no_grad():
            if g is None:
                self.buffer.zero_()
                mask = 0
            else:
                self.buffer.copy_(g.reshape(T, -1))
        return [bool(mask >> i & 1) for i in range(T)]

    def gram(self) -> Tensor:
        """K_z = G_z G_zᵀ (T, T), float32 (float64 for float64 z)."""
        self._require_computed()
        return ops.gram(self.buffer)

    def direction(self, w: Tensor) -> Tensor:
        """d_z = G_zᵀ w, shaped like z, in z's dtype."""
        w = self._check_weights(w)
        z = self._features if self._pending is not None else None
        w = w.detach().to(device=self.buffer.device, dtype=acc_dtype(self.buffer.dtype))
        with torch.no_grad():
            d = ops.combine(w, self.buffer)
        return d if z is None else d.view(z.shape)

    def discard(self) -> None:
        """Drop the references to the losses and z kept since ``bind`` (frees the graph)."""
        self._pending = self._features = None

    def apply(self, w: Tensor, *, return_direction: bool = False) -> Tensor | None:
        """Pull d_z = G_zᵀ w back: one backward of Σ_i L_i with z's gradient replaced by d_z;
        returns d_z if ``return_direction``."""
        if self._pending is None:
            raise RuntimeError("LatentGradients.apply: call bind(features).compute(losses) "
                               "first (each compute allows one apply)")
        d_z = self.direction(w)
        losses, z = self._pending, self._features
        self.discard()
        if self._split:   # the heads have their gradients from compute: from z alone
            if z.requires_grad and (z.grad_fn is not None or z.is_leaf):
                torch.autograd.backward(z, d_z)
            return d_z if return_direction else None
        handle = z.register_hook(lambda _grad: d_z)
        try:
            torch.autograd.backward(losses)
        finally:
            handle.remove()
        return d_z if return_direction else None


def _behind(z: Tensor, leaves: list[Tensor]) -> bool:
    """Whether one of ``leaves`` is also reached through z (a skip connection around z)."""
    if not leaves:
        return False
    ids = {id(leaf) for leaf in leaves}
    if z.grad_fn is None:
        return id(z) in ids
    stack, seen = [z.grad_fn], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if id(getattr(node, "variable", None)) in ids:
            return True
        stack.extend(c for c, _ in children(node))
    return False
