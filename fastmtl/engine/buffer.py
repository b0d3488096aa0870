"""One contiguous (T, N) buffer per (device, dtype) group of shared parameters.

For the parameters p_1..p_m of one group, with n_k = p_k.numel() and offsets
o_k = n_1 + ... + n_{k-1}, the buffer G (T, N = Σ n_k) holds

    G[i, o_k : o_k + n_k] = vec(∇_{p_k} L_i),

and ``views[k] = G[:, o_k:o_k+n_k].view(T, *p_k.shape)`` is task-major gradient of p_k. The
buffer is allocated when the number of tasks is first known and reused while it stays the
same (a new T reallocates it). ``rows[i][k]`` (= ``views[k][i]``) are created once so that
identity checks (``p.grad is row``) are cheap. A second flat buffer ``flat`` (N,) holds the
aggregated direction d = Gᵀ w; its slices ``flat_views[k]`` (shaped like p_k) can be given to
the parameters as their ``.grad`` so that ``ops.combine(out=flat)`` writes straight into them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ParamGroup", "group_params"]


class ParamGroup:
    """Shared parameters of one (device, dtype): their indices, shapes and buffers."""

    def __init__(self, device: torch.device, dtype: torch.dtype, indices: list[int],
                 shapes: list[torch.Size]) -> None:
        self.device = device
        self.dtype = dtype
        self.indices = indices                      # positions in the engine's parameter list
        self.shapes = shapes
        self.numels = [s.numel() for s in shapes]
        self.offsets = [sum(self.numels[:k]) for k in range(len(shapes))]
        self.numel = sum(self.numels)
        self.buffer: Tensor | None = None           # (T, N)
        self.views: list[Tensor] = []               # (T, *shape) per parameter
        self.rows: list[list[Tensor]] = []          # rows[i][k]: (shape) view of task i
        self.flat: Tensor | None = None             # (N,) direction buffer
        self.flat_views: list[Tensor] = []

    def allocate(self, num_tasks: int) -> bool:
        """Make the (T, N) buffer exist for ``num_tasks`` rows; True if it was (re)allocated."""
        if self.buffer is not None and self.buffer.shape[0] == num_tasks:
            return False
        T = num_tasks
        self.buffer = torch.zeros(T, self.numel, dtype=self.dtype, device=self.device)
        self.views = [self.buffer[:, o:o + n].view(T, *shape)
                      for o, n, shape in zip(self.offsets, self.numels, self.shapes)]
        self.rows = [[v[i] for v in self.views] for i in range(T)]
        return True

    def direction_buffer(self) -> Tensor:
        """The persistent flat (N,) direction buffer (allocated on first use)."""
        if self.flat is None:
            self.flat = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
            self.flat_views = [self.flat[o:o + n].view(shape)
                               for o, n, shape in zip(self.offsets, self.numels, self.shapes)]
        return self.flat

    def nbytes(self) -> int:
        total = 0
        for t in (self.buffer, self.flat):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def __repr__(self) -> str:
        T = None if self.buffer is None else self.buffer.shape[0]
        return (f"ParamGroup(device={self.device}, dtype={self.dtype}, params={len(self.indices)}, "
                f"N={self.numel}, T={T})")


def group_params(params: Sequence[Tensor]) -> list[ParamGroup]:
    """Group ``params`` by (device, dtype), in order of first appearance."""
    keyed: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[torch.Size]]] = {}
    for k, p in enumerate(params):
        indices, shapes = keyed.setdefault((p.device, p.dtype), ([], []))
        indices.append(k)
        shapes.append(p.shape)
    return [ParamGroup(device, dtype, idx, shp) for (device, dtype), (idx, shp) in keyed.items()]
