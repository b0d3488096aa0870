"""Evaluating a subspace model along the simplex: the grids of the paper and the front.

Grids (official PaMaL code, Dimitriadis, Frossard & Fleuret, ICML 2023):

- T = 2: α = (1 − q, q) for q in linspace(0, 1, num_points) (11 in the paper), from e_1 to e_2;
- T = 3: the triangular lattice with ``num_points`` points per edge, α = (i, j, k)/(n − 1) for
  integers i + j + k = n − 1 (``meshzoo.triangle(n − 1)``), n(n + 1)/2 points;
- T > 3: the vertices plus the centroid (``num_points`` is ignored); T = 1: the one point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fastmtl._checks import check_int
from fastmtl.pamal.alpha import check_alpha, use_alpha
from fastmtl.pamal.batchnorm import batchnorm_layers, recompute_bn
from fastmtl.pamal.hypervolume import hypervolume
from fastmtl.pamal.layers import subspace_layers

__all__ = ["ParetoFront", "pareto_front", "simplex_grid"]


def simplex_grid(num_tasks: int, num_points: int = 11) -> Tensor:
    """The evaluation grid of the paper for T tasks, (P, T) float64 rows on the simplex."""
    T = check_int("num_tasks", num_tasks, who="simplex_grid")
    n = check_int("num_points", num_points, low=2, who="simplex_grid")
    if T == 2:
        q = torch.linspace(0, 1, n, dtype=torch.float64)
        return torch.stack([1 - q, q], dim=1)
    if T == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if T == 3:
        m = n - 1
        rows = [(i, j, m - i - j) for i in range(m + 1) for j in range(m + 1 - i)]
        return torch.tensor(rows, dtype=torch.float64) / m
    return torch.cat([torch.eye(T, dtype=torch.float64),
                      torch.full((1, T), 1.0 / T, dtype=torch.float64)])


class ParetoFront(NamedTuple):
    """``alphas`` (P, T) and the evaluated ``values`` (P, M), row by row (float64)."""

    alphas: Tensor
    values: Tensor

    def hypervolume(self, reference: Iterable[float]) -> float:
        """Hypervolume of ``values`` (minimisation) relative to ``reference``."""
        return hypervolume(self.values, reference)


def _as_row(value: Any) -> Tensor:
    row = torch.as_tensor(value if not isinstance(value, list | tuple)
                          else [float(v) for v in value], dtype=torch.float64)
    return row.detach().cpu().reshape(-1)


def pareto_front(model: nn.Module, evaluate: Callable[[nn.Module], Any], num_points: int = 11,
                 *, alphas: object = None, bn_loader: Iterable[Any] | None = None,
                 bn_batches: int | None = None) -> ParetoFront:
    """Evaluate ``model`` at every α of the grid: ``evaluate(model)`` returns M numbers
    (e.g. the T task losses, lower is better for ``hypervolume``).

    ``alphas``: a (P, T) set of points instead of ``simplex_grid(T, num_points)``.
    ``bn_loader``: re-estimate the BatchNorm statistics at each α first (``recompute_bn``
    with ``bn_batches``), and restore the trained statistics at the end.
    ``evaluate`` runs in evaluation mode, without gradients, with every layer's W(α)
    precomputed once; the model's mode and α are restored afterwards.
    """
    layers = subspace_layers(model)
    if not layers:
        raise ValueError("pareto_front: the model has no subspace layers")
    T = layers[0].num_members
    if alphas is None:
        grid = simplex_grid(T, num_points)
    else:
        grid = torch.as_tensor(alphas, dtype=torch.float64)
        if grid.dim() != 2:
            raise ValueError(f"pareto_front: alphas must have shape (P, {T}), "
                             f"got {tuple(grid.shape)}")
    points = [check_alpha(a, T, who=f"alphas[{i}]") for i, a in enumerate(grid)]
    saved = [[(buf, buf.clone()) for buf in bn.buffers(recurse=False)]
             for bn in batchnorm_layers(model)] if bn_loader is not None else []
    modes = [(m, m.training) for m in model.modules()]
    rows = []
    try:
        for alpha in points:
            if bn_loader is not None:
                recompute_bn(model, alpha, bn_loader, num_batches=bn_batches)
            model.eval()
            with torch.no_grad(), use_alpha(model, alpha, precompute=True):
                rows.append(_as_row(evaluate(model)))
    finally:
        with torch.no_grad():
            for buf, value in (pair for layer in saved for pair in layer):
                buf.copy_(value)
        for m, mode in modes:
            m.training = mode
    sizes = {r.numel() for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"pareto_front: evaluate returned different numbers of values: "
                         f"{sorted(sizes)}")
    return ParetoFront(torch.stack(points).to(torch.float64).cpu(), torch.stack(rows))
