"""Loss weightings: methods that weigh the task losses from their values (and, for GradNorm,
the per-task gradient norms of the last shared layer), never from the full Gram matrix.

- ``DWA``: Dynamic Weight Average (Liu et al., CVPR 2019), from epoch-mean loss ratios.
- ``UncertaintyWeighting`` (``UW``): learned homoscedastic uncertainty (Kendall et al., CVPR
  2018), an ``nn.Module``.
- ``RLW``: random loss weights (Lin et al., TMLR 2022).
- ``FAMO``: Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023).
- ``GradNorm``: gradient normalisation on the last shared layer (Chen et al., ICML 2018).

Each class documents exactly when the training loop calls what.
"""

from fastmtl.weighting.dwa import DWA
from fastmtl.weighting.famo import FAMO
from fastmtl.weighting.gradnorm import GradNorm
from fastmtl.weighting.rlw import RLW
from fastmtl.weighting.uncertainty import UW, UncertaintyWeighting

__all__ = ["DWA", "FAMO", "RLW", "UW", "GradNorm", "UncertaintyWeighting"]
