"""The "stream" engine: K without the (T, N) matrix of per-task gradients.

For a leaf module m that owns shared parameters θ_m, called as y = m(x; θ_m), the per-task
gradient is a vector-Jacobian product at the module's output:

    ∇_{θ_m} L_i = J_{θ_m}(x)ᵀ δ_i,        δ_i = ∂L_i/∂y   (the cotangent of task i at y)

so G_m (T, n_m) is one vmapped VJP of the module alone over the T cotangents, and

    K = Σ_m G_m G_mᵀ (+ the shared parameters no leaf module owns),
    d_m = Σ_i w_i ∇_{θ_m} L_i = J_{θ_m}(x)ᵀ (Σ_i w_i δ_i)       (one plain VJP per module call).

``StreamGradients(model, shared_params)`` registers forward hooks that record each call of such a
module (its arguments and output). ``compute(losses)`` then runs T backward passes that stop
at the recorded outputs, at the shared parameters no leaf module owns ("orphans", e.g. an
``nn.Parameter`` used in a parent's ``forward``) and at the non-shared leaves (the heads, which
get Σ_i ∇ L_i in ``.grad`` as with ``sum(losses).backward()``); no parameter-gradient product is
formed in those passes. For each module (all its calls together: a module applied twice, tied
weights, sums its calls) G_m is built, folded into K and freed. Peak extra memory: T × the
recorded module outputs (the cotangents), T × the largest module's parameters, and T × the
orphans' size, not T × N.

The module is recomputed (``torch.func.functional_call`` on detached arguments) to take its
VJP. A BatchNorm in training mode is recomputed with ``track_running_stats=False``: it
normalises with the same batch statistics and its running statistics are updated exactly once,
by the real forward. Leaf modules with parameters must be deterministic (Linear, Conv, norms,
embeddings are). A module whose backward has no vmap batching rule falls back to a loop of T
VJPs. The engine needs the hooks in place before the forward: create it once, before
training, and pass it as ``engine=`` (``close()`` removes the hooks). Every forward with grad
enabled is recorded until the next ``compute``; calls no loss of the step depends on (another
forward's) are skipped there, and ``clear()`` drops them earlier (they keep their activations
alive until then).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from fastmtl import ops
from fastmtl._checks import check_shared_params
from fastmtl.engine.base import GradientEngine
from fastmtl.engine.graph import task_masks

__all__ = ["StreamGradients"]


def _remove(handles: list) -> None:
    for h in handles:
        h.remove()


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


class _Call:
    """One recorded call of a hooked module, and after ``compute`` its cotangents and VJP."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> None:
        self.module, self.args, self.kwargs, self.out = module, args, kwargs, out
        self.deltas: Tensor | None = None     # (T, *out.shape)
        self.vjp_fn = None
        # y = x Wᵀ + b: ∇_W L_i = δ_iᵀ x and ∇_b L_i = Σ_rows δ_i in closed form (no recompute)
        self.linear = (type(module) is nn.Linear and len(args) == 1 and not kwargs
                       and isinstance(args[0], Tensor))

    def rows(self) -> Tensor:
        """A linear call's input as (M, in) rows, detached."""
        x = self.args[0].detach()
        return x.reshape(-1, x.shape[-1])


class StreamGradients(GradientEngine):
    """Per-task gradients folded into K module by module, never held as a (T, N) matrix."""

    def __init__(self, model: nn.Module, shared_params: Iterable[Tensor]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        params = check_shared_params(shared_params)
        for k, p in enumerate(params):
            if not p.is_floating_point():
                raise TypeError(f"shared_params[{k}] must be floating point, got {p.dtype}")
        self.params = params
        ids = {id(p): k for k, p in enumerate(params)}
        self.modules = [m for m in model.modules() if _is_leaf(m)
                        and any(id(p) in ids for p in m.parameters(recurse=False))]
        owned = {id(p) for m in self.modules for p in m.parameters(recurse=False)}
        self.orphans = [p for p in params if id(p) not in owned]
        self._index = ids
        self._calls: list[_Call] = []
        self._recomputing = False
        ref = weakref.ref(self)   # the hooks must not keep a dropped engine (and its calls) alive

        def record(module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            engine = ref()
            if engine is not None:
                engine._record(module, args, kwargs, out)

        self._handles = [m.register_forward_hook(record, with_kwargs=True) for m in self.modules]
        self._finalizer = weakref.finalize(self, _remove, list(self._handles))
        self.num_tasks: int | None = None
        self._K: Tensor | None = None
        self._orphan_grads: list[Tensor] = []
        self._pending: list[_Call] = []
        self._ready = False   # compute ran and apply/discard did not yet

    def matches(self, params: list[Tensor]) -> bool:
        """True if ``params`` are this engine's shared parameters (same tensors, same order)."""
        return len(params) == len(self.params) and all(a is b for a, b in zip(params,
                                                                               self.params))

    def clear(self) -> None:
        """Forget the module calls recorded since the last ``compute`` (a forward whose losses
        will not be aggregated keeps its activations alive until then)."""
        self._calls = []

    def close(self) -> None:
        """Remove the forward hooks (also done when the engine is garbage-collected)."""
        self._finalizer()
        self._handles = []

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        if self._recomputing or not torch.is_grad_enabled():
            return
        if isinstance(out, Tensor) and out.requires_grad:
            self._calls.append(_Call(module, args, kwargs, out))

    # -- compute ---------------------------------------------------------------------------
    def _compute(self, losses: list[Tensor]) -> StreamGradients:
        calls, self._calls = self._calls, []
        T, P = len(losses), len(self.params)
        leaves, _ = task_masks(losses)
        masks = [0] * P
        others = []
        for leaf, mask in leaves:
            k = self._index.get(id(leaf))
            if k is None:
                others.append(leaf)
            else:
                masks[k] = mask
        called = {id(c.module) for c in calls}
        for m in self.modules:
            if id(m) not in called and any(masks[self._index[id(p)]]
                                           for p in m.parameters(recurse=False)
                                           if id(p) in self._index):
                raise RuntimeError(
                    f"StreamGradients recorded no call of {type(m).__name__} (it owns shared "
                    "parameters the losses reach) since the last compute: create the engine "
                    "before the forward, and run the forward with grad enabled")
        inputs = [c.out for c in calls] + self.orphans + others
        n_calls, n_orph = len(calls), len(self.orphans)
        deltas: list[list[Tensor | None]] = [[None] * T for _ in calls]
        orphan: list[list[Tensor | None]] = [[None] * T for _ in self.orphans]
        summed: list[Tensor | None] = [None] * len(others)
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, inputs, retain_graph=i < T - 1,
                                        allow_unused=True)
            for c in range(n_calls):
                deltas[c][i] = grads[c]
            for k in range(n_orph):
                orphan[k][i] = grads[n_calls + k]
            for k, g in enumerate(grads[n_calls + n_orph:]):
                if g is not None:
                    summed[k] = g if summed[k] is None else summed[k] + g
        with torch.no_grad():
            for leaf, g in zip(others, summed):   # the heads: Σ_i ∇ L_i, as backward() does
                if g is not None:
                    leaf.grad = g if leaf.grad is None else leaf.grad.add_(g)
        acc = torch.float64 if any(p.dtype == torch.float64 for p in self.params) \
            else torch.float32
        device = self.params[0].device
        K = torch.zeros(T, T, dtype=acc, device=device)
        live = []
        for c, call in enumerate(calls):
            if all(d is None for d in deltas[c]):
                continue   # an output no loss depends on (e.g. another forward's): nothing to do
            call.deltas = torch.stack([d if d is not None else torch.zeros_like(call.out)
                                       for d in deltas[c]])
            if not call.linear:
                call.vjp_fn = self._vjp(call)
            live.append(call)
        calls = live
        for module in dict.fromkeys(c.module for c in calls):   # module by module
            blocks: dict[int, Tensor] = {}
            for call in (c for c in calls if c.module is module):
                for name, g in self._per_task(call).items():
                    p = getattr(module, name)
                    if id(p) in self._index:
                        blocks[id(p)] = g if id(p) not in blocks else blocks[id(p)] + g
            for g in blocks.values():
                K += ops.gram(g.reshape(T, -1)).to(device=device, dtype=acc)
        self._orphan_grads = []
        for k, p in enumerate(self.orphans):
            G = torch.stack([g if g is not None else torch.zeros_like(p) for g in orphan[k]])
            self._orphan_grads.append(G)
            K += ops.gram(G.reshape(T, -1)).to(device=device, dtype=acc)
        self._K = K
        self._reached = torch.tensor([[bool(m >> i & 1) for m in masks] for i in range(T)],
                                     dtype=torch.bool).reshape(T, P)
        self._pending, self._ready = calls, True
        self.num_tasks = T
        return self

    def _vjp(self, call: _Call):
        """The VJP of the module alone w.r.t. its parameters at the recorded arguments."""
        module = call.module
        params = {n: p.detach() for n, p in module.named_parameters(recurse=False)}
        args = tuple(a.detach() if isinstance(a, Tensor) else a for a in call.args)
        kwargs = {k: v.detach() if isinstance(v, Tensor) else v for k, v in call.kwargs.items()}
        norm = isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
        saved = module.track_running_stats if norm else None
        self._recomputing = True
        if norm:
            module.track_running_stats = False   # batch statistics, running stats untouched
        try:
            _, fn = vjp(lambda p: functional_call(module, p, args, kwargs), params)
        finally:
            self._recomputing = False
            if norm:
                module.track_running_stats = saved
        return fn

    @staticmethod
    def _per_task(call: _Call) -> dict[str, Tensor]:
        """{parameter name: (T, *p.shape)} for one call: closed form for a Linear, else the
        vmapped VJP, else a loop of T VJPs (an op without a batching rule)."""
        if call.linear:
            x = call.rows()
            d = call.deltas.reshape(call.deltas.shape[0], -1, call.deltas.shape[-1])
            out = {"weight": torch.matmul(d.mT, x.to(d.dtype))}
            if call.module.bias is not None:
                out["bias"] = d.sum(1)
            return out
        try:
            (g,) = vmap(call.vjp_fn)(call.deltas)
            return g
        except RuntimeError:
            rows = [call.vjp_fn(d)[0] for d in call.deltas]
            return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}

    # -- read-out ---------------------------------------------------------------------------
    def gram(self) -> Tensor:
        """K = Σ_m G_m G_mᵀ (T, T): float32, float64 if a shared parameter is float64."""
        self._require_computed()
        return self._K

    def direction(self, w: Tensor) -> list[Tensor]:
        """d_p = Σ_i w_i ∇_p L_i per shared parameter (shaped like it), by one VJP per module
        call with the weighted cotangent Σ_i w_i δ_i."""
        w = self._check_weights(w)
        if not self._ready:
            raise RuntimeError("StreamGradients: call compute(losses) first (each compute "
                               "allows one apply)")
        out: list[Tensor | None] = [None] * len(self.params)
        with torch.no_grad():
            for call in self._pending:
                wd = torch.tensordot(w.to(device=call.deltas.device, dtype=call.deltas.dtype),
                                     call.deltas, dims=1)
                if call.linear:
                    wd = wd.reshape(-1, wd.shape[-1])
                    grads = {"weight": wd.mT @ call.rows().to(wd.dtype)}
                    if call.module.bias is not None:
                        grads["bias"] = wd.sum(0)
                else:
                    (grads,) = call.vjp_fn(wd)
                for name, g in grads.items():
                    k = self._index.get(id(getattr(call.module, name)))
                    if k is not None:
                        out[k] = g if out[k] is None else out[k] + g
            for p, G in zip(self.orphans, self._orphan_grads):
                k = self._index[id(p)]
                out[k] = torch.tensordot(w.to(device=G.device, dtype=G.dtype), G, dims=1)
        return [torch.zeros_like(p) if d is None else d for p, d in zip(self.params, out)]

    def apply(self, w: Tensor, *, return_direction: bool = False) -> list[Tensor] | None:
        """``p.grad += d_p`` for each shared p a task reached (None stays None otherwise)."""
        d = self.direction(w)
        active = self._reached.any(0).tolist()
        with torch.no_grad():
            for p, dp, on in zip(self.params, d, active):
                if on:
                    p.grad = dp if p.grad is None else p.grad.add_(dp)
        self.discard()
        return d if return_direction else None

    def discard(self) -> None:
        """Drop the cotangents and VJPs kept for ``apply``."""
        self._pending, self._orphan_grads, self._ready = [], [], False
