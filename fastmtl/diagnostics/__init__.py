"""Diagnostics: how tasks share the shared parameters.

- ``TaskDominance``: AdaTask's AU / rAU task-dominance metric (Yang et al., AAAI 2023) from an
  AdaTask optimizer's per-task state or from ``torch.optim.Adam`` plus per-task gradients;
  per-layer rAU and the share of dominated elements.
- ``pairwise_cosines(K)``, ``conflict_fraction(K)``: task-gradient cosines from a Gram matrix.
"""

from fastmtl.diagnostics.cosines import conflict_fraction, pairwise_cosines
from fastmtl.diagnostics.dominance import TaskDominance

__all__ = ["TaskDominance", "conflict_fraction", "pairwise_cosines"]
