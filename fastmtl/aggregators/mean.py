"""Mean of the task gradients: d = (1/T) Σ_i g_i, the gradient of the mean loss (torchjd's
``Mean``; unitary scalarization up to the factor 1/T)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastmtl.aggregators.base import Aggregator


class Mean(Aggregator):
    """w_i = 1/T. ``fm.mtl_backward`` takes one backward of the mean loss."""

    fast_path = "mean"

    def _weights(self, K: Tensor, losses: Tensor | None) -> Tensor:
        T = K.shape[0]
        return torch.full((T,), 1.0 / T, dtype=K.dtype, device=K.device)
