"""The engine interface.

An engine turns T scalar losses into per-task gradients G (one row per task) and answers the
three questions of the pipeline (DESIGN.md, "One pipeline"; ``fastmtl.engine.pipeline`` runs
it for every entry point):

    compute(losses) -> self      fill G: row i = ∇ L_i (w.r.t. shared params, or w.r.t. z)
    gram()          -> K         K = G Gᵀ (T, T), float32 (float64 when G is float64)
    apply(w)        -> d | None  write d = Gᵀ w where it belongs (shared params' .grad, or
                                 pulled back through z) and return d when asked
    direction(w)    -> d         d = Gᵀ w alone, nothing written

Parameter-space engines (``TaskGradients``: "loop", "vmap") hold G as a (T, N) buffer per
(device, dtype) group; the latent engine (``LatentGradients``, bound to the features z of the
step by ``bind``) holds ∇_z L_i; the streamed engine (``StreamGradients``) never holds G: K is
folded block by block during ``compute`` and ``apply`` is one weighted backward pass.
"""

from __future__ import annotations

import abc
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from fastmtl._checks import ENGINES, check_losses_list

__all__ = ["ENGINES", "STREAM_BUDGET_CPU", "STREAM_BUDGET_FRACTION", "GradientEngine",
           "ParameterEngine", "auto_mode", "prefers_stream"]


def auto_mode(device: torch.device, num_tasks: int) -> str:
    """The "auto" rule: "loop" on the CPU or when T <= 2, "vmap" otherwise.

    On the CPU a batched backward has no launch overhead to save; for T <= 2 the T backward
    passes cost about what one batched pass does and need no batching rules. An engine that
    tried "vmap" under "auto" and failed falls back to "loop" for good (see ``TaskGradients``).
    """
    if device.type == "cpu" or num_tasks <= 2:
        return "loop"
    return "vmap"


STREAM_BUDGET_CPU = 4 << 30      # bytes: "auto" streams on the CPU above a (T, N) buffer of 4 GiB
STREAM_BUDGET_FRACTION = 0.25    # ... on a GPU above this fraction of its free memory


def prefers_stream(params: Sequence[Tensor], num_tasks: int) -> bool:
    """The "auto" rule between the (T, N) buffer and "stream": stream when the buffer of some
    device, T × (its shared parameters' bytes), would exceed its budget: ``STREAM_BUDGET_CPU``
    on the CPU, ``STREAM_BUDGET_FRACTION`` × the free memory on a GPU (``mtl_backward`` asks at
    the first step for a set of shared parameters and keeps the answer)."""
    need: dict[torch.device, int] = {}
    for p in params:
        need[p.device] = need.get(p.device, 0) + num_tasks * p.numel() * p.element_size()
    for device, size in need.items():
        if device.type == "cuda":
            budget = STREAM_BUDGET_FRACTION * torch.cuda.mem_get_info(device)[0]
        else:
            budget = STREAM_BUDGET_CPU
        if size > budget:
            return True
    return False


class GradientEngine(abc.ABC):
    """Per-task gradients of T losses: ``compute`` fills them, ``gram``, ``apply`` and
    ``direction`` read them. ``discard`` drops what ``compute`` kept for ``apply`` (a graph)."""

    num_tasks: int | None = None
    _reached: Tensor | None = None

    @property
    def reached(self) -> Tensor:
        """Which losses sent a gradient, bool on the CPU: (T, P) for parameter-space engines
        (``reached[i, k]``: loss i reached shared parameter k), (T,) for the latent engine (loss
        i depends on z). Known on the host from the graph's structure: reading it never
        synchronises."""
        self._require_computed()
        return self._reached

    def compute(self, losses: Sequence[Tensor] | Tensor) -> GradientEngine:
        """Compute the per-task gradients of ``losses`` (T scalars); returns ``self``."""
        return self._compute(check_losses_list(losses))

    @abc.abstractmethod
    def _compute(self, losses: list[Tensor]) -> GradientEngine:
        """``compute`` on losses already checked (``_checks.check_losses_list``): what
        fastmtl's entry points call, having checked their arguments once."""

    @abc.abstractmethod
    def gram(self) -> Tensor:
        """K = G Gᵀ (T, T) of the last ``compute``."""

    @abc.abstractmethod
    def direction(self, w: Tensor) -> object:
        """d = Gᵀ w for coefficients w (T,); nothing is written."""

    @abc.abstractmethod
    def apply(self, w: Tensor, *, return_direction: bool = False) -> object | None:
        """Write d = Gᵀ w where it belongs; returns d if ``return_direction`` (else None)."""

    def discard(self) -> None:  # noqa: B027 - a no-op unless the engine keeps a graph
        """Drop the references ``compute`` kept for ``apply`` (none by default)."""

    def _require_computed(self) -> int:
        if self.num_tasks is None:
            raise RuntimeError(f"{type(self).__name__}: call compute(losses) first")
        return self.num_tasks

    def _check_weights(self, w: object) -> Tensor:
        """w: a (T,) tensor for the last ``compute``'s T."""
        T = self._require_computed()
        if not isinstance(w, Tensor):
            raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() != 1 or w.shape[0] != T:
            raise ValueError(f"w must have shape ({T},), got {tuple(w.shape)}")
        return w


class ParameterEngine(GradientEngine):
    """An engine in parameter space: holds its shared parameters by weak reference (a cached
    engine must not keep a model alive) and checks them once."""

    def _hold(self, params: list[Tensor]) -> None:
        for k, p in enumerate(params):
            if not p.is_floating_point():
                raise TypeError(f"shared_params[{k}] must be floating point, got {p.dtype}")
        self._refs = [weakref.ref(p) for p in params]

    @property
    def params(self) -> list[Tensor]:
        out = []
        for k, ref in enumerate(self._refs):
            p = ref()
            if p is None:
                raise RuntimeError(f"{type(self).__name__}: shared parameter {k} was freed")
            out.append(p)
        return out

    def matches(self, params: Sequence[Tensor]) -> bool:
        """True if ``params`` are this engine's shared parameters (same tensors, same order)."""
        return len(params) == len(self._refs) and all(
            ref() is p for ref, p in zip(self._refs, params))
