"""Re-estimating BatchNorm running statistics at one α.

A subspace BatchNorm interpolates γ and β but keeps **one** set of running mean/variance,
updated during training at whatever α was drawn and used at evaluation for every α (official
PaMaL code, Dimitriadis, Frossard & Fleuret, ICML 2023; there is no per-α re-estimation
there). The statistics of the network at a given α can differ from that average, most near the
vertices. ``recompute_bn`` re-estimates them at α, as Wortsman et al. ("Learning Neural Network
Subspaces", ICML 2021) and ``torch.optim.swa_utils.update_bn`` do: reset the statistics, then
one pass over data with a cumulative average (momentum None), BatchNorm layers in training mode
and every other module in evaluation mode (no dropout), without gradients.

The statistics are shared by all α: recompute before evaluating each α (``pareto_front`` can,
with ``bn_loader=``), or ``extract`` the model at α and recompute on the copy (``alpha=None``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastmtl._checks import check_int
from fastmtl.pamal.alpha import use_alpha

__all__ = ["batchnorm_layers", "recompute_bn"]


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that track running statistics."""
    return [m for m in model.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats]


def _model_input(batch: Any, device: torch.device | None) -> Any:
    x = batch[0] if isinstance(batch, list | tuple) else batch
    if device is not None and isinstance(x, torch.Tensor):
        x = x.to(device)
    return x


def _pass(model: nn.Module, loader: Iterable[Any], num_batches: int | None) -> None:
    device = next(iter(model.parameters()), None)
    device = None if device is None else device.device
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        model(_model_input(batch, device))


def recompute_bn(model: nn.Module, alpha: object, loader: Iterable[Any], *,
                 num_batches: int | None = None) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm layer of ``model`` at α.

    ``alpha``: the α (T,) to evaluate the subspace model at (restored to the previous α after),
    or None for the α already set, or for a plain (extracted) model. ``loader`` yields model
    inputs, or tuples/lists whose first item is the input (moved to the model's device).
    ``num_batches``: stop after that many batches (default: the whole loader). Modes and
    momenta are restored. Returns ``model``.
    """
    check_int("num_batches", num_batches, who="recompute_bn", none_ok=True)
    layers = batchnorm_layers(model)
    if not layers:
        return model
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in layers]
    try:
        model.eval()
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            if alpha is None:
                _pass(model, loader, num_batches)
            else:
                with use_alpha(model, alpha, precompute=True):
                    _pass(model, loader, num_batches)
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
        for m, mode in modes:
            m.training = mode
    return model
