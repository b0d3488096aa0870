r"""``fm.optim.PCGrad``: a drop-in, fast replacement for the popular PCGrad optimizer wrapper
(github.com/WeiChengTseng/Pytorch-PCGrad, ``pcgrad.py``; Yu et al., "Gradient Surgery for
Multi-Task Learning", NeurIPS 2020)::

    optimizer = fm.optim.PCGrad(torch.optim.Adam(net.parameters()))   # reduction="mean"
    for x, y in loader:
        losses = compute_losses(net(x), y)        # a list of T per-task losses
        optimizer.zero_grad()
        optimizer.pc_backward(losses)             # .grad ← the projected, reduced gradient
        optimizer.step()

What the popular wrapper does (its latest version), and how this matches it:

1. For each loss: ``zero_grad(set_to_none=True)``, ``backward(retain_graph=True)``, then the
   gradients of *every* parameter in the optimizer's groups are flattened into one vector g_i
   (a parameter whose ``.grad`` is None counts as zeros, and is marked "no grad" for task i).
   Here: ``TaskGradients`` over all the optimizer's parameters that require grad (one (T, N)
   buffer per device/dtype group, T backward passes or one batched pass), and K = G Gᵀ.
2. For each task i, ``random.shuffle`` of all T gradients, task i itself included, then for
   each g_j in that order: if ⟨g'_i, g_j⟩ < 0, g'_i ← g'_i − ⟨g'_i, g_j⟩/‖g_j‖² · g_j (against
   the original g_j). Here: the same projections in coefficient space,
   g'_i = Σ_k C_ik g_k, by ``fastmtl.solvers.surgery.surgery_coefficients`` on K, with each
   row of ``orders`` an independent uniformly random permutation of all T tasks (i included:
   a no-op unless g'_i has turned against its own g_i, exactly as in the port). The orders
   come from torch's RNG on K's device, reseeded per call from (seed, call count), so they are
   reproducible with ``seed=`` and survive ``state_dict()``; ``last_orders`` holds the last.
3. Merging: an element is "shared" if every task has a gradient for its parameter. Shared
   elements get the mean over tasks of g'_i (``reduction="mean"``, the default) and the others
   the sum. Here, with s = Cᵀ1: a parameter reached by every task gets Gᵀs/T ("mean") or
   Gᵀs ("sum"); a parameter reached by some tasks gets Gᵀs (so a head reached only by task i
   gets s_i ∇L_i: the port also takes it from the *projected* vectors); a parameter no task
   reaches gets a zero ``.grad``, as in the port. ``.grad`` is replaced, not accumulated.

Deliberate differences from the port: ``reduction="sum"`` sums the shared elements (in the
port any truthy ``reduction`` takes the mean branch, so its "sum" is the mean); parameters
with ``requires_grad=False`` are left alone (the port gives them a zero ``.grad``, which
weight decay then acts on); the graph is freed after ``pc_backward`` (the port retains it);
the random orders differ (Python's ``random`` there); and there is no host synchronisation
(the port branches on every inner product in Python).

Compared with ``fm.optim.MTLOptimizer(opt, aggregator=fm.aggregators.PCGrad(), shared_params=
encoder.parameters())``: there, only the shared (encoder) parameters enter K and get the
projected direction, reduced by a *sum* (the paper), the heads get the plain Σ_i ∇L_i, each
task visits only the other tasks, and ``backward`` accumulates into ``.grad``. Here every
parameter of the optimizer enters K (heads included, as in the port), the reduction is the
mean, and heads get the sum of the projected gradients. Use ``MTLOptimizer`` for the paper's
algorithm on an encoder; use this wrapper to reproduce code written for the port.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastmtl._checks import check_choice, check_engine_name, check_losses_list, check_seed
from fastmtl.engine import pipeline
from fastmtl.engine.task_gradients import TaskGradients
from fastmtl.optim.mtl_optimizer import OptimizerWrapper
from fastmtl.solvers.surgery import surgery_coefficients

__all__ = ["PCGrad"]

_REDUCTIONS = ("mean", "sum")
_MASK63 = (1 << 63) - 1


def _call_seed(seed: int, calls: int) -> int:
    """A per-call seed from (seed, call count): splitmix64 of their combination."""
    x = (seed * 0x9E3779B97F4A7C15 + calls + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & _MASK63


class PCGrad(OptimizerWrapper):
    """The PCGrad optimizer wrapper with the interface of the popular PyTorch port.

    Args:
        optimizer: any ``torch.optim.Optimizer``; every parameter in its groups that requires
            grad takes part in the projection (the port's convention).
        reduction: "mean" (default, as the port) or "sum" over tasks, on the elements every
            task reaches (see the module docstring).
        seed: seed of the random orders (None: drawn from torch's global CPU RNG here).
        engine: "auto" | "loop" | "vmap", the per-task gradient engine.

    Methods: ``pc_backward(losses)``, ``zero_grad()``, ``step()``, ``optimizer`` (the wrapped
    one), ``state_dict()``/``load_state_dict()``; ``param_groups`` is the wrapped optimizer's,
    so lr schedulers accept the wrapper.
    """

    def __init__(self, optimizer: Optimizer, reduction: str = "mean", seed: int | None = None,
                 engine: str = "auto") -> None:
        super().__init__(optimizer)
        check_choice("reduction", reduction, _REDUCTIONS)
        seed = check_seed(seed)
        self._reduction = reduction
        self.seed = seed
        self.engine = check_engine_name(engine, who="fm.optim.PCGrad")
        self.calls = 0
        self.last_orders: Tensor | None = None
        self._task_gradients: TaskGradients | None = None
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def reduction(self) -> str:
        return self._reduction

    def _engine_for(self, params: list[Tensor]) -> TaskGradients:
        eng = self._task_gradients
        if eng is None or not eng.matches(params):
            eng = self._task_gradients = TaskGradients(params, self.engine)
        return eng

    def _orders(self, T: int, device: torch.device) -> Tensor:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(_call_seed(self.seed, self.calls))
        keys = torch.rand(T, T, generator=gen, device=device)
        return keys.argsort(dim=1)

    def pc_backward(self, objectives: Any) -> Tensor:
        """Set ``.grad`` of the optimizer's parameters to the PCGrad direction of
        ``objectives`` (T scalar losses). Returns the weights w (T,) of the direction on the
        parameters every task reaches (d = Gᵀw: Cᵀ1/T for "mean", Cᵀ1 for "sum")."""
        losses = check_losses_list(objectives)
        params = [p for p in self.params() if p.requires_grad]
        if not params:
            raise ValueError("PCGrad: the optimizer has no parameter that requires grad")
        eng = self._engine_for(params)
        for p in params:                     # the port zeroes (set_to_none) before each task
            p.grad = None
        T = len(losses)
        mean = self._reduction == "mean"

        def weigh(K: Tensor, _losses: Tensor) -> Tensor:
            orders = self._orders(T, K.device)
            C, _ = surgery_coefficients(K, orders)
            s = C.sum(0)
            self.last_orders = orders
            self.calls += 1
            return s / T if mean else s

        w = pipeline.run(eng, losses, weigh).w
        reached = eng.reached
        shared = reached.all(0).tolist()
        active = reached.any(0).tolist()
        partial = [p.grad for k, p in enumerate(params) if active[k] and not shared[k]]
        if mean and T > 1 and partial:
            torch._foreach_mul_(partial, float(T))
        for k, p in enumerate(params):
            if not active[k]:
                p.grad = torch.zeros_like(p)
        return w

    def _extra_state(self) -> dict[str, Any]:
        return {"pcgrad": {"seed": self.seed, "calls": self.calls}}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        inner = state["pcgrad"]
        if set(inner) != {"seed", "calls"}:
            raise ValueError(f"PCGrad.load_state_dict: 'pcgrad' expects keys ['calls', 'seed'], "
                             f"got {sorted(inner)}")
        self.seed, self.calls = int(inner["seed"]), int(inner["calls"])

    def __repr__(self) -> str:
        return (f"PCGrad(\n  optimizer={self.optimizer!r},\n  reduction={self._reduction!r}, "
                f"seed={self.seed}, engine={self.engine!r})")
