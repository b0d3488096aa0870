"""The aggregator contract: weights from the Gram matrix, plus the shared plumbing.

An aggregator maps the Gram matrix K = G Gᵀ of T per-task gradients (and, for some methods,
the T losses) to coefficients w on the *raw* rows of G, so that the update direction is
d = Gᵀ w (any normalisation of the gradients is folded into w). ``weights(K, losses)`` is the
method; ``agg(G, losses)`` is ``fm.ops.combine(agg.weights(fm.ops.gram(G), losses), G)``.

Input policy (``check``):
- shapes, dtypes and devices are always checked (metadata only, no host synchronisation);
- values (K finite and symmetric, losses finite) are checked when ``check=True``, or by default
  (``check=None``) when K is on the CPU and not being traced by ``torch.compile``. On CUDA the
  default skips them, since reading a value back is a host sync: a non-finite K then gives
  non-finite weights (NaN propagates; it is never replaced by a finite value).

Stateful methods keep their state in tensors on K's device; ``state_dict()``,
``load_state_dict()`` and ``reset()`` save, restore and clear it, and every ``weights()`` or
``__call__`` advances it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from fastmtl import ops
from fastmtl._checks import checking_values
from fastmtl.solvers._common import check_square

LossesLike = Tensor | Sequence[Tensor] | None


def check_gram(K: object, check: bool | None = None, symmetry_rtol: float = 1e-4) -> Tensor:
    """Validate a Gram matrix: a square (T, T) floating tensor, T >= 1; values per ``check``."""
    K = check_square(K)
    # One reduction covers both: a NaN/inf entry makes max|K − Kᵀ| NaN or inf, which fails <=.
    if checking_values(check, K) and not bool(
        (K - K.mT).abs().max() <= symmetry_rtol * K.diagonal().abs().max()
    ):
        if not bool(torch.isfinite(K).all()):
            raise ValueError("K has non-finite entries (a NaN/inf per-task gradient or loss?)")
        raise ValueError("K is not symmetric: a Gram matrix G Gᵀ must be")
    return K


def check_losses(losses: LossesLike, K: Tensor, check: bool | None = None) -> Tensor | None:
    """Stack ``losses`` into a (T,) tensor on K's device, or None when not given."""
    if losses is None:
        return None
    if not isinstance(losses, Tensor):
        losses = list(losses)
        if any(not isinstance(loss, Tensor) for loss in losses):
            raise TypeError("losses must be a tensor or a sequence of scalar tensors")
        if any(loss.numel() != 1 for loss in losses):
            raise ValueError("every loss must be a scalar (one element)")
        devices = {loss.device for loss in losses}
        if len(devices) > 1:
            raise ValueError(f"losses are on different devices: {sorted(map(str, devices))}")
        losses = torch.stack([loss.reshape(()) for loss in losses]) if losses else K.new_empty(0)
    if losses.dim() != 1 or losses.shape[0] != K.shape[0]:
        raise ValueError(f"losses must have shape ({K.shape[0]},) to match K, "
                         f"got {tuple(losses.shape)}")
    if losses.device != K.device:
        raise ValueError(f"losses are on {losses.device} but K is on {K.device}")
    losses = losses.detach().to(K.dtype)
    if checking_values(check, losses) and not bool(torch.isfinite(losses).all()):
        raise ValueError("losses have non-finite entries")
    return losses


class Aggregator:
    """Base class: subclasses implement ``_weights(K, losses)`` on validated inputs.

    Class attributes a subclass may set:
    - ``requires_losses``: ``weights`` raises if ``losses`` is None.
    - ``fast_path``: "sum" or "mean" when w is constant, so that ``fm.mtl_backward`` can do
      one backward of the summed (averaged) loss and never build per-task gradients (a
      subclass of Sum/Mean that changes the weights must set ``fast_path = None``).
    """

    requires_losses: ClassVar[bool] = False
    fast_path: ClassVar[str | None] = None

    def __init__(self, *, check: bool | None = None) -> None:
        self.check = check

    def _weights(self, K: Tensor, losses: Tensor | None) -> Tensor:
        raise NotImplementedError

    def weights(self, K: Tensor, losses: LossesLike = None) -> Tensor:
        """Coefficients w (T,) on the rows of G, in K's dtype and on K's device: d = Gᵀ w."""
        K = check_gram(K, self.check)
        stacked = check_losses(losses, K, self.check)
        if stacked is None and self.requires_losses:
            raise ValueError(f"{type(self).__name__} needs the losses: weights(K, losses)")
        return self._weights(K, stacked)

    def __call__(self, G: Tensor, losses: LossesLike = None) -> Tensor:
        """The aggregated direction d = Gᵀ w for per-task gradients G (T, N)."""
        K = ops.gram(G)
        return ops.combine(self.weights(K, losses), G)

    # State plumbing for stateful methods (stateless ones have none).
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} is stateless; got state keys {list(state)}")

    def reset(self) -> None:
        """Forget any state (no-op for stateless methods)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class StatefulAggregator(Aggregator):
    """Base class for methods with state (EMAs, histories, previous weights, step counters).

    The state is a dict of tensors on K's device, created by ``_init_state(K)`` on the first
    call (and again when T changes; moved when K's device or floating dtype changes), plus
    ``self.step``, a host-side Python int counting the calls (warm-ups and update periods branch
    on it, never on tensor values, so there is no host sync). ``state_dict()`` returns copies;
    ``load_state_dict()`` restores them (the tensors move to K's device on the next call);
    ``reset()`` forgets them. Each ``weights()``/``__call__`` advances the state once, so
    ``agg(G)`` and ``combine(agg.weights(gram(G)), G)`` agree only from the same state.
    """

    def __init__(self, *, check: bool | None = None) -> None:
        super().__init__(check=check)
        self._state: dict[str, Tensor] | None = None
        self._num_tasks: int | None = None
        self.step = 0

    def _init_state(self, K: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _stateful_weights(self, K: Tensor, losses: Tensor | None,
                          state: dict[str, Tensor]) -> Tensor:
        """Weights from K with the state; update ``state`` in place (or reassign its keys)."""
        raise NotImplementedError

    def _state_for(self, K: Tensor) -> dict[str, Tensor]:
        if self._state is None or self._num_tasks != K.shape[0]:
            self._state, self._num_tasks, self.step = self._init_state(K), K.shape[0], 0
        else:
            for k, v in self._state.items():
                dtype = K.dtype if v.is_floating_point() else v.dtype
                if v.device != K.device or v.dtype != dtype:
                    self._state[k] = v.to(device=K.device, dtype=dtype)
        return self._state

    def _weights(self, K: Tensor, losses: Tensor | None) -> Tensor:
        w = self._stateful_weights(K, losses, self._state_for(K))
        self.step += 1
        return w

    def state_dict(self) -> dict[str, Any]:
        tensors = {} if self._state is None else {k: v.detach().clone()
                                                  for k, v in self._state.items()}
        return {"step": self.step, "num_tasks": self._num_tasks, "state": tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"step", "num_tasks", "state"}:
            raise ValueError(f"{type(self).__name__}.load_state_dict expects keys "
                             f"['num_tasks', 'state', 'step'], got {sorted(state)}")
        self.step = int(state["step"])
        self._num_tasks = state["num_tasks"]
        self._state = {k: v.detach().clone() for k, v in state["state"].items()} or None

    def reset(self) -> None:
        self._state, self._num_tasks, self.step = None, None, 0
