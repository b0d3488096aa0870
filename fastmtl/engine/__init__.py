"""Per-task gradients: the first stage of the pipeline (losses -> G -> K -> w -> d).

- ``TaskGradients``: ∇_{θ_sh} L_i into one persistent (T, N) buffer per (device, dtype) group
  of shared parameters ("loop": T in-place backward passes; "vmap": one batched pass).
- ``LatentGradients``: ∇_z L_i for a shared representation z (MGDA-UB), pulled back with one
  backward pass.
- ``StreamGradients``: K folded block by block from the cotangents at the ops that use the
  shared parameters, never a (T, N) matrix ("stream").
- ``GradientEngine``: the interface both implement (``compute``, ``gram``, ``apply``,
  ``direction``); ``pipeline.run`` runs compute -> gram -> weights -> apply for every entry point.
"""

from fastmtl.engine import cache, pipeline
from fastmtl.engine.base import ENGINES, GradientEngine, ParameterEngine, auto_mode, prefers_stream
from fastmtl.engine.latent import LatentGradients
from fastmtl.engine.stream import StreamGradients
from fastmtl.engine.task_gradients import TaskGradients
from fastmtl.engine.vmap import VmapUnsupportedError

__all__ = ["ENGINES", "GradientEngine", "LatentGradients", "ParameterEngine", "StreamGradients",
           "TaskGradients", "VmapUnsupportedError", "auto_mode", "cache", "pipeline",
           "prefers_stream"]
