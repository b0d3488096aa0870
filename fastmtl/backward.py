"""``fm.mtl_backward``: one multi-task backward pass.

For losses L_1..L_T, shared parameters θ_sh and an aggregator:

    G = [∇_{θ_sh} L_1; ...; ∇_{θ_sh} L_T]        (T, N)   per-task gradients (``engine``)
    K = G Gᵀ                                     (T, T)   ``ops.gram`` per (device, dtype) group
    w = aggregator.weights(K, losses)            (T,)
    θ_sh.grad += d = Gᵀ w                                ``ops.combine`` per group
    θ.grad    += Σ_i ∇_θ L_i                              every other parameter (the heads)

and returns w. In latent mode (``features=z``, MGDA-UB) G is replaced by G_z = [∇_z L_i] and
the direction d_z = G_zᵀ w is pulled back with one backward pass (see ``engine.latent``):
parameters behind z get J_zᵀ d_z, the heads Σ_i ∇ L_i, and a parameter the losses use other
than through z also its plain gradient along those other paths.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from fastmtl._checks import (
    check_aggregator,
    check_engine,
    check_features,
    check_finite_losses,
    check_losses_list,
    check_shared_params,
)
from fastmtl.engine import cache, pipeline
from fastmtl.engine.base import GradientEngine, prefers_stream
from fastmtl.engine.latent import LatentGradients
from fastmtl.engine.stream import StreamGradients
from fastmtl.engine.task_gradients import TaskGradients

__all__ = ["mtl_backward"]


def _resolve_engine(engine: str | GradientEngine, params: list[Tensor], latent: bool,
                    num_tasks: int) -> GradientEngine:
    """The engine object for a checked ``engine`` argument (a name: from the cache)."""
    if isinstance(engine, LatentGradients):
        if not latent:
            raise TypeError("a LatentGradients engine needs features=z")
        return engine
    if isinstance(engine, TaskGradients | StreamGradients):   # parameter space
        kind = type(engine).__name__
        if latent:
            raise TypeError(f"features= (latent mode) needs a LatentGradients engine, "
                            f"got a {kind}")
        if not engine.matches(params):
            raise ValueError(f"the {kind} passed as engine was built for other shared "
                             "parameters")
        return engine
    if latent:
        if engine == "stream":
            raise ValueError("features= (latent mode) forms the (T, z.numel()) gradients "
                             "w.r.t. z, never a (T, N) matrix: engine='stream' does not "
                             "apply; use engine='auto'")
        return cache.cached("latent", engine, params, lambda: LatentGradients(engine))
    if engine == "stream":
        return cache.cached("params", engine, params, lambda: StreamGradients(params))
    if engine == "auto":   # chosen once, at the first step for these parameters
        return cache.cached("params", engine, params, lambda: (
            StreamGradients(params) if prefers_stream(params, num_tasks)
            else TaskGradients(params, engine)))
    return cache.cached("params", engine, params, lambda: TaskGradients(params, engine))


def mtl_backward(
    losses: Sequence[Tensor] | Tensor,
    shared_params: Iterable[Tensor],
    aggregator,
    features: Tensor | None = None,
    engine: str | GradientEngine = "auto",
    *,
    check_finite: bool = False,
) -> Tensor:
    """Fill ``.grad``: shared params the aggregated direction, the rest the plain sum.

    Args:
        losses: T >= 1 scalar losses (a sequence, or a 1-D tensor), all on one device.
        shared_params: the parameters whose per-task gradients are aggregated (the encoder).
        aggregator: a ``fastmtl.aggregators.Aggregator`` (a method of your own: subclass it).
            Anything else, a loss weighting included, is a ``TypeError`` before any backward.
        features: the shared representation z: latent (MGDA-UB) mode, K from ∇_z L_i.
        engine: "loop" | "vmap" | "stream" | "auto", or an engine object of your own
            (``TaskGradients(shared_params)``, ``StreamGradients(shared_params)``, or
            ``LatentGradients()`` with ``features``). "loop" and "vmap" hold the (T, N)
            per-task gradients (T backward passes, or one batched pass); "stream" folds K
            block by block and never holds them (``fastmtl.engine.stream``). "auto": "stream"
            when the (T, N) buffer would exceed its budget (``engine.prefers_stream``: a fixed
            size on the CPU, a fraction of the free memory on a GPU; decided at the first step
            for these parameters), else "loop" when the losses are on the CPU or T <= 2,
            else "vmap" (falling back to "loop" for good if vmap fails). By name, the engine
            comes from a small module-level cache keyed on the shared parameters (held
            weakly), so its buffers are reused across steps.
        check_finite: raise ``ValueError`` on a non-finite loss (reads the losses on the host:
            a synchronisation on GPU).

    Returns:
        w (T,): the weights, float32 (float64 when K is), on K's device; d = Gᵀ w.

    Like ``backward()``, this *accumulates*: ``.grad += ...``. The graph is freed afterwards.
    A shared parameter's ``.grad`` that was None becomes a view of a persistent per-group
    direction buffer (reused every step: clone it to keep it past ``zero_grad()``). A shared
    parameter that no loss reaches keeps its ``.grad`` (None stays None); a (task, parameter)
    pair without a gradient counts as a zero gradient for that task (``TaskGradients.reached``
    tells the two apart). Aggregators with ``fast_path`` "sum" / "mean" (``Sum``, ``Mean``) take
    one backward pass of Σ_i L_i (resp. (1/T) Σ_i L_i) and build no per-task gradients, with or
    without ``features``. Any ``torch.optim`` optimizer can step afterwards.
    """
    losses = check_losses_list(losses)
    params = check_shared_params(shared_params)
    aggregator = check_aggregator(aggregator)
    if features is not None:
        features = check_features(features)
    engine = check_engine(engine)
    if check_finite:
        check_finite_losses(losses)
    T = len(losses)
    fast = getattr(aggregator, "fast_path", None)
    if fast in ("sum", "mean"):
        scale = 1.0 if fast == "sum" else 1.0 / T
        torch.autograd.backward(losses, [torch.full_like(loss, scale) for loss in losses])
        dtype = torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32
        return torch.full((T,), scale, dtype=dtype, device=losses[0].device)
    eng = _resolve_engine(engine, params, features is not None, T)
    if features is not None:
        eng._bind(features)  # checked above
    return pipeline.run(eng, losses, aggregator.weights).w
