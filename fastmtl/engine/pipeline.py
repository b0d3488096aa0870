"""The one pipeline every entry point runs: losses -> G -> K -> w -> direction.

    engine.compute(losses)        G: per-task gradients (``TaskGradients``, ``LatentGradients``,
                                  ``StreamGradients``: K folded block by block)
    K = engine.gram()             (T, T)
    w = weigh(K, L)               an aggregator's ``weights``, or an entry point's own rule
    engine.apply(w)               d = Gᵀ w written where it belongs (returned if asked)

``fm.mtl_backward``, both line searches, the PCGrad wrapper and GradNorm call ``run``; they check
their arguments first (``fastmtl._checks``), so nothing is checked twice here. Whatever happens,
the engine drops what ``compute`` kept for ``apply`` (a latent engine's graph).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastmtl.engine.base import GradientEngine

__all__ = ["Outcome", "run"]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one run produced: the losses L (T,), detached in K's dtype on K's device; K; the
    weights w; the direction d = Gᵀ w if it was asked for (else None)."""

    losses: Tensor
    K: Tensor
    w: Tensor
    direction: object | None


def run(engine: GradientEngine, losses: Sequence[Tensor],
        weigh: Callable[[Tensor, Tensor], Tensor], *, return_direction: bool = False
        ) -> Outcome:
    """compute -> gram -> w = weigh(K, L) -> apply(w) on checked ``losses`` (T scalars)."""
    try:
        engine._compute(list(losses))
        K = engine.gram()
        L = torch.stack([loss.detach() for loss in losses]).to(device=K.device, dtype=K.dtype)
        w = weigh(K, L)
        d = engine.apply(w, return_direction=return_direction)
    finally:
        engine.discard()
    return Outcome(L, K, w, d)
