"""Turning an ordinary model into a subspace model (``to_subspace``) and back (``extract``).

As in the official PaMaL code (Dimitriadis, Frossard & Fleuret, ICML 2023; ``nik-dim/pamal``,
``src/ll/subspace_modules.py``), **every** layer with parameters, heads included, gets T
members; with ``reinit=True`` each member is independently re-initialised with the layer's
``reset_parameters()`` (fresh draws of torch's global RNG: seed it for reproducibility), so
the members start apart; ``reinit=False`` copies the current parameters into every member;
a callable ``reinit(layer)`` re-initialises the plain layer in place before each member is read
(e.g. a torchvision-style ``kaiming_normal_``). BatchNorm running statistics are reset by
``reset_parameters`` (``reinit=True``, as in the code's fresh subspace BN) and kept otherwise.

The conversion is in place and keeps every module object, name, hook and buffer: only the
converted layers' classes change (``nn.Linear`` → ``SubspaceLinear``) and their parameters
become one ``members`` Parameter each (``"fc.weight"``/``"fc.bias"`` → ``"fc.members"`` in
the state dict). Create the optimizer after converting.

``extract(model, α)`` returns a deep copy in which each subspace layer is the plain torch layer
again with parameters W(α): an ordinary model, one network's cost, same outputs as the subspace
model at α.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from fastmtl._checks import check_int
from fastmtl.pamal.alpha import check_alpha
from fastmtl.pamal.layers import (
    SUPPORTED_LAYERS,
    SubspaceLayer,
    subspace_class,
    subspace_layers,
)

__all__ = ["extract", "to_subspace"]

Reinit = bool | Callable[[nn.Module], object]


def _supported_names() -> str:
    return ", ".join(f"nn.{c.__name__}" for c in SUPPORTED_LAYERS)


def _check_convertible(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to convert; raises for anything that cannot be."""
    if subspace_layers(model):
        raise ValueError("to_subspace: the model already has subspace layers")
    todo, unsupported, owners = [], [], {}
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module._parameters.items() if p is not None]
        if not own:
            continue
        label = name or "<root>"
        if subspace_class(type(module)) is None:
            unsupported.append(f"{label} ({type(module).__name__})")
            continue
        if any(is_lazy(p) for _, p in own):
            raise ValueError(f"to_subspace: {label} ({type(module).__name__}) has uninitialized "
                             "(lazy) parameters; run one forward before converting")
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
            raise ValueError(f"to_subspace: {label} (Embedding) uses max_norm or sparse=True, "
                             "which renormalise or sparsify one table in place; not supported")
        if len({p.dtype for _, p in own}) > 1:
            raise ValueError(f"to_subspace: {label} mixes parameter dtypes "
                             f"{sorted(str(p.dtype) for _, p in own)}")
        for n, p in own:
            if id(p) in owners:
                raise ValueError(f"to_subspace: parameter {label}.{n} is shared with "
                                 f"{owners[id(p)]}; tied parameters are not supported")
            owners[id(p)] = f"{label}.{n}"
        todo.append((label, module))
    if unsupported:
        raise TypeError(f"to_subspace: unsupported layers with parameters: "
                        f"{', '.join(unsupported)}. Supported layer types: {_supported_names()} "
                        "(and their subclasses)")
    return todo


def _member_rows(module: nn.Module, names: list[str], num_tasks: int,
                 reinit: Reinit) -> torch.Tensor:
    """(T, P): the layer's flattened parameters once per member, re-initialised as asked."""
    def flat() -> torch.Tensor:
        return torch.cat([module._parameters[n].detach().reshape(-1) for n in names])

    if reinit is False:
        return flat().unsqueeze(0).repeat(num_tasks, 1)
    init = module.reset_parameters if reinit is True else (lambda: reinit(module))
    rows = []
    with torch.no_grad():
        for _ in range(num_tasks):
            init()
            rows.append(flat().clone())
    return torch.stack(rows)


def _make_subspace(module: nn.Module, num_tasks: int, reinit: Reinit) -> None:
    names = [n for n, p in module._parameters.items() if p is not None]
    params = [module._parameters[n] for n in names]
    requires_grad = any(p.requires_grad for p in params)
    layout, offset = {}, 0
    for n, p in zip(names, params):
        layout[n] = (p.shape, offset, p.numel())
        offset += p.numel()
    rows = _member_rows(module, names, num_tasks, reinit)
    order = tuple(module._parameters)
    for n in names:
        del module._parameters[n]
    module.__class__ = subspace_class(type(module))
    module.__dict__.update(member_layout=layout, param_order=order, _alpha=None, _weights=None)
    module.register_parameter("members", nn.Parameter(rows, requires_grad=requires_grad))


def to_subspace(model: nn.Module, num_tasks: int, reinit: Reinit = True) -> nn.Module:
    """Convert ``model`` in place into a subspace model with ``num_tasks`` members per layer.

    Every module with parameters must be a supported layer (``SUPPORTED_LAYERS``: Linear,
    Conv1d, Conv2d, BatchNorm1d, BatchNorm2d, LayerNorm, Embedding, or a subclass); anything
    else, a lazy or tied parameter, or an Embedding with ``max_norm``/``sparse`` raises before
    any change, naming the modules. Returns ``model`` (the same object).
    """
    T = check_int("num_tasks", num_tasks, who="to_subspace")
    if not (isinstance(reinit, bool) or callable(reinit)):
        raise TypeError(f"to_subspace: reinit must be a bool or a callable(layer), "
                        f"got {type(reinit).__name__}")
    for _, module in _check_convertible(model):
        _make_subspace(module, T, reinit)
    return model


def _make_plain(layer: SubspaceLayer, alpha: torch.Tensor) -> None:
    with torch.no_grad():
        weights = layer.interpolate(alpha)
    requires_grad = layer.members.requires_grad
    params = dict(layer._parameters)
    layer._parameters.clear()
    for n in layer.param_order:
        w = weights.get(n)
        layer._parameters[n] = (params[n] if w is None
                                else nn.Parameter(w.clone(), requires_grad=requires_grad))
    for attr in ("member_layout", "param_order", "_alpha", "_weights"):
        del layer.__dict__[attr]
    layer.__class__ = layer.plain_class


def extract(model: nn.Module, alpha: object, *, check: bool | None = None) -> nn.Module:
    """An ordinary copy of ``model`` at α: each subspace layer becomes its plain torch layer
    with parameters W(α) = Σ_t α_t W_t (new leaf tensors). ``model`` is left unchanged."""
    layers = subspace_layers(model)
    if not layers:
        raise ValueError("extract: the model has no subspace layers (nothing to extract)")
    checked = check_alpha(alpha, layers[0].num_members, check=check)
    saved = [(layer._alpha, layer._weights) for layer in layers]
    try:  # the α and W(α) in use may be non-leaf tensors, which deepcopy refuses
        for layer in layers:
            layer._alpha = layer._weights = None
        plain = copy.deepcopy(model)
    finally:
        for layer, (a, w) in zip(layers, saved):
            layer._alpha, layer._weights = a, w
    for layer in subspace_layers(plain):
        _make_plain(layer, checked)
    return plain
