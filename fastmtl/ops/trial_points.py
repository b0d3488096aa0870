r"""Trial points of a line search: Z_k = z − t_k d for all K step sizes at once.

``trial_points(z, d, steps)`` for z and d of the same shape, device and dtype and ``steps``
(K,) (a tensor on z's device, or a Python sequence of numbers) returns Z of shape
(K, *z.shape) in z's dtype:

.. math::

    Z_k = z - t_k\,d, \qquad k < K,

computed in the accumulation dtype (float32 for half inputs, float64 for float64) and rounded
once. The kernels read z and d once per block and write all K outputs (one pass instead of K).
It builds the K latent trial points of ``fm.linesearch.LatentBacktracking`` (Filatov &
Merkulov, arXiv:2110.00874) and the stacked head parameters θ_i − t_k ∇θ_i of its batched
trials. The Triton and CUDA kernels may contract z − t·d into one fused multiply-add (one
rounding instead of two), so they can differ from the reference by one ulp of the
accumulation dtype.

Gradient: dz = Σ_k dZ_k, dd = −Σ_k t_k dZ_k, dt_k = −⟨dZ_k, d⟩ (in the accumulation dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastmtl.ops._common import acc_dtype, check_same_device, kernel, select

__all__ = ["trial_points", "trial_points_reference"]


def trial_points_reference(z: Tensor, d: Tensor, steps: Tensor) -> Tensor:
    """Z = z − steps ⊗ d in the accumulation dtype, cast to z's dtype: shape (K, *z.shape)."""
    acc = acc_dtype(z.dtype)
    t = steps.to(acc).view(-1, *([1] * z.dim()))
    return (z.to(acc).unsqueeze(0) - t * d.to(acc)).to(z.dtype)


@torch.library.custom_op("fastmtl::trial_points", mutates_args=())
def _trial_points_kernel(z: Tensor, d: Tensor, steps: Tensor, backend: str) -> Tensor:
    out = torch.empty((steps.shape[0], z.numel()), dtype=z.dtype, device=z.device)
    kernel("trial_points", backend)(z.reshape(-1), d.reshape(-1), steps, out)
    return out


@_trial_points_kernel.register_fake
def _(z: Tensor, d: Tensor, steps: Tensor, backend: str) -> Tensor:
    return z.new_empty((steps.shape[0], z.numel()))


def _setup_context(ctx, inputs, output) -> None:
    z, d, steps, _ = inputs
    ctx.save_for_backward(d, steps)


def _backward(ctx, dZ: Tensor):
    d, steps = ctx.saved_tensors
    acc = steps.dtype
    dZa = dZ.to(acc)
    dz = dd = dt = None
    if ctx.needs_input_grad[0]:
        dz = dZa.sum(0).view(d.shape).to(d.dtype)
    if ctx.needs_input_grad[1]:
        dd = -(steps @ dZa).view(d.shape).to(d.dtype)
    if ctx.needs_input_grad[2]:
        dt = -(dZa @ d.reshape(-1).to(acc))
    return dz, dd, dt, None


_trial_points_kernel.register_autograd(_backward, setup_context=_setup_context)


def _check(z: object, d: object, steps: object) -> tuple[Tensor, Tensor, Tensor]:
    op = "trial_points"
    for name, t in (("z", z), ("d", d)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    assert isinstance(z, Tensor) and isinstance(d, Tensor)
    if d.shape != z.shape:
        raise ValueError(f"{op}: d must have z's shape {tuple(z.shape)}, got {tuple(d.shape)}")
    if d.dtype != z.dtype:
        raise TypeError(f"{op}: d has dtype {d.dtype} but z has dtype {z.dtype}")
    check_same_device(op, z, "z", d, "d")
    acc = acc_dtype(z.dtype)
    if isinstance(steps, Tensor):
        if steps.dim() != 1:
            raise ValueError(f"{op}: steps must be 1-D of shape (K,), got shape "
                             f"{tuple(steps.shape)}")
        if not steps.is_floating_point():
            raise TypeError(f"{op}: steps must be a floating tensor, got {steps.dtype}")
        check_same_device(op, z, "z", steps, "steps")
        steps = steps.to(acc)
    elif isinstance(steps, Sequence) and not isinstance(steps, str | bytes):
        if any(isinstance(s, bool) or not isinstance(s, int | float) for s in steps):
            raise TypeError(f"{op}: steps given as a sequence must hold numbers, got {steps!r}")
        steps = torch.tensor([float(s) for s in steps], dtype=acc, device=z.device)
    else:
        raise TypeError(f"{op}: steps must be a 1-D tensor or a sequence of numbers, "
                        f"got {type(steps).__name__}")
    if steps.shape[0] < 1:
        raise ValueError(f"{op}: steps must hold K >= 1 step sizes, got none")
    return z, d, steps


def trial_points(z: Tensor, d: Tensor, steps: Tensor | Sequence[float]) -> Tensor:
    """Z_k = z − t_k d for every step size t_k in ``steps``: shape (K, *z.shape), z's dtype.

    ``z`` and ``d`` must have the same shape, dtype and device; ``steps`` is a 1-D floating
    tensor on z's device (cast to the accumulation dtype) or a sequence of numbers. Wrong
    types, shapes or devices raise ``TypeError``/``ValueError`` naming the problem.
    Differentiable w.r.t. z, d and steps.
    """
    z, d, steps = _check(z, d, steps)
    K = steps.shape[0]
    if z.numel() == 0:
        return z.new_zeros((K, *z.shape))
    backend = select(z)
    if backend == "torch":
        return trial_points_reference(z, d, steps)
    zc, dc = z.contiguous(), d.contiguous()
    return _trial_points_kernel(zc, dc, steps, backend).view(K, *z.shape)
