r"""RLW: Random Loss Weighting (Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022; arXiv:2111.10603).

Every call draws fresh weights λ and returns Σ_i λ_i L_i:

- ``"normal"`` (the paper's main variant): λ = softmax(λ̃), λ̃ ~ N(0, I_T);
- ``"dirichlet"``: λ ~ Dirichlet(1, ..., 1) (uniform on the simplex), sampled as normalised
  Exp(1) variables (Gamma(1, 1) = Exp(1)).

Both sum to 1, as in the paper (``rescale=False``, the default). ``rescale=True`` multiplies λ
by T (Σλ = T), as the code of Kurin et al. (NeurIPS 2022, "In Defense of the Unitary
Scalarization") does for every distribution: the same directions, the gradient scaled by T.
LibMTL's ``RLW`` applies a softmax to the Dirichlet sample too (λ = softmax(Dir(1)), much flatter
than Dir(1)); here the Dirichlet sample is used as drawn, as in Kurin's code.

When to call what (one draw per training step)::

    rlw = fm.weighting.RLW(num_tasks=T, distribution="normal",
                           generator=torch.Generator(device).manual_seed(0))  # optional
    for x, y in loader:
        losses = compute_losses(model(x), y)       # T scalars
        opt.zero_grad()
        rlw(losses).backward()                     # Σ_i λ_i L_i with a fresh λ
        opt.step()

``rlw.last_weights`` is the λ of the last call; ``rlw.sample(device)`` draws λ without a loss
(e.g. to scale the losses passed to ``fm.mtl_backward``). λ is drawn on the generator's device
when one is given (then moved to the losses' device), else on the losses' device with torch's
default generator for that device: no host synchronisation either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastmtl._checks import (
    check_bool,
    check_choice,
    check_generator,
    generator_state,
    load_generator_state,
)
from fastmtl.weighting.base import check_num_tasks, stack_losses

__all__ = ["RLW"]

_DISTRIBUTIONS = ("normal", "dirichlet")


class RLW:
    """Random loss weights, redrawn at every call (see the module docstring).

    Args:
        num_tasks: T.
        distribution: "normal" (softmax of N(0, I), default) or "dirichlet" (Dirichlet(1)).
        rescale: False (Σλ = 1, the paper) or True (Σλ = T, Kurin et al.'s code).
        generator: a ``torch.Generator`` for reproducible draws (its device is where λ is
            sampled), or None for torch's default generator of the losses' device.
        check: value checks of the losses (see ``fastmtl.weighting.base``).
    """

    def __init__(self, num_tasks: int, distribution: str = "normal", rescale: bool = False,
                 generator: torch.Generator | None = None, *, check: bool | None = None) -> None:
        self.num_tasks = check_num_tasks(num_tasks)
        check_choice("distribution", distribution, _DISTRIBUTIONS)
        check_bool("rescale", rescale)
        self.distribution = distribution
        self.rescale = rescale
        self.generator = check_generator(generator)
        self.check = check
        self.last_weights: Tensor | None = None

    def sample(self, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """One draw of λ (T,) on ``device`` (default: the generator's, else the CPU)."""
        gen = self.generator
        where = gen.device if gen is not None else torch.device(device or "cpu")
        T = self.num_tasks
        if self.distribution == "normal":
            lam = torch.softmax(torch.randn(T, generator=gen, device=where), dim=0)
        else:
            e = torch.empty(T, device=where).exponential_(1.0, generator=gen)
            lam = e / e.sum()
        if self.rescale:
            lam = lam * T
        lam = lam.to(device=device if device is not None else where, dtype=dtype)
        self.last_weights = lam
        return lam

    def __call__(self, losses: Any) -> Tensor:
        """Σ_i λ_i L_i with a freshly drawn λ (differentiable in the losses)."""
        stacked = stack_losses(losses, self.num_tasks, "RLW", self.check)
        lam = self.sample(stacked.device, stacked.dtype)
        return (lam * stacked).sum()

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (None without a generator): RLW has no other state."""
        return {"generator_state": generator_state(self.generator)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"generator_state"}:
            raise ValueError(f"RLW.load_state_dict expects keys ['generator_state'], "
                             f"got {sorted(state)}")
        load_generator_state(self.generator, state["generator_state"], "RLW")

    def __repr__(self) -> str:
        return (f"RLW(num_tasks={self.num_tasks}, distribution={self.distribution!r}, "
                f"rescale={self.rescale})")
