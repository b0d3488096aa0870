r"""Exact hypervolume of a set of points (minimisation), the metric PaMaL reports.

For points y^(1..n) in R^M and a reference r, the hypervolume is the Lebesgue measure of the
region they dominate and that dominates r:

.. math::  HV = \lambda\Big(\bigcup_i\, [y^{(i)}_1, r_1]\times\dots\times[y^{(i)}_M, r_M]\Big).

Points not strictly better than r in every objective add nothing and are dropped.

Algorithm (exact for every M):

- M = 1: r − min y.
- M = 2: sort by the first objective and sweep, O(n log n).
- M ≥ 3: HSO, "hypervolume by slicing objectives" (While, Hingston, Barone & Huband, IEEE TEC
  2006): sort by the last objective, z_1 ≤ … ≤ z_n, z_{n+1} = r_M; then
  HV = Σ_k HV_{M−1}(first k points, last objective dropped)·(z_{k+1} − z_k), recursively, with
  dominated points removed from each slice. O(n^{M−1} log n): exact and fast for M = 3 and for
  the small fronts of PaMaL (T + 1 points for T > 3), slow for large n with large M.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["hypervolume"]


def _nondominated(points: np.ndarray) -> np.ndarray:
    """The rows no other row weakly dominates (duplicates kept once)."""
    points = np.unique(points, axis=0)
    keep = []
    for i, p in enumerate(points):
        others = np.delete(points, i, axis=0)
        if not np.any(np.all(others <= p, axis=1)):
            keep.append(i)
    return points[keep]


def _hv2(points: np.ndarray, ref: np.ndarray) -> float:
    order = np.argsort(points[:, 0], kind="stable")
    area, best = 0.0, ref[1]
    for x, y in points[order]:
        if y < best:
            area += (ref[0] - x) * (best - y)
            best = y
    return float(area)


def _hv(points: np.ndarray, ref: np.ndarray) -> float:
    if len(points) == 0:
        return 0.0
    M = points.shape[1]
    if M == 1:
        return float(ref[0] - points[:, 0].min())
    if M == 2:
        return _hv2(points, ref)
    points = points[np.argsort(points[:, -1], kind="stable")]
    total = 0.0
    for k in range(len(points)):
        upper = points[k + 1, -1] if k + 1 < len(points) else ref[-1]
        depth = upper - points[k, -1]
        if depth > 0:
            total += _hv(_nondominated(points[: k + 1, :-1]), ref[:-1]) * depth
    return float(total)


def hypervolume(points: Iterable[Iterable[float]] | torch.Tensor | np.ndarray,
                reference: Iterable[float] | torch.Tensor | np.ndarray) -> float:
    """Hypervolume (a Python float) of ``points`` (n, M) w.r.t. ``reference`` (M,), minimising.

    Raises ``ValueError`` for shapes that do not match or non-finite values.
    """
    def as_array(x: object, name: str) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().to(torch.float64).numpy()
        arr = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"hypervolume: {name} must be finite")
        return arr

    ref = as_array(reference, "reference")
    pts = as_array(points, "points")
    if ref.ndim != 1 or ref.size < 1:
        raise ValueError(f"hypervolume: reference must have shape (M,), got {ref.shape}")
    if pts.size == 0:
        return 0.0
    if pts.ndim != 2 or pts.shape[1] != ref.size:
        raise ValueError(f"hypervolume: points must have shape (n, {ref.size}) to match the "
                         f"reference, got {pts.shape}")
    pts = pts[np.all(pts < ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    return _hv(_nondominated(pts), ref)
