"""``fm.optim.MTLOptimizer``: any torch optimizer plus an aggregator, stepped like one optimizer.

    opt = fm.optim.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3),
                                aggregator=fm.aggregators.MGDA(),
                                shared_params=model.encoder.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)   # works on the wrapper
    for x, y in loader:
        losses = compute_losses(model(x), y)        # T scalars
        opt.zero_grad()
        w = opt.backward(losses)                    # fm.mtl_backward: shared params get Gᵀw,
        opt.step()                                  #   every other param Σ_i ∇L_i
    sched.step()

``backward(losses, features=z)`` runs the latent (MGDA-UB) mode. The wrapper is a
``torch.optim.Optimizer`` (so lr schedulers accept it) that owns nothing: ``param_groups``,
``state`` and ``defaults`` are the base optimizer's own objects, ``step``/``zero_grad``/
``add_param_group`` forward to it, and ``state_dict()`` is
``{"optimizer": base.state_dict(), "aggregator": aggregator.state_dict()}``. Step hooks
registered on the wrapper run around the wrapper's ``step``; attributes the wrapper does not
define are looked up on the base optimizer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from fastmtl._checks import check_aggregator, check_engine_name, check_shared_params
from fastmtl.backward import mtl_backward

__all__ = ["MTLOptimizer", "OptimizerWrapper"]

_HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
               "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
               "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


class OptimizerWrapper(Optimizer):
    """A ``torch.optim.Optimizer`` that forwards to a base optimizer (shared plumbing of
    ``MTLOptimizer`` and ``PCGrad``). ``Optimizer.__init__`` is not called: the wrapper has no
    parameter groups of its own."""

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError("the wrapped optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.__dict__["optimizer"] = optimizer
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    # The base optimizer's own objects, so that schedulers and checkpoints see one truth.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails; never recurse before __dict__ is set up.
        base = self.__dict__.get("optimizer")
        if base is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(base, name)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def params(self) -> list[Tensor]:
        """Every parameter of the base optimizer's groups, in order."""
        return [p for group in self.param_groups for p in group["params"]]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The base optimizer's step (``closure`` is passed on)."""
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), **self._extra_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        expected = {"optimizer", *self._extra_state()}
        if set(state_dict) != expected:
            raise ValueError(f"{type(self).__name__}.load_state_dict expects keys "
                             f"{sorted(expected)}, got {sorted(state_dict)}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._load_extra_state({k: v for k, v in state_dict.items() if k != "optimizer"})


class MTLOptimizer(OptimizerWrapper):
    """A torch optimizer whose ``backward(losses)`` aggregates the shared gradients.

    Args:
        base_optimizer: any ``torch.optim.Optimizer`` over the model's parameters (shared
            params and heads).
        aggregator: a ``fastmtl.aggregators.Aggregator`` (a method of your own: subclass it).
        shared_params: the parameters whose per-task gradients are aggregated; each must be in
            the base optimizer's ``param_groups`` (``ValueError`` otherwise).
        engine: "auto" | "loop" | "vmap", passed to ``fm.mtl_backward``.

    ``backward`` accumulates into ``.grad`` like ``loss.backward()``: call ``zero_grad()``
    first. See the module docstring for the loop.
    """

    def __init__(self, base_optimizer: Optimizer, aggregator: Any,
                 shared_params: Iterable[Tensor], engine: str = "auto") -> None:
        super().__init__(base_optimizer)
        self.aggregator = check_aggregator(aggregator)
        self.engine = check_engine_name(engine)
        params = check_shared_params(shared_params)
        owned = {id(p) for p in self.params()}
        for k, p in enumerate(params):
            if id(p) not in owned:
                raise ValueError(f"shared_params[{k}] (shape {tuple(p.shape)}) is not in the "
                                 "base optimizer's param_groups: it would get a gradient but "
                                 "never be updated; build the optimizer over all parameters")
        self.shared_params = params

    def backward(self, losses: Any, features: Tensor | None = None, *,
                 check_finite: bool = False) -> Tensor:
        """``fm.mtl_backward(losses, shared_params, aggregator, features)``; returns w (T,)."""
        return mtl_backward(losses, self.shared_params, self.aggregator, features=features,
                            engine=self.engine, check_finite=check_finite)

    def _extra_state(self) -> dict[str, Any]:
        return {"aggregator": self.aggregator.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.aggregator.load_state_dict(state["aggregator"])

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.shared_params)
        return (f"MTLOptimizer(\n  optimizer={self.optimizer!r},\n"
                f"  aggregator={self.aggregator!r},\n"
                f"  shared_params={len(self.shared_params)} tensors ({n} elements),\n"
                f"  engine={self.engine!r})")

