"""Unitary scalarization: d = Σ_i g_i (Kurin et al., NeurIPS 2022, "In Defense of the Unitary
Scalarization for Deep Multi-Task Learning"): the plain sum of the losses, w = 1."""

from __future__ import annotations

import torch
from torch import Tensor

from fastmtl.aggregators.base import Aggregator


class Sum(Aggregator):
    """w_i = 1: the gradient of Σ_i L_i. ``fm.mtl_backward`` takes one backward of the sum."""

    fast_path = "sum"

    def _weights(self, K: Tensor, losses: Tensor | None) -> Tensor:
        return torch.ones(K.shape[0], dtype=K.dtype, device=K.device)
