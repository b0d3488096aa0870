"""``TaskGradients``: per-task gradients of the shared parameters in persistent buffers.

For shared parameters θ_sh split into (device, dtype) groups g with buffers G_g (T, N_g):

    compute(losses)   G_g[i] = vec(∇_{θ_g} L_i)            ("loop" or "vmap", see those modules)
    gram()            K = Σ_g G_g G_gᵀ                      (each by ``ops.gram``, summed in fp32,
                                                            or fp64 when a group is fp64)
    apply(w)          p.grad += d_p, d_g = G_gᵀ w, for every shared p a task reached
    direction(w)      d_g = G_gᵀ w alone                    (``ops.combine`` per group)

Every non-shared leaf of the losses' graph (the heads) receives Σ_i ∇ L_i in its ``.grad`` during
``compute``, as ``sum(losses).backward()`` would. ``reached`` (T, P) tells a (task, parameter)
pair that got no gradient (its rows are zero, and it is False) from one whose gradient is zero.

Engine choice (``engine=``): "loop", "vmap", or "auto": "loop" when the losses are on the CPU
or T <= 2, else "vmap". If "vmap" raises under "auto", this object warns once and uses "loop"
from then on; to make that fallback possible its first "vmap" pass retains the graph (freed
when the losses are). Buffers are allocated on the first ``compute`` and reused while T stays
the same; a different T reallocates them. The object holds its parameters by weak reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from fastmtl import ops
from fastmtl._checks import check_engine_name, check_shared_params
from fastmtl.engine.base import ParameterEngine, auto_mode
from fastmtl.engine.buffer import ParamGroup, group_params
from fastmtl.engine.loop import loop_compute
from fastmtl.engine.vmap import VmapUnsupportedError, vmap_compute
from fastmtl.ops._common import acc_dtype

__all__ = ["TaskGradients"]


class TaskGradients(ParameterEngine):
    """Per-task gradients of ``shared_params`` in one (T, N) buffer per (device, dtype) group."""

    def __init__(self, shared_params: Iterable[Tensor], engine: str = "auto") -> None:
        params = check_shared_params(shared_params)
        self._hold(params)
        self.engine = check_engine_name(engine, who="TaskGradients")
        self.groups: list[ParamGroup] = group_params(params)
        self.num_tasks: int | None = None
        self.mode: str | None = None          # the mode the last compute used
        self._vmap_ok: bool | None = None     # auto: None untried, True worked, False failed

    # -- compute ----------------------------------------------------------------------------
    def _mode(self, device: torch.device, T: int) -> str:
        if self.engine != "auto":
            return self.engine
        if self._vmap_ok is False:
            return "loop"
        return auto_mode(device, T)

    def _compute(self, losses: list[Tensor]) -> TaskGradients:
        """Per-task gradients of ``losses`` into the buffers; heads get Σ_i ∇ L_i."""
        params = self.params
        T = len(losses)
        for g in self.groups:
            g.allocate(T)
        mode = self._mode(losses[0].device, T)
        if mode == "vmap":
            trial = self.engine == "auto" and self._vmap_ok is None
            try:
                reached = vmap_compute(params, self.groups, losses, retain_graph=trial)
                if trial:
                    self._vmap_ok = True
            except VmapUnsupportedError as exc:
                if not trial:
                    raise
                warnings.warn(f"fastmtl: engine='auto' falls back to 'loop' for good: {exc}",
                              RuntimeWarning, stacklevel=2)
                self._vmap_ok = False
                mode = "loop"
        if mode == "loop":
            reached = loop_compute(params, self.groups, losses)
        self._reached = torch.tensor(reached, dtype=torch.bool).reshape(T, len(params))
        self.num_tasks, self.mode = T, mode
        return self

    # -- read-out ---------------------------------------------------------------------------
    @property
    def matrices(self) -> list[Tensor]:
        """The (T, N_g) buffers, one per group (views into them stay valid across steps)."""
        self._require_computed()
        return [g.buffer for g in self.groups]

    def grads(self) -> list[Tensor]:
        """Per-parameter views (T, *p.shape) of the buffers, in ``shared_params`` order."""
        self._require_computed()
        out: list[Tensor | None] = [None] * len(self._refs)
        for g in self.groups:
            for j, k in enumerate(g.indices):
                out[k] = g.views[j]
        return out

    def gram(self) -> Tensor:
        """K = Σ_g G_g G_gᵀ (T, T) on the first group's device: float32, or float64 if any
        group is float64 (each group's Gram by ``ops.gram``, then summed in that dtype)."""
        T = self._require_computed()
        parts = [ops.gram(g.buffer) for g in self.groups if g.numel > 0]
        dtype = torch.float64 if any(K.dtype == torch.float64 for K in parts) else torch.float32
        device = self.groups[0].device
        K = torch.zeros(T, T, dtype=dtype, device=device) if not parts else parts[0].to(dtype)
        for part in parts[1:]:
            K = K + part.to(device=device, dtype=dtype)
        return K

    @staticmethod
    def _weights_for(w: Tensor, g: ParamGroup) -> Tensor:
        return w.detach().to(device=g.device, dtype=acc_dtype(g.dtype))

    def direction(self, w: Tensor) -> list[Tensor]:
        """d_g = G_gᵀ w per group: flat (N_g,) tensors in the group's dtype (newly allocated)."""
        w = self._check_weights(w)
        with torch.no_grad():
            return [ops.combine(self._weights_for(w, g), g.buffer) if g.numel > 0
                    else g.buffer.new_zeros(0) for g in self.groups]

    def apply(self, w: Tensor, *, return_direction: bool = False) -> list[Tensor] | None:
        """``p.grad += d_p`` (d = Gᵀw) for each shared p that some task reached; returns
        ``direction(w)`` (computed apart, newly allocated) if ``return_direction``.

        A parameter no task reached keeps its ``.grad`` (None stays None, as with backward()).
        A ``.grad`` that is None becomes a slice of the group's persistent direction buffer and
        ``ops.combine(out=...)`` writes into it; if the grads already are those slices,
        ``combine(accumulate=True)`` adds into them; any other ``.grad`` gets ``add_``. The
        slices are reused by later steps: clone a ``.grad`` you keep past ``zero_grad()``.
        """
        w = self._check_weights(w)
        params = self.params
        active = self._reached.any(0).tolist()
        with torch.no_grad():
            for g in self.groups:
                if g.numel == 0 or not any(active[k] for k in g.indices):
                    continue
                flat = g.direction_buffer()
                wg = self._weights_for(w, g)
                grads = [params[k].grad for k in g.indices]
                ours = [grad is view for grad, view in zip(grads, g.flat_views)]
                foreign = [grad is not None and not o for grad, o in zip(grads, ours)]
                fresh = [j for j, k in enumerate(g.indices) if active[k] and grads[j] is None]
                if not any(foreign):
                    if any(ours):
                        for j in fresh:
                            g.flat_views[j].zero_()
                        ops.combine(wg, g.buffer, out=flat, accumulate=True)
                    else:
                        ops.combine(wg, g.buffer, out=flat)
                    for j in fresh:
                        params[g.indices[j]].grad = g.flat_views[j]
                    continue
                d = ops.combine(wg, g.buffer)
                for j, k in enumerate(g.indices):
                    if not active[k]:
                        continue
                    o, n = g.offsets[j], g.numels[j]
                    part = d[o:o + n].view(g.shapes[j])
                    if grads[j] is None:
                        g.flat_views[j].copy_(part)
                        params[k].grad = g.flat_views[j]
                    else:
                        grads[j].add_(part)
        return self.direction(w) if return_direction else None

    def __repr__(self) -> str:
        return (f"TaskGradients(params={len(self._refs)}, groups={self.groups}, "
                f"engine={self.engine!r}, mode={self.mode!r})")
