"""The table of aggregators that the shared property tests run over.

Each entry: (id, factory, needs_losses, scale_exponent p or None, deterministic). Scaling the
gradients by c > 0 (K → c²K) scales the direction by c^p: d(cG) = c^p d(G), i.e. the weights
change as w(c²K) = c^(p−1) w(K). None: the method promises no such law (it depends on losses or
history), so only positivity of the direction's scale is not tested.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    id: str
    module: str
    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    needs_losses: bool = False
    scale_exponent: float | None = 1.0
    deterministic: bool = True     # False: random orders (PCGrad, GradVac) — seeded per call
    stateful: bool = False

    def make(self):
        module = importlib.import_module(f"fastmtl.aggregators.{self.module}")
        return getattr(module, self.cls)(**self.kwargs)


ENTRIES = [
    Entry("Sum", "sum", "Sum"),
    Entry("Mean", "mean", "Mean"),
    Entry("MGDA", "mgda", "MGDA"),
    Entry("MGDA-l2", "mgda", "MGDA", {"normalization": "l2"}, scale_exponent=0.0),
    Entry("MGDA-loss+", "mgda", "MGDA", {"normalization": "loss+"}, needs_losses=True,
          scale_exponent=None),
    Entry("EDM", "edm", "EDM"),
    Entry("IMTLG", "imtlg", "IMTLG"),
    Entry("AlignedMTL", "aligned_mtl", "AlignedMTL"),
    Entry("CAGrad", "cagrad", "CAGrad"),
    Entry("UPGrad", "upgrad", "UPGrad"),
    Entry("NashMTL", "nash_mtl", "NashMTL", {"max_norm": 0.0}, scale_exponent=0.0,
          stateful=True),
    Entry("PCGrad", "pcgrad", "PCGrad", {"seed": 0}, deterministic=False),
    Entry("GradVac", "gradvac", "GradVac", {"seed": 0}, deterministic=False, stateful=True),
    Entry("CDTT", "cdtt", "CDTT", needs_losses=True, scale_exponent=None, stateful=True),
]
