"""Line searches for multi-task training (Filatov & Merkulov, "Fast Line Search for Multi-Task
Learning", arXiv:2110.00874).

- ``LatentBacktracking``: Armijo backtracking along the shared representation z; trials re-run
  only the heads, and with ``batched=True`` all K trial steps are evaluated at once
  (``fm.ops.trial_points`` + ``torch.vmap`` over the heads' stacked trial parameters).
- ``ParamBacktracking``: classical backtracking in parameter space (re-runs the encoder).
- ``ConstantStep``: the constant-learning-rate baseline with the same interface.

Each ``step(x, targets)`` returns a ``StepInfo``.
"""

from fastmtl.linesearch.armijo import StepInfo
from fastmtl.linesearch.constant import ConstantStep
from fastmtl.linesearch.latent import LatentBacktracking
from fastmtl.linesearch.param import ParamBacktracking

__all__ = ["ConstantStep", "LatentBacktracking", "ParamBacktracking", "StepInfo"]
