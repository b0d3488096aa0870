"""Optimizer wrappers around any ``torch.optim`` optimizer.

- ``MTLOptimizer(base_optimizer, aggregator, shared_params)``: ``backward(losses)`` runs
  ``fm.mtl_backward`` (aggregated direction on the shared params, plain sum on the heads).
- ``AdaTaskAdam``, ``AdaTaskRMSprop``, ``AdaTaskAdagrad``: AdaTask (per-task moments on the
  shared parameters, ``backward(losses)`` + ``step()``), real optimizers.
- ``PCGrad(optimizer, reduction="mean")``: the interface of the popular PCGrad port
  (``pc_backward(losses)``), computed in coefficient space from the Gram matrix.

Both are ``torch.optim.Optimizer`` instances that share the wrapped optimizer's
``param_groups`` and ``state``, so lr schedulers and checkpoints work on them.
"""

from fastmtl.optim.adatask import AdaTaskAdagrad, AdaTaskAdam, AdaTaskRMSprop
from fastmtl.optim.mtl_optimizer import MTLOptimizer, OptimizerWrapper
from fastmtl.optim.pcgrad import PCGrad

__all__ = ["AdaTaskAdagrad", "AdaTaskAdam", "AdaTaskRMSprop", "MTLOptimizer", "OptimizerWrapper",
           "PCGrad"]
