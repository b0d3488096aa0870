r"""The interpolation coefficient α: checking it, drawing it, and setting it on a model.

PaMaL (Dimitriadis, Frossard & Fleuret, ICML 2023, §3; code ``src/ll/weight_ensemble.py``)
draws, at every forward pass, **one** α for the whole network and the whole mini-batch:

.. math::  \alpha \sim \mathrm{Dir}(p\,\mathbf{1}_T),

where a larger concentration p puts the samples nearer the centre of the simplex (p = 1 is
uniform on Δ^{T-1}). ``sample_alpha`` draws it with an optional ``torch.Generator``: the
Dirichlet sample is a normalised vector of Gamma(p, 1) variables, drawn by Marsaglia & Tsang's
method ("A simple method for generating gamma variables", ACM TOMS 2000) with 16 candidates per
variable drawn at once (no host synchronisation; the chance that all 16 are rejected is below
1e-20, in which case the mean d = p − 1/3 is used), and for p < 1 the boost
Gamma(p) = Gamma(p + 1)·U^{1/p}, all in log space so tiny p cannot underflow.

``set_alpha(model, α)`` fixes α on every subspace layer; ``use_alpha(model, α)`` does it for a
block and restores the previous α on exit; with ``precompute=True`` the block computes every
layer's W(α) once on entry and reuses it for all the forwards inside (several batches at one α;
with autograd on, sum those losses and call ``backward`` once, since the W(α) graph is shared).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from fastmtl._checks import check_int, check_number, checking_values
from fastmtl.pamal.layers import SubspaceLayer, subspace_layers

__all__ = ["check_alpha", "get_alpha", "sample_alpha", "set_alpha", "use_alpha"]

_SIMPLEX_TOL = 1e-5
_CANDIDATES = 16


def check_alpha(alpha: object, num_tasks: int, *, who: str = "alpha",
                check: bool | None = None) -> Tensor:
    """α as a floating tensor of shape (T,) (float64 kept, other inputs as float32).

    Raises ``ValueError`` for a wrong shape or length always, and, when values are checked
    (``check=True``, or by default for CPU tensors and Python sequences), for an α off the
    simplex: a non-finite or negative entry, or a sum other than 1 (tolerance 1e-5 each).
    """
    if isinstance(alpha, Tensor):
        t = alpha if alpha.is_floating_point() else alpha.to(torch.float32)
    else:
        try:
            t = torch.as_tensor(alpha, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{who} must be a tensor or a sequence of {num_tasks} numbers, "
                            f"got {type(alpha).__name__}") from e
    if t.dim() != 1 or t.shape[0] != num_tasks:
        raise ValueError(f"{who} must have shape ({num_tasks},) (one coefficient per task), "
                         f"got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    if checking_values(check, t):
        v = t.detach().to(torch.float64)
        total = float(v.sum())
        if (not bool(torch.isfinite(v).all()) or bool((v < -_SIMPLEX_TOL).any())
                or abs(total - 1.0) > _SIMPLEX_TOL):
            raise ValueError(f"{who} must lie on the simplex (entries >= 0 summing to 1), got "
                             f"{[round(x, 6) for x in v.tolist()]} (sum {total:.6g})")
    return t


def _log_gamma_variables(shape: tuple[int, ...], concentration: float,
                         generator: torch.Generator | None, device: torch.device) -> Tensor:
    """log X for X ~ Gamma(concentration, 1), i.i.d. of the given shape (float64)."""
    a = concentration + 1.0 if concentration < 1.0 else concentration
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    opts = {"generator": generator, "device": device, "dtype": torch.float64}
    x = torch.randn(*shape, _CANDIDATES, **opts)
    u = torch.rand(*shape, _CANDIDATES, **opts)
    v = (1.0 + c * x) ** 3
    log_v = torch.log(v.clamp_min(1e-300))
    accept = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * log_v)
    first = torch.argmax(accept.to(torch.uint8), dim=-1, keepdim=True)
    log_x = math.log(d) + log_v.gather(-1, first).squeeze(-1)
    log_x = torch.where(accept.any(-1), log_x, torch.full_like(log_x, math.log(d)))
    if concentration < 1.0:
        boost = torch.rand(*shape, **opts)
        log_x = log_x + torch.log(boost.clamp_min(1e-300)) / concentration
    return log_x


def sample_alpha(num_tasks: int, concentration: float = 1.0, num_samples: int | None = None, *,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Draw α ~ Dir(p·1_T): shape (T,), or (num_samples, T) with i.i.d. rows.

    Drawn on the generator's device (the CPU without one, with torch's default generator),
    then moved to ``device`` (default: where it was drawn) and cast to ``dtype``.
    """
    T = check_int("num_tasks", num_tasks, who="sample_alpha")
    p = check_number("concentration", concentration, low=0, low_open=True, who="sample_alpha")
    n = check_int("num_samples", num_samples, who="sample_alpha", none_ok=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"sample_alpha: generator must be a torch.Generator or None, "
                        f"got {type(generator).__name__}")
    where = generator.device if generator is not None else torch.device("cpu")
    shape = (T,) if n is None else (n, T)
    alpha = torch.softmax(_log_gamma_variables(shape, p, generator, where), dim=-1)
    return alpha.to(device=device if device is not None else where, dtype=dtype)


def _layers(model: nn.Module, who: str) -> list[SubspaceLayer]:
    layers = subspace_layers(model)
    if not layers:
        raise ValueError(f"{who}: the model has no subspace layers; convert it first with "
                         "fastmtl.pamal.to_subspace(model, num_tasks)")
    return layers


def _assign(layers: list[SubspaceLayer], alpha: Tensor | None) -> None:
    on_device: dict[torch.device, Tensor] = {}
    for layer in layers:
        if alpha is None:
            layer._alpha = None
            continue
        dev = layer.members.device
        if dev not in on_device:
            on_device[dev] = alpha.to(dev)
        layer._alpha = on_device[dev]


def set_alpha(model: nn.Module, alpha: object, *, check: bool | None = None) -> Tensor | None:
    """Set α (T,) on every subspace layer of ``model``; None clears it. Returns the checked α.

    T is the layers' number of members; α is checked by ``check_alpha``.
    """
    layers = _layers(model, "set_alpha")
    checked = None if alpha is None else check_alpha(alpha, layers[0].num_members, check=check)
    _assign(layers, checked)
    return checked


def get_alpha(model: nn.Module) -> Tensor | None:
    """The α set on ``model``'s subspace layers (that of the first one), or None."""
    return _layers(model, "get_alpha")[0]._alpha


@contextmanager
def use_alpha(model: nn.Module, alpha: object, *, precompute: bool = False,
              check: bool | None = None) -> Iterator[Tensor]:
    """Run the block at α, restoring each layer's previous α (and precomputed W) on exit.

    ``precompute=True``: every layer's W(α) is computed once on entry (one ``combine`` per
    layer) and reused by all the forwards inside the block. Yields the checked α.
    """
    layers = _layers(model, "use_alpha")
    checked = check_alpha(alpha, layers[0].num_members, check=check)
    saved = [(layer._alpha, layer._weights) for layer in layers]
    try:
        _assign(layers, checked)
        for layer in layers:
            layer._weights = layer.interpolate(layer._alpha) if precompute else None
        yield checked
    finally:
        for layer, (a, w) in zip(layers, saved):
            layer._alpha, layer._weights = a, w
