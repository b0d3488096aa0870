"""A MultiMNIST-like synthetic multi-task dataset, seeded and bundled (no download).

Each image overlays T <= 3 glyphs on a ``size``×``size`` canvas: glyph g_i of 10 fixed random
binary patterns (``size // 2`` square, each pixel on with probability 0.45) in corner i
(top-left, bottom-right, top-right), shifted by up to one pixel in each direction, plus
uniform noise of amplitude 0.1. Task i: which of the 10 patterns is in corner i. Neighbouring
glyphs overlap by a pixel or two (pixel-wise maximum), as the digits of MultiMNIST do.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["multi_glyphs"]


def multi_glyphs(n: int, tasks: int = 2, size: int = 12, seed: int = 0
                 ) -> tuple[Tensor, list[Tensor]]:
    """(x (n, 1, size, size), [labels (n,) in 0..9 for each task]), deterministic in
    ``seed`` (CPU tensors)."""
    if tasks not in (1, 2, 3):
        raise ValueError(f"tasks must be 1, 2 or 3, got {tasks}")
    if size < 6:
        raise ValueError(f"size must be >= 6, got {size}")
    gen = torch.Generator().manual_seed(seed)
    g = size // 2
    far = size - g - 1
    corners = [(0, 0), (far, far), (0, far)][:tasks]
    glyphs = (torch.rand(10, g, g, generator=gen) < 0.45).float()
    labels = [torch.randint(0, 10, (n,), generator=gen) for _ in range(tasks)]
    offsets = torch.randint(0, 2, (n, 2 * tasks), generator=gen).tolist()
    x = 0.1 * torch.rand(n, 1, size, size, generator=gen)
    for k, shifts in enumerate(offsets):
        for i, (r0, c0) in enumerate(corners):
            r, c = r0 + shifts[2 * i], c0 + shifts[2 * i + 1]
            patch = x[k, 0, r : r + g, c : c + g]
            patch.copy_(torch.maximum(patch, glyphs[labels[i][k]]))
    return x, labels
